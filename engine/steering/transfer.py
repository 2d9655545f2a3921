"""Steering-vector transfer through a crosscoder's shared features (paper B.4.5).

A vector in the source model is matched (by cosine) against the source-model decoders of
the shared features, and rebuilt in the target model as the cosine-weighted average of
the same features' target-model decoders, rescaled to the input's norm.

Units: with a normalizer, the input is in the source model's raw units and the output is
in the target model's raw units; the norm is matched in the crosscoder's normalised
space, where both models' median activation norms are equal. A vector that is 10% of
model A's typical activation norm thus becomes 10% of model B's, which is what keeps a
steering strength meaningful across models whose raw scales differ. Without a
normalizer everything is in the crosscoder's units and the norms match exactly (eq. 17).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.files import load_pickled_tensors

MODELS = ("a", "b")
VECTOR_SUFFIXES = (".safetensors", ".pt", ".npy")


@dataclass(frozen=True)
class TransferResult:
    """A vector translated into the target model and the shared features it was built from."""

    vector: torch.Tensor
    features: list[int]
    weights: list[float]


def transfer(
    crosscoder: Crosscoder,
    vector: torch.Tensor,
    source: str,
    n: int = 10,
    normalizer: Normalizer | None = None,
) -> TransferResult:
    """Translate `vector` from model `source` into the other model via shared features."""
    target = other_model(source)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (features to average) must be a positive int, got {n!r}")
    decoders = crosscoder.decoder_matrix(source)
    width = crosscoder.d_a if source == "a" else crosscoder.d_b
    v = as_vector(vector, width, source).to(decoders.device, torch.float32)
    if normalizer is not None:
        v = v * _scale(normalizer, source)
    norm = v.norm()
    if not torch.isfinite(v).all() or norm == 0:
        raise ValueError("cannot transfer a zero or non-finite vector")
    ids, weights = _top_shared(crosscoder, decoders, v, n, source)
    mixed = weights @ crosscoder.decoder_matrix(target)[ids] / weights.sum()
    if mixed.norm() == 0:
        raise ValueError(f"the selected features have zero decoders in model {target.upper()}")
    out = mixed * (norm / mixed.norm())
    if normalizer is not None:
        out = normalizer.to_raw(out, target)
    return TransferResult(out, ids.tolist(), weights.tolist())


def shared_features(crosscoder: Crosscoder) -> torch.Tensor:
    """Global ids of the features both models decode: shared plus designated-shared."""
    p = crosscoder.partition
    return torch.arange(p.shared_start, p.n_features)


def _top_shared(
    crosscoder: Crosscoder, decoders: torch.Tensor, v: torch.Tensor, n: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n shared features by cosine with `v`, keeping only positive cosines."""
    ids = shared_features(crosscoder).to(decoders.device)
    # A zero decoder (dead feature) gets cosine 0 thanks to the eps, so it is never chosen.
    cos = F.cosine_similarity(decoders[ids], v[None], dim=1)
    top = cos.topk(min(n, ids.numel()))
    # A negative cosine would subtract an anti-aligned concept from an "average"; such
    # features say nothing about the vector's direction, so they are dropped.
    keep = top.values > 0
    if not keep.any():
        raise ValueError(
            f"no shared feature's model {source.upper()} decoder points along the vector "
            f"(largest cosine {top.values.max().item():.3g} <= 0); the vector is outside "
            f"what the crosscoder's shared dictionary represents, so it cannot be transferred"
        )
    return ids[top.indices[keep]], top.values[keep]


def other_model(source: str) -> str:
    """The model that is not `source` ('a' <-> 'b')."""
    if source not in MODELS:
        raise ConfigError(f"source model must be 'a' or 'b', got {source!r}")
    return "b" if source == "a" else "a"


def _scale(normalizer: Normalizer, model: str) -> float:
    return normalizer.scale_a if model == "a" else normalizer.scale_b


def as_vector(vector: torch.Tensor, width: int, model: str) -> torch.Tensor:
    """`vector` as a 1-D tensor of `width` (a [1, width] row is accepted too)."""
    if not torch.is_tensor(vector):
        raise ConfigError(f"expected a tensor, got {type(vector).__name__}")
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.shape != (width,):
        raise ConfigError(
            f"a model {model.upper()} vector must have shape ({width},), got "
            f"{tuple(vector.shape)}; check that the vector was taken from the same model "
            f"and layer the crosscoder was trained on"
        )
    return vector


def load_vector(path: str | Path, width: int | None = None, model: str = "a") -> torch.Tensor:
    """Read a steering vector from .safetensors (one tensor or key 'vector'), .pt or .npy."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"steering vector file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise ConfigError(
            f"cannot read {path}: expected one of {', '.join(VECTOR_SUFFIXES)} "
            f"(save the vector with safetensors, torch.save or numpy.save)"
        )
    try:
        vector = _READERS[suffix](path)
    except ConfigError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path} is not a readable {suffix} file ({err})") from None
    vector = vector.float()
    if width is None:
        if vector.ndim == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.ndim != 1:
            raise ConfigError(f"{path} holds shape {tuple(vector.shape)}, expected a 1-D vector")
        return vector
    return as_vector(vector, width, model)


def _read_safetensors(path: Path) -> torch.Tensor:
    tensors = load_file(str(path))
    if "vector" in tensors:
        return tensors["vector"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ConfigError(
        f"{path} holds tensors {sorted(tensors)}; store the steering vector under the key "
        f"'vector' or save it alone"
    )


def _read_pt(path: Path) -> torch.Tensor:
    # A .pt file from elsewhere must not be able to run code when loaded.
    obj = load_pickled_tensors(path, ConfigError)
    if isinstance(obj, dict) and "vector" in obj:
        obj = obj["vector"]
    if not torch.is_tensor(obj):
        raise ConfigError(
            f"{path} holds a {type(obj).__name__}, expected a tensor or a dict with key 'vector'"
        )
    return obj


def _read_npy(path: Path) -> torch.Tensor:
    array = np.load(path, allow_pickle=False)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


_READERS = {".safetensors": _read_safetensors, ".pt": _read_pt, ".npy": _read_npy}
