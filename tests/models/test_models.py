"""Model loading, layer access and early-stopping residual capture, on tiny random models."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ConfigError
from engine.models.capture import capture_residual
from engine.models.layers import decoder_layers, hidden_size, resolve_layer

transformers = pytest.importorskip("transformers")

D, N_LAYERS, VOCAB = 32, 4, 128
SMALL = dict(
    hidden_size=D,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)


def _gemma3_multimodal() -> nn.Module:
    """Gemma3ForConditionalGeneration: text layers under model.language_model."""
    config = transformers.Gemma3Config(
        text_config=dict(SMALL, head_dim=8),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**SMALL, head_dim=8)
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**SMALL, head_dim=8)
    ),
    "gemma3_multimodal": _gemma3_multimodal,
    "gpt_oss": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(**SMALL, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=D, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB)
    ),
}
# The module applied after the last block, which hidden_states[-1] includes.
FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "gemma3_multimodal": "model.language_model.norm",
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One tiny random model per family, built once."""
    torch.manual_seed(0)
    return {name: build().eval() for name, build in FAMILIES.items()}


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids below the special ids of the multimodal config."""
    return torch.randint(0, VOCAB - 8, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hidden_states(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple:
    """transformers' own hidden_states for a full forward pass."""
    with torch.inference_mode():
        return model(input_ids=input_ids, output_hidden_states=True, **kwargs).hidden_states


# ---------------------------------------------------------------------------- layers


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_and_hidden_size(models, family):
    model = models[family]
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == N_LAYERS
    assert hidden_size(model) == D


def test_unsupported_models_get_a_clear_error():
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            hidden_size=D,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
        )
    )
    for model in (bert, nn.Sequential(nn.Linear(2, 2))):
        with pytest.raises(ConfigError) as err:
            decoder_layers(model)
        assert type(model).__name__ in str(err.value)
        assert "supported families" in str(err.value) and "Gemma 3" in str(err.value)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [(0, 0), (29, 29), (-1, 29), (-30, 0), ("12", 12), (" -3 ", 27), ("middle", 15)],
)
def test_resolve_layer(layer, expected):
    assert resolve_layer(30, layer) == expected


def test_resolve_layer_default_is_middle():
    assert resolve_layer(18) == 9 and resolve_layer(5) == 2


@pytest.mark.parametrize("layer", [30, -31, "40", "mid", "1.5", True, 2.0])
def test_resolve_layer_rejects(layer):
    with pytest.raises(ConfigError, match=r"valid: 0\.\.29 or -30\.\.-1 or 'middle'"):
        resolve_layer(30, layer)


def test_resolve_layer_out_of_range_message():
    with pytest.raises(ConfigError) as err:
        resolve_layer(30, 40)
    assert str(err.value) == (
        "layer 40 is out of range for a model with 30 layers; valid: 0..29 or -30..-1 or 'middle'"
    )


