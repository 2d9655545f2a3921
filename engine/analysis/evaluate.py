"""CE loss recovered: each model's next-token loss with the crosscoder's reconstruction
spliced in at the captured layer, against the clean model and the layer zero-ablated.

On windows of the activation store the run held out of training (crosscoder.json
"validation"), for each model m and window:

1. encode the window's stored pairs with the crosscoder's inference path (the learned
   threshold: one token at a time, no batch), and decode m's reconstruction in raw units;
2. run m on the window's own input tokens (stored in the shard, so nothing is
   re-tokenised) three times: clean; with the block's output at every spliced position
   replaced by the reconstruction; with it replaced by zeros;
3. average the next-token cross-entropy of the predictions made at the spliced positions.

The spliced positions are the window's aligned pairs, which the harvest already keeps off
position 0 and the prefix (BOS, chat-template) tokens; pairs whose raw norm exceeds the
run's `outlier_factor` x the store's median norm in either model (the outliers training
masks) are left clean and not counted. CE loss recovered = (CE_ablated - CE_spliced) /
(CE_ablated - CE_clean): 1 when splicing costs nothing, 0 when it is as bad as erasing the
layer. The same pass reports the FVE of the inference-path reconstruction on those pairs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.defaults import EVALUATION_WINDOWS
from engine.errors import UserError
from engine.files import atomic_write_text
from engine.specs import SIDES, PairSpec

EVALUATION_FILE = "evaluation.json"
DEFAULT_WINDOWS = EVALUATION_WINDOWS


class EvaluationError(UserError, ValueError):
    """The run and store cannot be evaluated as asked."""


@dataclass
class WindowPairs:
    """One held-out window: each model's input tokens, the spliced positions, and the
    crosscoder's raw-unit reconstruction and the stored activation at each of them."""

    index: int
    ids: dict[str, torch.Tensor]  # model -> [t] input tokens
    positions: dict[str, torch.Tensor]  # model -> [k] spliced positions
    recon: dict[str, torch.Tensor]  # model -> [k, d] reconstruction (raw units)
    stored: dict[str, torch.Tensor]  # model -> [k, d] stored activations (raw units)


