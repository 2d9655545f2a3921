"""Steering: add alpha x s_max x d_i to a model's residual stream while it generates.

`d_i` is a feature's decoder vector converted back to the model's raw units (the crosscoder
works on normalised activations), `s_max` the feature's largest activation seen in analysis,
so alpha = 1 adds the feature at its natural maximum (paper B.4.3). The vector is added to
the output of the block the crosscoder was trained on. A sweep over strengths is one batched
generation in which every row carries its own coefficient, not a loop over strengths, and
`generate_grid` puts every prompt x sample x strength of a model into as few generations as
memory allows.

Sampled decoding draws each row's tokens from a random stream of its own, seeded by the
row's `seed` (`RowSampler`), so a row's text does not depend on which other rows share its
batch: the same settings give the same texts whether prompts are generated one at a time
or all at once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.defaults import SAMPLED_TEMPERATURE, SAMPLED_TOP_P
from engine.errors import ConfigError
from engine.models.layers import decoder_layers
from engine.models.loading import LoadedModel

# Where the vector is added: every position, the prompt's, the generated tokens', or only the
# prompt's last token (for a chat prompt, the end of the answer header, where a chat model
# decides how to answer: a feature that lives at one position is tested there).
POSITIONS = ("all", "prompt", "generated", "last")
# Generation runs one request at a time (the dashboard holds a lock while it generates), so
# one huge prompt or token count would stall everyone: both are capped. 2,048 new tokens
# covers the paper's longest steering evaluation (2,000).
MAX_PROMPT_CHARS = 20_000
MAX_NEW_TOKENS = 2_048


def check_prompt(prompt: str) -> None:
    """Refuse a prompt too long to steer interactively (ConfigError naming the limit)."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(
            f"the prompt has {len(prompt):,} characters; keep it under {MAX_PROMPT_CHARS:,}"
        )


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (paper B.5: greedy, or temperature 0.7 / top-p 0.9 with a seed)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = SAMPLED_TEMPERATURE
    top_p: float = SAMPLED_TOP_P
    # Sampling draws from the top_k most likely tokens first (0: all), then top-p among
    # them: the library's default of 50, which sampled generation here always applied.
    top_k: int = 50
    seed: int = 0
    chat_template: bool = True  # use the tokenizer's chat template where it has one
    # Rows (prompt x sample x strength) per `generate` call in `generate_grid`; None: as
    # many as fit MEMORY_BUDGET (see `rows_per_call`).
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS:,}, got "
                f"{self.max_new_tokens:,}"
            )
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")


def feature_vector(
    crosscoder: Crosscoder, normalizer: Normalizer, feature: int, model: str
) -> torch.Tensor:
    """A feature's decoder vector in `model`'s raw activation units."""
    if not 0 <= feature < crosscoder.partition.n_features:
        raise ConfigError(
            f"feature {feature} does not exist; this crosscoder has "
            f"{crosscoder.partition.n_features} features"
        )
    if not crosscoder.decodes(feature, model):
        other = "b" if model == "a" else "a"
        raise ConfigError(
            f"feature {feature} has no decoder in model {model.upper()} (it is exclusive to "
            f"model {other.upper()}); steer model {other.upper()}, or transfer it"
        )
    with torch.no_grad():
        return normalizer.to_raw(crosscoder.decoder_matrix(model)[feature], model).float()


@contextmanager
def steering(model, layer: int, deltas: torch.Tensor, positions: str = "all"):
    """Add `deltas` [batch, d] (one row per sequence) to block `layer`'s output."""
    if positions not in POSITIONS:
        raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    block = decoder_layers(model)[layer]
    state = {"calls": 0}

    def hook(_module, _args, output):
        # The first call sees the whole prompt; with a KV cache, later calls see one new token.
        first = state["calls"] == 0
        state["calls"] += 1
        if (positions in ("prompt", "last") and not first) or (
            positions == "generated" and first
        ):
            return None
        hidden = output[0] if isinstance(output, tuple | list) else output
        delta = deltas.to(hidden.device, hidden.dtype)[:, None, :]
        if positions == "last":  # prompts are left-padded: the last column is each one's end
            steered = torch.cat([hidden[:, :-1], hidden[:, -1:] + delta], dim=1)
        else:
            steered = hidden + delta
        if isinstance(output, tuple | list):
            return (steered, *output[1:])
        return steered

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def render_prompt(loaded: LoadedModel, prompt: str, chat_template: bool = True) -> str:
    """The prompt as the model reads it: its chat template if it has one, else as is."""
    tok = loaded.tokenizer
    if chat_template and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