# ---------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_hidden_states_before_the_last_layer(models, family):
    model, x = models[family], ids()
    hs = hidden_states(model, x)
    assert len(hs) == N_LAYERS + 1
    for layer in range(N_LAYERS - 1):
        got = capture_residual(model, layer, x)
        assert got.shape == (2, 7, D)
        torch.testing.assert_close(got, hs[layer + 1], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_hidden_state_has_the_final_norm_but_capture_does_not(models, family):
    # transformers 5.23 replaces hidden_states[-1] by last_hidden_state (final norm applied).
    model, x = models[family], ids()
    last = capture_residual(model, -1, x)
    hs = hidden_states(model, x)
    assert not torch.allclose(last, hs[-1])
    norm = model.get_submodule(FINAL_NORM.get(family, "model.norm"))
    with torch.inference_mode():
        torch.testing.assert_close(norm(last), hs[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_unpadded(models, family):
    model, x = models[family], ids(batch=2, seq=9, seed=2)
    lengths = [9, 5]
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    padded = x.masked_fill(mask == 0, 0)
    layer = resolve_layer(N_LAYERS)
    batch = capture_residual(model, layer, padded, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = capture_residual(model, layer, x[row : row + 1, :n])
        torch.testing.assert_close(batch[row, :n], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_multimodal"])
def test_capture_stops_at_the_hooked_block(models, family):
    model = models[family]
    layers = decoder_layers(model)
    calls: dict[str, int] = {}

    def counter(name: str):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1

        return hook

    watched = {f"layer{i}": block for i, block in enumerate(layers)}
    watched["final_norm"] = model.get_submodule(FINAL_NORM.get(family, "model.norm"))
    watched["lm_head"] = model.get_submodule("lm_head")
    handles = [module.register_forward_hook(counter(name)) for name, module in watched.items()]
    try:
        capture_residual(model, 1, ids())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"layer0": 1, "layer1": 1}


def test_capture_removes_its_hook_even_on_error(models):
    model = models["llama"]
    block = decoder_layers(model)[2]
    before = len(block._forward_hooks)
    capture_residual(model, 2, ids())
    assert len(block._forward_hooks) == before
    with pytest.raises(IndexError):
        capture_residual(model, 2, torch.full((1, 3), VOCAB + 5))  # out of the embedding table
    assert len(block._forward_hooks) == before


def test_capture_accepts_blocks_that_return_tuples():
    class Block(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(**SMALL)
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            h = input_ids.float()
            for block in self.model.layers:
                h = block(h)[0]
            return h

    out = capture_residual(Toy(), 1, torch.ones(1, 3, 2))
    torch.testing.assert_close(out, torch.full((1, 3, 2), 4.0))


def test_capture_runs_without_grad(models):
    assert not capture_residual(models["qwen2"], 0, ids()).requires_grad


# ---------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved with the real SmolLM2 tokenizer, minus its pad token."""
    from engine.models.tokenizers import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2")
    except ConfigError as err:
        pytest.skip(str(err))
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(SMALL, vocab_size=len(tokenizer)))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(path)
    return path


def test_load_model_from_a_directory(tiny_dir):
    from engine.models.loading import LoadedModel, load_model

    loaded = load_model(str(tiny_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(tiny_dir)
    assert loaded.source == {"kind": "dir", "path": str(tiny_dir.resolve())}
    json.dumps(loaded.source)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert (loaded.n_layers, loaded.d_model) == (N_LAYERS, D)
    tok = loaded.tokenizer
    assert tok.is_fast and tok.pad_token == tok.eos_token and tok.padding_side == "right"
    batch = tok(["Hello world, again.", "Hi"], return_tensors="pt", padding=True)
    out = capture_residual(loaded.model, "middle", batch.input_ids, batch.attention_mask)
    assert out.shape == (2, batch.input_ids.shape[1], D)


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bf16", torch.bfloat16), ("float16", torch.float16)]
)
def test_load_model_dtype(tiny_dir, dtype, expected):
    from engine.models.loading import load_model

    loaded = load_model(str(tiny_dir), dtype=dtype, device="cpu")
    assert loaded.dtype == expected
    assert {p.dtype for p in loaded.model.parameters()} == {expected}


def test_resolve_device_and_dtype():
    from engine.models.loading import resolve_device, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("./no-such-dir", {}, "no such file or directory"),
        ("/no/such/model.gguf", {}, "no such file or directory"),
        ("missing.gguf", {}, "no such file or directory"),
        ("a/b/c", {}, "no such file or directory"),
        ("smollm2", {"dtype": "float8"}, r"unknown dtype 'float8'; choose one of: auto, float32"),
        ("smollm2", {"device": "tpu-ish"}, "unknown device"),
    ],
)
def test_bad_specs(spec, kwargs, match):
    from engine.models.loading import load_model

    with pytest.raises(ConfigError, match=match):
        load_model(spec, **kwargs)


def test_a_file_that_is_not_gguf(tmp_path):
    from engine.models.loading import load_model

    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"expected a model directory or a \.gguf file"):
        load_model(str(path))


def test_unreachable_hub_suggests_local_files(monkeypatch):
    import huggingface_hub.constants

    from engine.models.loading import load_model

    # Offline mode fails at once instead of retrying the network for half a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"hub cannot provide it.*local model directory"):
        load_model("nobody/no-such-model-xyz")


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    import importlib.util
    import sys

    from engine.models import loading

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a),
    )
    with pytest.raises(
        ConfigError, match=r"needs accelerate; run: pip install -e \"\.\[models\]\""
    ):
        loading.load_model(str(gguf), cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"needs transformers; run: pip install"):
        loading._auto("AutoModelForCausalLM")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    from engine.models import loading

    class HalfSaved:
        """Stands in for a converted model (and tokenizer) whose save fails half-way."""

        config = transformers.LlamaConfig()
        is_fast = True

        @classmethod
        def from_pretrained(cls, *_args, **_kwargs):
            return cls()

        def save_pretrained(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "config.json").write_text("{}")
            raise OSError("disk full")

    monkeypatch.setattr(loading, "_auto", lambda _name: HalfSaved)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        loading.load_model(str(gguf), cache_dir=cache)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------- real demo models