def evaluate(
    run_dir: str | Path,
    store: str | Path,
    *,
    max_windows: int = DEFAULT_WINDOWS,
    models: dict[str, Any] | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    allow_trained: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Measure CE loss recovered for both models on up to `max_windows` held-out windows
    and write it to `out` (default `<run_dir>/evaluation.json`); returns what was written.

    `models` (side -> LoadedModel) skips loading the run's models; `allow_trained` lets a
    run that held nothing out be measured on its first windows (training text, flagged).
    """
    from engine.activations import ActivationStore
    from engine.crosscoder.checkpoint import check_models, load_crosscoder, trained_on

    if max_windows <= 0:
        raise EvaluationError(f"max_windows must be a positive integer, got {max_windows}")
    run_dir = Path(run_dir)
    started = time.perf_counter()
    crosscoder, normalizer, header = load_crosscoder(run_dir)
    acts = ActivationStore(store)
    pair = PairSpec.from_dict(acts.manifest.get("models"))
    check_models(
        trained_on(crosscoder), pair, f"the store {store}", "give the store the run trained on"
    )
    windows, held_out = _windows(header, acts, max_windows, allow_trained)
    factor = (header.get("train_config") or {}).get("outlier_factor")
    pairs = list(_window_pairs(acts, windows, crosscoder, normalizer, factor))
    result: dict[str, Any] = {
        "store": str(Path(store).resolve()),
        "held_out": held_out,
        "windows": [w.index for w in pairs],
        "encoding": "threshold",
        "outlier_factor": factor,
        "models": {},
    }
    for side in SIDES:
        loaded = (models or {}).get(side)
        if loaded is None:
            from engine.models.loading import load_model

            spec = pair.require(side, EvaluationError)
            if progress:
                progress(f"loading model {side.upper()} ({spec.name})")
            loaded = load_model(spec.name, device=device)
        layer = pair.layer(side, EvaluationError)
        if progress:
            progress(f"model {side.upper()}: 3 passes over {len(pairs)} windows")
        result["models"][side] = model_ce(loaded.model, layer, pairs, side)
    result["seconds"] = round(time.perf_counter() - started, 1)
    target = Path(out) if out is not None else run_dir / EVALUATION_FILE
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
    return result


def read_evaluation(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The evaluation.json of a run directory, or None where there is none."""
    if not run_dir:
        return None
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary(result: dict[str, Any]) -> str:
    """One line per model: CE clean / spliced / ablated and the fraction recovered."""
    where = "held-out" if result.get("held_out") else "TRAINING (not held-out)"
    lines = [f"CE loss recovered on {len(result['windows'])} {where} windows:"]
    for side, m in result["models"].items():
        recovered = m["ce_loss_recovered"]
        recovered = "undefined" if recovered is None else f"{recovered:.3f}"
        lines.append(
            f"  model {side.upper()}: {recovered} (CE clean {m['ce_clean']:.3f}, "
            f"spliced {m['ce_spliced']:.3f}, ablated {m['ce_ablated']:.3f}; "
            f"{m['tokens']:,} tokens; FVE {m['fve']:.3f})"
        )
    return "\n".join(lines)


# -- windows and reconstructions ---------------------------------------------------------


def _windows(header: dict, acts, max_windows: int, allow_trained: bool) -> tuple[list[int], bool]:
    """The windows to evaluate on and whether they were held out of training."""
    from engine.activations.split import store_identity

    validation = header.get("validation") or {}
    if validation.get("unit") == "windows" and validation.get("windows"):
        recorded = (validation.get("store") or {}).get("created")
        if recorded is not None and recorded != store_identity(acts)["created"]:
            raise EvaluationError(
                f"the run held out windows of the store at {validation['store'].get('path')} "
                f"(created {recorded}), not of {acts.path}; give the store the run trained on"
            )
        return [int(w) for w in validation["windows"][:max_windows]], True
    if not allow_trained:
        raise EvaluationError(
            "the run held no windows of its store out of training (trained with "
            "validation_pairs = 0, on a pairs file, or before validation existed); retrain "
            "it, or pass --allow-trained to measure on training windows"
        )
    first = []
    for record in acts.shards:
        for lo, hi in record.get("windows", []):
            first.extend(range(int(lo), int(hi)))
    return sorted(first)[:max_windows], False


def _window_pairs(acts, windows: list[int], crosscoder, normalizer, factor):
    """WindowPairs of `windows`, shard by shard."""
    median = acts.median_norms()
    device = crosscoder.b_enc.device
    wanted = set(windows)
    for i, record in enumerate(acts.shards):
        if not any(lo <= w < hi for lo, hi in record.get("windows", []) for w in wanted):
            continue
        t = acts.load_shard(i)
        for w, index in enumerate(t["window_index"].tolist()):
            if index not in wanted:
                continue
            rows = t["pair_window"] == index
            x = {"a": t["a"][rows].float(), "b": t["b"][rows].float()}
            keep = torch.isfinite(x["a"]).all(1) & torch.isfinite(x["b"]).all(1)
            if factor is not None:
                for side, m in zip(SIDES, median, strict=True):
                    keep &= x[side].norm(dim=1) <= factor * m
            x = {s: v[keep] for s, v in x.items()}
            with torch.no_grad():
                x_a, x_b = normalizer.apply(x["a"].to(device), x["b"].to(device))
                r_a, r_b = crosscoder(x_a, x_b)
            recon = {"a": r_a.cpu() / normalizer.scale_a, "b": r_b.cpu() / normalizer.scale_b}
            ids, positions = {}, {}
            for col, side in enumerate(SIDES):
                lo, hi = t[f"ptr_{side}"][w].item(), t[f"ptr_{side}"][w + 1].item()
                ids[side] = t[f"ids_{side}"][lo:hi].long()
                positions[side] = t["pair_pos"][rows][keep][:, col].long()
            yield WindowPairs(index, ids, positions, recon, x)


# -- splicing ------------------------------------------------------------------------------


def model_ce(model: nn.Module, layer: int, windows: list[WindowPairs], side: str) -> dict:
    """CE clean / spliced / ablated over the windows' spliced positions, CE loss
    recovered, the reconstruction's FVE and how far the live activations are from the
    stored ones (a check that the store and model match)."""
    totals = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    tokens, sse, total_sq, drift, stored_sq = 0, 0.0, 0.0, 0.0, 0.0
    sum_x, rows = None, 0
    for win in windows:
        ids, pos = win.ids[side], win.positions[side]
        targets_at = pos[pos + 1 < ids.numel()]
        if targets_at.numel() == 0:
            continue
        recon = win.recon[side][pos + 1 < ids.numel()]
        stored = win.stored[side][pos + 1 < ids.numel()]
        clean, live = spliced_ce(model, layer, ids, targets_at, None)
        totals["clean"] += clean
        totals["spliced"] += spliced_ce(model, layer, ids, targets_at, recon)[0]
        totals["ablated"] += spliced_ce(model, layer, ids, targets_at, torch.zeros_like(recon))[0]
        tokens += targets_at.numel()
        drift += float((live - stored).double().pow(2).sum())
        stored_sq += float(stored.double().pow(2).sum())
        sse += float((stored - recon).double().pow(2).sum())
        total_sq += float(stored.double().pow(2).sum())
        s = stored.double().sum(0)
        sum_x = s if sum_x is None else sum_x + s
        rows += stored.shape[0]
    if tokens == 0:
        raise EvaluationError("the evaluated windows have no spliced position with a next token")
    ce = {k: v / tokens for k, v in totals.items()}
    variance = total_sq - float(sum_x.pow(2).sum()) / rows
    gap = ce["ablated"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_ablated": ce["ablated"],
        # Undefined (None) where ablating the layer does not raise the loss.
        "ce_loss_recovered": (ce["ablated"] - ce["spliced"]) / gap if gap > 0 else None,
        "tokens": tokens,
        "fve": 1 - sse / max(variance, 1e-12),
        "store_drift": math.sqrt(drift / max(stored_sq, 1e-12)),
    }


def spliced_ce(
    model: nn.Module,
    layer: int,
    ids: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor | None,
) -> tuple[float, torch.Tensor]:
    """Summed next-token CE of the predictions at `positions` with block `layer`'s output
    there replaced by `values` (None: the clean run); also the block's output at
    `positions` before any replacement."""
    from engine.models.layers import decoder_layers, resolve_layer

    layers = decoder_layers(model)
    block = layers[resolve_layer(len(layers), layer)]
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        # Blocks return a tensor (transformers 5) or a tuple led by the hidden state.
        hidden = output[0] if isinstance(output, tuple | list) else output
        seen.append(hidden[0, positions.to(hidden.device)].detach().float().cpu())
        if values is None:
            return None
        hidden = hidden.clone()
        hidden[0, positions.to(hidden.device)] = values.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple | list) else hidden

    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
    finally:
        handle.remove()
    targets = ids[positions + 1].to(logits.device)
    loss = F.cross_entropy(logits[positions.to(logits.device)].float(), targets, reduction="sum")
    return float(loss), seen[0]
