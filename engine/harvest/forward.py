"""Running both models over windows: each model with its captured layer, and the batched
forward passes that give the activations at a window's aligned positions.

The harvest (engine.harvest.pipeline) writes these activations to a store; streaming
training (engine.streaming) trains on them directly. Both use the functions here, so a
streamed pair is computed exactly as a harvested one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.activations.shards import WindowRecord
from engine.config import HarvestConfig
from engine.harvest.windows import Side, side
from engine.models.layers import resolve_layer
from engine.models.loading import LoadedModel, load_model


@dataclass
class CapturedModel:
    """A loaded model with its captured layer and window tokenization."""

    loaded: LoadedModel
    layer: int
    side: Side
    capture: Callable[..., torch.Tensor]


def prepare(loaded: LoadedModel, layer: int | str, capture: Callable) -> CapturedModel:
    """`loaded` ready to capture block `layer` (an index, negative index or "middle")."""
    return CapturedModel(
        loaded, resolve_layer(loaded.n_layers, layer), side(loaded.tokenizer), capture
    )


def rank_device(device: str, rank: int = 0, world_size: int = 1) -> str:
    """The device of one rank: under torchrun, 'auto' and 'cuda' mean the rank's own GPU."""
    if world_size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % torch.cuda.device_count()}"


def load(spec: str, cfg: HarvestConfig, device: str, progress: bool) -> LoadedModel:
    """Load one model, saying what was loaded when progress is shown."""
    loaded = load_model(spec, device=device, dtype=cfg.model_dtype)
    if progress:
        print(
            f"loaded {spec}: {type(loaded.model).__name__}, {loaded.n_layers} layers, "
            f"d {loaded.d_model}, {loaded.dtype} on {loaded.device} "
            f"({loaded.load_seconds:.1f} s)",
            file=sys.stderr,
        )
    return loaded


def load_pair(
    cfg: HarvestConfig, progress: bool, rank: int = 0, world_size: int = 1
) -> tuple[LoadedModel, LoadedModel]:
    """Models A and B of `cfg`, on this rank's device."""
    device = rank_device(cfg.device, rank, world_size)
    return load(cfg.model_a, cfg, device, progress), load(cfg.model_b, cfg, device, progress)


def chunk_budget(batch_tokens: int) -> int:
    """Tokens of the windows run together: about two batches per model, so that sorting
    them by length saves padding."""
    return 4 * batch_tokens


def window_activations(
    windows: Sequence[WindowRecord], a: CapturedModel, b: CapturedModel, batch_tokens: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both models' activations [pairs, d] (float32, CPU) at each window's aligned pairs."""
    acts_a = activations(a, [w.ids_a for w in windows], [w.pos_a for w in windows], batch_tokens)
    acts_b = activations(b, [w.ids_b for w in windows], [w.pos_b for w in windows], batch_tokens)
    return acts_a, acts_b


def activations(
    m: CapturedModel, ids: list, positions: list, batch_tokens: int
) -> list[torch.Tensor]:
    """Activations at `positions` of each sequence, from length-sorted padded batches."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    model = m.loaded.model
    pad = m.loaded.tokenizer.pad_token_id or 0
    lo = 0
    while lo < len(order):
        # Grow the batch while its padded size stays within batch_tokens.
        hi = lo + 1
        while hi < len(order) and (hi + 1 - lo) * len(ids[order[hi]]) <= batch_tokens:
            hi += 1
        batch = order[lo:hi]
        width = len(ids[batch[-1]])
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.as_tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        device = m.loaded.device
        hidden = m.capture(model, m.layer, input_ids.to(device), mask.to(device))
        for row, i in enumerate(batch):
            out[i] = hidden[row, torch.as_tensor(positions[i], device=device)].float().cpu()
        lo = hi
    return out  # type: ignore[return-value]