@pytest.mark.slow
def test_demo_models_load_convert_once_and_capture(monkeypatch):
    from engine.models import loading
    from engine.models.tokenizers import DEMO, cache_root

    expected = {"smollm2": (30, 576), "gemma3": (18, 640)}
    text = "The quick brown fox jumps over the lazy dog."
    for name, (n_layers, d_model) in expected.items():
        try:
            loaded = loading.load_model(name)
        except ConfigError as err:
            pytest.skip(str(err))
        assert (loaded.n_layers, loaded.d_model) == (n_layers, d_model)
        assert loaded.source["kind"] == "demo" and loaded.source["sha256"] == DEMO[name].sha256
        assert loaded.tokenizer.is_fast
        batch = loaded.tokenizer([text], return_tensors="pt")
        middle = resolve_layer(loaded.n_layers)
        got = capture_residual(loaded.model, middle, batch.input_ids, batch.attention_mask)
        hs = hidden_states(loaded.model, batch.input_ids, attention_mask=batch.attention_mask)
        torch.testing.assert_close(got, hs[middle + 1], rtol=0, atol=0)

        # The conversion is cached as plain safetensors, not marked as quantised.
        demo = DEMO[name]
        target = cache_root() / "models" / f"{demo.filename[:-5]}-{demo.sha256[:12]}"
        assert (target / "model.safetensors").is_file()
        assert "quantization_config" not in json.loads((target / "config.json").read_text())
        assert not list(target.parent.glob("*.tmp-*"))

        def no_conversion(*_args, **_kwargs):
            raise AssertionError("a cached demo model was converted again")

        with monkeypatch.context() as patch:
            patch.setattr(loading, "_convert_gguf", no_conversion)
            patch.setattr(loading, "demo_gguf", no_conversion)
            start = time.perf_counter()
            again = loading.load_model(name)
            assert time.perf_counter() - start < 30
        assert again.n_layers == n_layers


@pytest.mark.slow
def test_user_gguf_file_is_hashed_and_converted_once(tmp_path):
    from engine.models.loading import load_model
    from engine.models.tokenizers import DEMO, demo_gguf

    try:
        gguf = demo_gguf("smollm2")
    except ConfigError as err:
        pytest.skip(str(err))
    loaded = load_model(str(gguf), cache_dir=tmp_path)
    sha = DEMO["smollm2"].sha256
    assert loaded.source == {"kind": "gguf", "path": str(gguf.resolve()), "sha256": sha}
    assert (loaded.n_layers, loaded.d_model) == (30, 576)
    assert loaded.tokenizer.is_fast
    converted = [p.name for p in tmp_path.iterdir()]
    assert converted == [f"{gguf.stem}-{sha[:12]}"]


def test_gguf_conversion_shows_no_per_tensor_bar(capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from engine.models.loading import _no_gguf_tensor_bar

    bar = gguf_utils.tqdm
    with _no_gguf_tensor_bar():
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing")) == [0, 1, 2]
    assert "Converting" not in capsys.readouterr().err
    assert gguf_utils.tqdm is bar  # transformers' own bar is back afterwards