_LOCK = threading.Lock()  # one generation at a time per process (models are shared)


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    coefficients: Sequence[float] | None = None,
    positions: str = "all",
    cfg: GenerationConfig | None = None,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Generate a continuation of each prompt, each row steered by coefficient x vector.

    Sampled rows draw from random streams seeded by `seeds` (one per row; default: every
    row `cfg.seed`), independently of the other rows in the batch."""
    for prompt in set(prompts):  # before the lock: a refused prompt holds no one up
        check_prompt(prompt)
    cfg = cfg or GenerationConfig()
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError("sampling needs one seed per prompt")
    inputs = _batch(loaded, prompts, cfg)
    deltas = None
    if vector is not None:
        if layer is None or coefficients is None or len(coefficients) != len(prompts):
            raise ValueError("steering needs a layer and one coefficient per prompt")
        coef = torch.tensor(list(coefficients), dtype=torch.float32)
        deltas = coef[:, None] * vector.float()[None, :]
    row_seeds = list(seeds) if seeds is not None else [cfg.seed] * len(prompts)
    with _LOCK, torch.inference_mode(), _maybe_steering(loaded, layer, deltas, positions):
        out = loaded.model.generate(**inputs, **_decoding(loaded, cfg, row_seeds))
    new = out[:, inputs["input_ids"].shape[1] :]
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)


def sweep(
    loaded: LoadedModel,
    prompt: str,
    vector: torch.Tensor,
    layer: int,
    s_max: float,
    alphas: Sequence[float],
    positions: str = "all",
    cfg: GenerationConfig | None = None,
) -> list[str]:
    """One prompt steered at every strength alpha (x s_max), as a single batched generation."""
    coefficients = [float(a) * s_max for a in alphas]
    return generate(
        loaded,
        [prompt] * len(alphas),
        vector=vector,
        layer=layer,
        coefficients=coefficients,
        positions=positions,
        cfg=cfg,
    )


def sample_seed(seed: int, sample: int) -> int:
    """The random stream of sample `sample` under `seed`: the same for every prompt,
    strength and model, so the strengths of one sample differ only by the steering."""
    return int(seed) * 1_000_003 + int(sample)


Grid = dict[tuple[str, int], dict[float, str]]  # (prompt, sample) -> strength -> text


def generate_grid(
    loaded: LoadedModel,
    prompts: Sequence[str],
    alphas: Sequence[float],
    *,
    vector: torch.Tensor,
    layer: int,
    s_max: float,
    samples: int = 1,
    cfg: GenerationConfig | None = None,
) -> Grid:
    """Every prompt x sample x strength (alpha x s_max), in as few batched generations as
    `cfg.max_batch` (or, by default, the memory budget) allows.

    Greedy decoding has one sample (more would repeat it). Row texts do not depend on how
    the rows are split into batches (each row samples from its own seeded stream)."""
    cfg = cfg or GenerationConfig()
    samples = 1 if cfg.greedy else max(int(samples), 1)
    rows = [(p, j, float(a)) for p in prompts for j in range(samples) for a in alphas]
    limit = cfg.max_batch or rows_per_call(loaded, _prompt_tokens(loaded, prompts, cfg), cfg)
    out: Grid = {(p, j): {} for p in prompts for j in range(samples)}
    for start in range(0, len(rows), limit):
        chunk = rows[start : start + limit]
        texts = generate(
            loaded,
            [p for p, _, _ in chunk],
            vector=vector,
            layer=layer,
            coefficients=[a * float(s_max) for _, _, a in chunk],
            cfg=cfg,
            seeds=[sample_seed(cfg.seed, j) for _, j, _ in chunk],
        )
        for (p, j, a), text in zip(chunk, texts, strict=True):
            out[(p, j)][a] = text
    return out


# Memory a batch of generations may take (KV cache, logits and the sampler's sort): on a
# GPU half of its memory, on a CPU this many bytes.
CPU_MEMORY_BUDGET = 4 * 2**30
GPU_MEMORY_SHARE = 0.5


def rows_per_call(loaded: LoadedModel, prompt_tokens: int, cfg: GenerationConfig) -> int:
    """How many rows one `generate` call may hold: the memory budget over an estimate of
    one row's KV cache (every layer, prompt + new tokens) plus its per-step logits."""
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    vocab = int(getattr(text, "vocab_size", 32_000) or 32_000)
    width = next(loaded.model.parameters()).element_size()
    tokens = prompt_tokens + cfg.max_new_tokens
    per_row = 2 * layers * kv_heads * head_dim * tokens * width + 6 * vocab * 4
    per_row += 4 * tokens * int(text.hidden_size) * 4  # activations of the longest step
    return max(1, int(_memory_budget(loaded) // per_row))


def _memory_budget(loaded: LoadedModel) -> float:
    """Bytes a generation batch may use on the model's device."""
    device = torch.device(loaded.device)
    if device.type == "cuda" and torch.cuda.is_available():
        # The device's total, not what is free now: the batches (and so the texts, up to
        # floating point) stay the same from one run to the next.
        return torch.cuda.get_device_properties(device).total_memory * GPU_MEMORY_SHARE
    return float(CPU_MEMORY_BUDGET)


def _prompt_tokens(loaded: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig) -> int:
    """Tokens of the longest rendered prompt."""
    tok = loaded.tokenizer
    rendered = [render_prompt(loaded, p, cfg.chat_template) for p in dict.fromkeys(prompts)]
    return max((len(tok(t, add_special_tokens=False)["input_ids"]) for t in rendered), default=1)


class RowSampler:
    """Temperature, top-k and top-p (nucleus) sampling, one seeded random stream per row.

    Passed to `generate` as a logits processor under greedy search: it draws each row's
    next token and leaves only that token finite, so the search's argmax takes it. A row's
    draws depend only on its own seed and logits, not on the rest of the batch (the
    library's sampler draws the whole batch from one shared stream). As in the library,
    top-k comes first (0: no limit), then the smallest prefix holding top_p of the
    remaining mass."""

    CANDIDATES = (1024, 32768)  # without top-k: top-p is looked for among these first

    def __init__(
        self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int = 0
    ) -> None:
        if temperature <= 0:
            raise ConfigError(f"sampling needs a temperature above 0, got {temperature}")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        vocab = logits.shape[-1]
        if self.top_k and self.top_k < vocab:
            values, order = logits.topk(self.top_k, dim=-1)
            top = torch.softmax(values, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            for k in (*self.CANDIDATES, vocab):
                # The nucleus lies within the k most likely tokens once they hold top_p;
                # flat rows (an untrained or overdriven model) need more, at worst all.
                top, order = probs.topk(min(k, vocab), dim=-1)
                if k >= vocab or bool((top.sum(-1) >= self.top_p).all()):
                    break
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        keep = (top.cumsum(-1) - top) < self.top_p
        cum = (top * keep).cumsum(-1).cpu()
        draws = torch.stack([torch.rand((), generator=g) for g in self.generators])
        pick = torch.searchsorted(cum, (draws * cum[:, -1])[:, None])
        pick = torch.minimum(
            pick.clamp_(max=top.shape[-1] - 1), keep.sum(-1, keepdim=True).cpu() - 1
        )
        token = order.gather(-1, pick.to(order.device))
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(-1, token, 0.0)


def stream(
    loaded: LoadedModel,
    prompt: str,
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    coefficient: float = 0.0,
    positions: str = "all",
    cfg: GenerationConfig | None = None,
) -> Iterator[str]:
    """The steered continuation of one prompt, piece by piece as it is generated."""
    check_prompt(prompt)
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cfg = cfg or GenerationConfig()
    inputs = _batch(loaded, [prompt], cfg)
    deltas = None if vector is None else (coefficient * vector.float())[None, :]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            steer = _maybe_steering(loaded, layer, deltas, positions)
            with _LOCK, torch.inference_mode(), steer:
                loaded.model.generate(
                    **inputs, **_decoding(loaded, cfg, [cfg.seed]), streamer=streamer
                )
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True, name="steer-stream")
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def _batch(loaded: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig) -> dict:
    """Left-padded input ids and mask (generation appends on the right)."""
    tok = loaded.tokenizer
    texts = [render_prompt(loaded, p, cfg.chat_template) for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        # Templates already hold their special tokens.
        enc = tok(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not cfg.chat_template or not getattr(tok, "chat_template", None),
        )
    finally:
        tok.padding_side = side
    return {k: v.to(loaded.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _decoding(loaded: LoadedModel, cfg: GenerationConfig, seeds: Sequence[int]) -> dict:
    """Keyword arguments of `generate` for these settings: greedy search, with a
    `RowSampler` choosing each token when decoding is sampled (`seeds`: one per row)."""
    args = {
        "max_new_tokens": cfg.max_new_tokens,
        "pad_token_id": loaded.tokenizer.pad_token_id,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    if not cfg.greedy:
        from transformers import LogitsProcessorList

        sampler = RowSampler(seeds, cfg.temperature, cfg.top_p, cfg.top_k)
        args["logits_processor"] = LogitsProcessorList([sampler])
    return args


def _maybe_steering(loaded: LoadedModel, layer, deltas, positions: str):
    """`steering` when there is something to add, else a context that does nothing."""
    if deltas is None:
        return nullcontext()
    return steering(loaded.model, layer, deltas, positions)
