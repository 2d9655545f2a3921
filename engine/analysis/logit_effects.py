"""Logit effects: the tokens a feature's decoder vector promotes and suppresses most.

For each feature and each model, the feature's vector in that model's raw residual units is
read out through the model's final norm and unembedding: effects = W_U · (γ ⊙ d). Like
Neuronpedia's and SAEDashboard's logit tables, only the final norm's elementwise scale γ is
applied; its division by the residual's RMS is left out, since a direction has no RMS of its
own (the real logit change depends on the residual the feature is added to). γ is the scale
the model's own norm applies: `weight` for Llama, Qwen, Mistral, GPT-OSS and GPT-2's
LayerNorm, `1 + weight` for Gemma's RMSNorm. Values therefore compare features within one
model (per unit of feature activation), not logits across models.

A feature with a decoder in the model uses it (vector "decoder"). An exclusive feature has
none in the other model: there it is read out through its shared-partition transfer
(vector "transfer"), the same translation the steering panel uses (engine.steering.transfer,
paper B.4.5), computed here for many features at once.

The work is one matrix product per chunk of features, with the chunk sized so that the
[chunk, vocabulary] block of logits and its temporaries stay within `chunk_bytes`; per row
only the top and bottom tokens and a histogram are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError, UserError
from engine.models.layers import _get_path
from engine.models.loading import LoadedModel, load_model
from engine.progress import ProgressBar
from engine.results.schema import LOGIT_VECTORS
from engine.specs import SIDES, PairSpec

TOP = 10  # promoted and suppressed tokens kept per feature and model
BINS = 40  # histogram bins over each feature's logit effects (its min to its max)
CHUNK_BYTES = 256 << 20  # the logits block of one chunk, with its temporaries
TRANSFER_N = 10  # shared features averaged by a transfer (engine.steering.transfer's default)
DECODER, TRANSFER = LOGIT_VECTORS  # the feature's own decoder, or its transfer
# The frame `logit_effects` returns, one row per feature and model.
COLUMNS = (
    "feature_id", "model", "vector", "promoted_ids", "promoted_values", "suppressed_ids",
    "suppressed_values", "hist_counts", "hist_min", "hist_max",
)  # fmt: skip

# model_type -> attribute paths of the final norm (as engine.models.layers for the blocks).
_NORM_PATHS: dict[str, tuple[str, ...]] = {
    "llama": ("model.norm", "norm"),
    "mistral": ("model.norm", "norm"),
    "qwen2": ("model.norm", "norm"),
    "qwen3": ("model.norm", "norm"),
    "gemma2": ("model.norm", "norm"),
    "gemma3_text": ("model.norm", "norm"),
    "gemma3": ("model.language_model.norm", "language_model.model.norm", "language_model.norm"),
    "gpt_oss": ("model.norm", "norm"),
    "gpt2": ("transformer.ln_f", "ln_f"),
}


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for path in _NORM_PATHS.get(model_type, ()):
        found = _get_path(model, path)
        if isinstance(found, nn.Module):
            return found
    raise ConfigError(
        f"cannot find the final norm of {type(model).__name__} (model_type {model_type!r}); "
        f"logit effects support: {', '.join(_NORM_PATHS)}"
    )


def norm_scale(norm: nn.Module, width: int) -> torch.Tensor:
    """The elementwise scale γ a final norm applies after normalising, as float32 [width].

    A LayerNorm's is its weight. For the RMS norms the norm's own forward pass is asked: a
    constant vector c·1 has RMS c, so the norm returns c / sqrt(c² + eps) · γ ≈ γ, whether
    the implementation multiplies by `weight` (Llama) or by `1 + weight` (Gemma).
    """
    if isinstance(norm, nn.LayerNorm):
        weight = norm.weight
        return torch.ones(width) if weight is None else weight.detach().float().cpu()
    param = next(norm.parameters(), None)
    device = param.device if param is not None else "cpu"
    # float32 in: both implementations compute in float32 and return at least that.
    probe = torch.full((1, width), 1e3, dtype=torch.float32, device=device)
    with torch.no_grad():
        return norm(probe)[0].float().cpu()


@dataclass(frozen=True)
class Readout:
    """One model's way from a residual-stream direction to logits: its final norm's scale
    and its unembedding, with each token id's text."""

    scale: torch.Tensor  # [d] float32: γ of the final norm
    unembedding: torch.Tensor  # [vocab, d]: the output embedding (lm_head) weight
    tokens: list[str]  # readable text of every token id, len == vocab

    @classmethod
    def of(cls, loaded: LoadedModel) -> Readout:
        """The readout of a loaded model."""
        model = loaded.model
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ConfigError(f"{loaded.name} has no output embedding (lm_head) to read logits")
        # float32 once (a no-op on the CPU's float32 models), not once per chunk.
        weight = head.weight.detach().float()
        scale = norm_scale(final_norm(model), weight.shape[1])
        return cls(scale, weight, token_texts(loaded.tokenizer, weight.shape[0]))

    @property
    def width(self) -> int:
        return int(self.unembedding.shape[1])

    @property
    def vocab(self) -> int:
        return int(self.unembedding.shape[0])

    def effects(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logit effects [n, vocab] of residual directions [n, d] in raw model units."""
        w = self.unembedding
        v = vectors.to(w.device, torch.float32) * self.scale.to(w.device)
        return v @ w.T.to(torch.float32)


def token_texts(tokenizer, vocab: int) -> list[str]:
    """Each token id's text as the tokenizer decodes it alone (" the", "<bos>"); ids past the
    tokenizer's vocabulary (padding rows of an unembedding) read "<id N>"."""
    n = min(len(tokenizer), vocab)
    ids = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        # The Rust tokenizer directly: the same texts, 3x faster on Gemma's 262,144 ids.
        texts = list(backend.decode_batch(ids, skip_special_tokens=False))
    else:
        texts = list(tokenizer.batch_decode(ids))
    return texts + [f"<id {i}>" for i in range(n, vocab)]


def transferred(
    crosscoder: Crosscoder, features: torch.Tensor, source: str, n: int = TRANSFER_N
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-partition transfer of features' `source` decoders into the other model,
    in the crosscoder's units, for many features at once: engine.steering.transfer's
    translation (top-n shared features by cosine, positive cosines only, cosine-weighted
    average of their other-model decoders, rescaled to the input's norm).

    Returns the vectors [len(features), d_target] and a mask of the features that have one
    (a zero decoder, or one with no positively aligned shared feature, has none).
    """
    target = "b" if source == "a" else "a"
    p = crosscoder.partition
    with torch.no_grad():
        src = crosscoder.decoder_matrix(source).float().cpu()
        tgt = crosscoder.decoder_matrix(target).float().cpu()
    shared = torch.arange(p.shared_start, p.n_features)
    out = torch.zeros(len(features), tgt.shape[1])
    ok = torch.zeros(len(features), dtype=torch.bool)
    if len(shared) == 0:
        return out, ok
    # Unit rows; a zero row stays zero (cosine 0), as torch's cosine_similarity gives.
    pool = src[shared] / src[shared].norm(dim=1, keepdim=True).clamp_min(1e-8)
    # Chunks keep the [chunk, n_shared] cosine block small at any dictionary size.
    step = max(1, (32 << 20) // (4 * len(shared)))
    for start in range(0, len(features), step):
        rows = slice(start, start + step)
        v = src[features[rows]]
        norms = v.norm(dim=1)
        top = ((v / norms[:, None].clamp_min(1e-8)) @ pool.T).topk(min(n, len(shared)), dim=1)
        weights = top.values.clamp_min(0.0)  # negative cosines are dropped
        picked = tgt[shared[top.indices]]  # [chunk, n, d_target]
        mixed = torch.einsum("mn,mnd->md", weights, picked)
        mixed /= weights.sum(1, keepdim=True).clamp_min(1e-30)
        mixed_norms = mixed.norm(dim=1)
        good = (weights.sum(1) > 0) & (norms > 0) & (mixed_norms > 0) & torch.isfinite(norms)
        out[rows] = torch.where(good[:, None], mixed * (norms / mixed_norms)[:, None], 0.0)
        ok[rows] = good
    return out, ok


def feature_vectors(
    crosscoder: Crosscoder, normalizer: Normalizer, model: str, transfer_n: int = TRANSFER_N
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every feature's vector in `model`'s raw units that has one: its decoder, or its
    transfer when it is exclusive to the other model. Returns (feature ids, vectors [m, d],
    vector kind per row)."""
    p = crosscoder.partition
    with torch.no_grad():
        dense = crosscoder.decoder_matrix(model).float().cpu()
    owned = p.owned_mask(model).cpu()
    ids = torch.nonzero(owned).flatten()
    vectors = [dense[ids]]
    kinds = [DECODER] * len(ids)
    others = torch.nonzero(~owned).flatten()
    if len(others):
        source = "b" if model == "a" else "a"
        moved, ok = transferred(crosscoder, others, source, transfer_n)
        ids = torch.cat([ids, others[ok]])
        vectors.append(moved[ok])
        kinds += [TRANSFER] * int(ok.sum())
    order = torch.argsort(ids)
    raw = normalizer.to_raw(torch.cat(vectors), model)
    return ids[order], raw[order], [kinds[i] for i in order.tolist()]


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Features per chunk: the float32 logits, the int32 bin indices and the top-k
    temporaries of a [chunk, vocab] block within `chunk_bytes`."""
    return max(1, int(chunk_bytes) // (vocab * 12))


def logit_effects(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    readouts: dict[str, Readout],
    *,
    top: int = TOP,
    bins: int = BINS,
    chunk_bytes: int = CHUNK_BYTES,
    transfer_n: int = TRANSFER_N,
    progress: bool = False,
) -> pd.DataFrame:
    """Every feature's top promoted and suppressed tokens and effect histogram in each
    model of `readouts` ("a", "b"): one row per feature and model (columns COLUMNS)."""
    frames = []
    for model, readout in readouts.items():
        width = crosscoder.d_a if model == "a" else crosscoder.d_b
        if readout.width != width:
            raise ConfigError(
                f"model {model.upper()}'s unembedding reads width {readout.width} but the "
                f"crosscoder's model {model.upper()} has width {width}; load the models the "
                "run was trained on"
            )
        ids, vectors, kinds = feature_vectors(crosscoder, normalizer, model, transfer_n)
        frames.append(
            _effects_frame(readout, model, ids, vectors, kinds, top, bins, chunk_bytes, progress)
        )
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: [] for c in COLUMNS})
    return pd.concat(frames, ignore_index=True).sort_values(
        ["feature_id", "model"], ignore_index=True
    )


def _effects_frame(
    readout: Readout,
    model: str,
    ids: torch.Tensor,
    vectors: torch.Tensor,
    kinds: list[str],
    top: int,
    bins: int,
    chunk_bytes: int,
    progress: bool,
) -> pd.DataFrame:
    """The rows of one model: each vector's logit effects reduced chunk by chunk."""
    k = min(top, readout.vocab)
    step = chunk_rows(readout.vocab, chunk_bytes)
    parts: dict[str, list[np.ndarray]] = {
        c: [] for c in ("up_i", "up_v", "down_i", "down_v", "hist", "lo", "hi")
    }
    with ProgressBar(f"logit effects {model.upper()}", len(ids), progress) as bar:
        for start in range(0, len(ids), step):
            logits = readout.effects(vectors[start : start + step])
            up = logits.topk(k, dim=1)
            down = logits.topk(k, dim=1, largest=False)
            counts, lo, hi = _histograms(logits, bins)
            del logits
            for key, value in (
                ("up_i", up.indices), ("up_v", up.values), ("down_i", down.indices),
                ("down_v", down.values), ("hist", counts), ("lo", lo), ("hi", hi),
            ):  # fmt: skip
                parts[key].append(value.cpu().numpy())
            bar.update(advance=min(step, len(ids) - start))
    if not len(ids):
        return pd.DataFrame({c: [] for c in COLUMNS})
    joined = {key: np.concatenate(value) for key, value in parts.items()}
    return pd.DataFrame(
        {
            "feature_id": ids.numpy().astype(np.int64),
            "model": model,
            "vector": kinds,
            "promoted_ids": list(joined["up_i"].astype(np.int64)),
            "promoted_values": list(joined["up_v"].astype(np.float64)),
            "suppressed_ids": list(joined["down_i"].astype(np.int64)),
            "suppressed_values": list(joined["down_v"].astype(np.float64)),
            "hist_counts": list(joined["hist"].astype(np.int64)),
            "hist_min": joined["lo"].astype(np.float64),
            "hist_max": joined["hi"].astype(np.float64),
        }
    )


def _histograms(logits: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: counts in `bins` equal bins from the row's min to its max, the min, the max."""
    lo, hi = logits.aminmax(dim=1)
    # Just under `bins` per width, so the max lands in the last bin without a clamp; the
    # bin index is (x - lo) * scale truncated, built in one int32 block (the chunk's
    # largest temporary).
    scale = (bins * (1 - 1e-6)) / (hi - lo).clamp_min(1e-30)
    index = torch.addcmul((-lo * scale)[:, None], logits, scale[:, None]).to(torch.int32)
    index += (torch.arange(len(logits), dtype=torch.int32, device=logits.device) * bins)[:, None]
    counts = torch.bincount(index.flatten(), minlength=len(logits) * bins)
    return counts.view(len(logits), bins), lo, hi


def histogram_edges(lo: float, hi: float, bins: int) -> list[float]:
    """The bin edges of a stored histogram (its min, its max and the bin count)."""
    return np.linspace(lo, hi, bins + 1).tolist()


@dataclass(frozen=True)
class RunLogitEffects:
    """A run's logit effects, the token texts they name, and why they are missing if so."""

    frame: pd.DataFrame  # COLUMNS; empty when skipped
    vocab: dict[str, list[str]]  # model -> text of each token id; empty when skipped
    skipped: str | None = None  # why they were not computed (the models are not here)


# What loading a recorded model can raise for a reason outside the analysis.
_LOAD_ERRORS = (UserError, OSError, ImportError, ValueError, RuntimeError)


def run_logit_effects(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    models: PairSpec,
    *,
    loaded: dict[str, LoadedModel] | None = None,
    progress: bool = False,
    **options: Any,
) -> RunLogitEffects:
    """The logit effects of a run whose models `models` records (loaded here, unless given
    in `loaded`); skipped, with the reason, when a model is not recorded or cannot be
    loaded. `options` go to `logit_effects`."""
    readouts = {}
    for side in SIDES:
        model = (loaded or {}).get(side)
        if model is None:
            problem = models.missing(side)
            if problem:
                return _skipped(f"{problem}, so its unembedding is unknown")
            try:
                model = load_model(str(models[side].name))
            except _LOAD_ERRORS as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                return _skipped(f"model {side.upper()} could not be loaded ({first})")
        readouts[side] = Readout.of(model)
        del model  # the readout keeps the unembedding only
    frame = logit_effects(crosscoder, normalizer, readouts, progress=progress, **options)
    return RunLogitEffects(frame, {side: r.tokens for side, r in readouts.items()})


def _skipped(reason: str) -> RunLogitEffects:
    return RunLogitEffects(pd.DataFrame({c: [] for c in COLUMNS}), {}, f"logit effects: {reason}")


def visible_token(text: str) -> str:
    """A token's text with its whitespace made visible (␣ space, ↵ newline, ⇥ tab), so
    " the" and "the" read differently in a table."""
    if not text:
        return "∅"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
