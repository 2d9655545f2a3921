"""Steering on a tiny model built in code with the real SmolLM2 tokenizer."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.config import ConfigError
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.models.loading import LoadedModel
from engine.models.tokenizers import load_tokenizer
from engine.partition import Partition
from engine.steering.steer import (
    GenerationConfig,
    feature_vector,
    generate,
    steering,
    stream,
    sweep,
)
from tests.conftest import tiny_llama, wrap


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    tok = load_tokenizer("smollm2")
    model = tiny_llama(tok, num_hidden_layers=3, max_position_embeddings=256)
    return wrap(model, tok, "tiny")


def next_token_probs(m: LoadedModel, text: str, layer: int, vector, alpha: float) -> torch.Tensor:
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode(), steering(m.model, layer, (alpha * vector)[None]):
        logits = m.model(input_ids=ids).logits[0, -1]
    return logits.softmax(-1)


def test_steering_along_an_unembedding_raises_that_token_monotonically(tiny):
    token = tiny.tokenizer(" tea", add_special_tokens=False)["input_ids"][0]
    direction = torch.nn.functional.normalize(tiny.model.lm_head.weight[token].detach(), dim=0)
    probs = [
        next_token_probs(tiny, "I would like some", 2, direction, a)[token].item()
        for a in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
    ]
    assert all(b > a for a, b in itertools.pairwise(probs)), probs
    # The random model's head is small (std 0.02), so probabilities stay low, but the token
    # becomes the most likely one.
    strong = next_token_probs(tiny, "I would like some", 2, direction, 100.0)
    assert int(strong.argmax()) == token and probs[-1] > 1.5 * probs[0]


def test_feature_vectors_come_back_in_raw_units():
    torch.manual_seed(0)
    cc = Crosscoder(6, 4, Partition(n_a_exclusive=2, n_b_exclusive=2, n_shared=4))
    norm = Normalizer(scale_a=0.5, scale_b=4.0)
    v = feature_vector(cc, norm, 5, "b")
    # Normalising the raw vector gives back the decoder row the crosscoder learned.
    assert torch.allclose(norm.apply(torch.zeros(1, 6), v[None])[1][0], cc.decoder_matrix("b")[5])
    assert torch.allclose(v, cc.decoder_matrix("b")[5] / 4.0)
    with pytest.raises(ConfigError, match="no decoder in model B"):
        feature_vector(cc, norm, 0, "b")
    with pytest.raises(ConfigError, match="does not exist"):
        feature_vector(cc, norm, 99, "a")


def test_batched_sweep_equals_one_generation_per_strength(tiny):
    cfg = GenerationConfig(max_new_tokens=8)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    alphas = [0.0, 1.0, 3.0, 10.0]
    batched = sweep(tiny, "Tell me about rivers.", vector, 1, 2.0, alphas, cfg=cfg)
    looped = [sweep(tiny, "Tell me about rivers.", vector, 1, 2.0, [a], cfg=cfg)[0] for a in alphas]
    assert batched == looped
    assert batched[0] == generate(tiny, ["Tell me about rivers."], cfg=cfg)[0]
    assert len(set(batched)) > 1  # steering changes the text


def test_positions_prompt_only_and_generated_only(tiny):
    cfg = GenerationConfig(max_new_tokens=6)
    vector = 50 * torch.randn(32, generator=torch.Generator().manual_seed(2))
    base = generate(tiny, ["Hello there"], cfg=cfg)[0]
    gen_only = generate(
        tiny,
        ["Hello there"],
        vector=vector,
        layer=1,
        coefficients=[1.0],
        positions="generated",
        cfg=cfg,
    )[0]
    prompt_only = generate(
        tiny,
        ["Hello there"],
        vector=vector,
        layer=1,
        coefficients=[1.0],
        positions="prompt",
        cfg=cfg,
    )[0]
    first = tiny.tokenizer(base, add_special_tokens=False)["input_ids"][:1]
    # The first new token is predicted from the prompt pass, which "generated" leaves alone.
    assert tiny.tokenizer(gen_only, add_special_tokens=False)["input_ids"][:1] == first
    assert prompt_only != base or gen_only != base
    with pytest.raises(ConfigError, match="positions"):
        generate(tiny, ["x"], vector=vector, layer=1, coefficients=[1.0], positions="middle")


def test_last_position_steers_only_each_prompts_final_token(tiny):
    """positions="last" adds the vector at each left-padded prompt's last token, in the
    prompt pass only: earlier positions and later tokens see the unsteered model."""
    vector = 50 * torch.randn(32, generator=torch.Generator().manual_seed(3))
    layers = tiny.model.model.layers
    seen = {}
    handle = layers[2].register_forward_hook(lambda _m, _a, out: seen.setdefault("h", out))
    side, tiny.tokenizer.padding_side = tiny.tokenizer.padding_side, "left"
    try:
        enc = tiny.tokenizer(["Hi", "Tell me about the sea"], return_tensors="pt", padding=True)
        with torch.inference_mode():
            tiny.model(**enc)
            plain = seen.pop("h")
            plain = plain[0] if isinstance(plain, tuple) else plain
            deltas = torch.stack([vector, 2 * vector])
            with steering(tiny.model, 1, deltas, positions="last"):
                tiny.model(**enc)
            steered = seen.pop("h")
            steered = steered[0] if isinstance(steered, tuple) else steered
    finally:
        handle.remove()
        tiny.tokenizer.padding_side = side
    # Causal attention: positions before the last are untouched, the last one changes.
    assert torch.allclose(steered[:, :-1], plain[:, :-1], atol=1e-5)
    assert not torch.allclose(steered[:, -1], plain[:, -1], atol=1e-3)
    cfg = GenerationConfig(max_new_tokens=6)
    base = generate(tiny, ["Hello there"], cfg=cfg)[0]
    last = generate(
        tiny, ["Hello there"], vector=vector, layer=1, coefficients=[1.0], positions="last",
        cfg=cfg,
    )[0]  # fmt: skip
    assert last != base


def test_stream_yields_the_same_text_as_generate(tiny):
    cfg = GenerationConfig(max_new_tokens=8)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3))
    pieces = list(
        stream(tiny, "Once upon a time", vector=vector, layer=1, coefficient=5.0, cfg=cfg)
    )
    whole = generate(
        tiny, ["Once upon a time"], vector=vector, layer=1, coefficients=[5.0], cfg=cfg
    )[0]
    assert len(pieces) >= 1 and "".join(pieces).strip() == whole.strip()


def test_sampling_is_reproducible_with_a_seed(tiny):
    cfg = GenerationConfig(max_new_tokens=8, greedy=False, seed=7)
    assert generate(tiny, ["The sky"], cfg=cfg) == generate(tiny, ["The sky"], cfg=cfg)


def test_steer_command_on_an_analysed_run(tmp_path):
    """harvest -> train -> analyze -> `modeldiff steer --save` with tiny models on disk."""
    import subprocess
    import sys

    from engine.results import Database
    from tests.tiny_run import build_tiny_run

    build_tiny_run(tmp_path)
    with Database(tmp_path / "r.duckdb", read_only=True) as db:
        live = db.features("tiny", dead=False)
    feature = int(live[live.partition == "a_exclusive"].feature_id.iloc[0])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "steer",
            "--db",
            str(tmp_path / "r.duckdb"),
            "--run-id",
            "tiny",
            "--feature",
            str(feature),
            "--prompt",
            "The river",
            "--model",
            "b",
            "--alphas",
            "0",
            "50",
            "--max-new-tokens",
            "5",
            "--save",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "translated through the shared partition" in out.stdout and "baseline:" in out.stdout
    with Database(tmp_path / "r.duckdb", read_only=True) as db:
        samples = db.steering_samples("tiny", feature)
    assert len(samples) == 2 and set(samples.model) == {"b"}
    assert samples.transfer.iloc[0]["from"] == "a"
