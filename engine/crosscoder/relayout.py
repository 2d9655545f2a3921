"""Changing the partition of a crosscoder in training: features change role, sizes adapt.

A feature's role decides which parameters it has (see `model.py`), so moving a feature
from one partition to another means rebuilding the row tables: the features are laid out
again in block order [A-exclusive | B-exclusive | shared | designated], each keeps the
rows (and Adam moments) of the models it still owns, gains fresh random rows for a model
it newly owns, and loses the rows of a model it no longer owns. The tensors are resized in
place (`param.data = ...`), so the optimiser and anything holding the parameters keep
working.
"""

from __future__ import annotations

import torch

from engine.crosscoder.model import Crosscoder, _random_rows, _row_map
from engine.crosscoder.partition import Partition, Role

ROLE_ORDER = (Role.A_EXCLUSIVE, Role.B_EXCLUSIVE, Role.SHARED, Role.DESIGNATED)


def role_codes(partition: Partition) -> torch.Tensor:
    """Per feature: index of its role in ROLE_ORDER."""
    sizes = [partition.n_a_exclusive, partition.n_b_exclusive]
    sizes += [partition.n_shared, partition.n_designated]
    return torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))


@torch.no_grad()
def relayout(
    model: Crosscoder,
    optimizer: torch.optim.Optimizer,
    new_roles: torch.Tensor,
    fresh: torch.Tensor,
    generator: torch.Generator,
    init_norm: float,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Give every feature the role `new_roles[f]` (an index into ROLE_ORDER).

    Features marked `fresh` restart as new features in their new role: random directions,
    or with `residual` (the reconstruction errors of a batch, per model) the error of an
    example drawn in proportion to its squared error, so they start where the crosscoder
    is worst. A feature
    that keeps its role keeps everything; one that changes role keeps its rows in the
    models it still owns, and the encoder contribution it loses (the other model's, at
    that model's mean activation, its decoder bias) is folded into its encoder bias.
    Returns `order`: new feature i was feature order[i] before, for the caller's own
    per-feature state.
    """
    if model.partition.n_designated or int((new_roles == 3).sum()):
        raise ValueError("designated-shared (DSF) features cannot change partition")
    old = model.partition
    old_rows = {"a": model.rows_in_a.clone(), "b": model.rows_in_b.clone()}
    order = torch.sort(new_roles.cpu(), stable=True).indices
    counts = torch.bincount(new_roles.cpu(), minlength=4).tolist()
    new = Partition(*counts)
    new_rows = {"a": _row_map(new, "a"), "b": _row_map(new, "b")}
    fresh = fresh.cpu()[order]
    fold = _lost_encoder_input(model, old_rows, new_rows, order)
    picks = _draw_examples(residual, int(fresh.sum()), generator) if residual else None
    for name in ("a", "b"):
        # Row of the new table <- row of the old table, -1 where the row starts fresh.
        owned = new_rows[name] >= 0
        source = old_rows[name].cpu()[order][owned]
        source[fresh[owned]] = -1
        enc, dec = (model.w_enc_a, model.w_dec_a) if name == "a" else (model.w_enc_b, model.w_dec_b)
        start = _random_rows(int(owned.sum()), dec.shape[1], init_norm, generator)
        if picks is not None:
            error = residual[0 if name == "a" else 1][picks[owned[fresh]]].float().cpu()
            scale = init_norm / error.norm(dim=1, keepdim=True).clamp_min(1e-12)
            start[fresh[owned]] = error * scale
        _rebuild(optimizer, dec, source, start)
        _rebuild(optimizer, enc, source, start)
    keep = torch.where(fresh, -1, torch.arange(old.n_features)[order])
    _rebuild(optimizer, model.b_enc, keep, torch.zeros(new.n_features))
    model.b_enc += fold.to(model.b_enc.device) * (~fresh).to(model.b_enc.device)
    model.threshold.copy_(model.threshold[order.to(model.threshold.device)])
    model.partition = new
    model.rows_in_a = new_rows["a"].to(model.rows_in_a.device)
    model.rows_in_b = new_rows["b"].to(model.rows_in_b.device)
    return order


def _lost_encoder_input(
    model: Crosscoder,
    old_rows: dict[str, torch.Tensor],
    new_rows: dict[str, torch.Tensor],
    order: torch.Tensor,
) -> torch.Tensor:
    """Per new feature: encoder input from a model it no longer reads, at that model's mean."""
    fold = torch.zeros(order.numel())
    for name, enc, mean in (
        ("a", model.w_enc_a, model.b_dec_a),
        ("b", model.w_enc_b, model.b_dec_b),
    ):
        before = old_rows[name].cpu()[order]
        lost = (before >= 0) & (new_rows[name] < 0)
        if lost.any():
            fold[lost] = (enc[before[lost].to(enc.device)] @ mean).float().cpu()
    return fold


def _draw_examples(
    residual: tuple[torch.Tensor, torch.Tensor], n: int, generator: torch.Generator
) -> torch.Tensor:
    """`n` example indices drawn in proportion to their squared reconstruction error."""
    weight = (residual[0].float().pow(2).sum(1) + residual[1].float().pow(2).sum(1)).cpu()
    if n == 0 or not bool((weight > 0).any()):
        return torch.zeros(n, dtype=torch.long)
    replace = n > int((weight > 0).sum())
    return torch.multinomial(weight, n, replacement=replace, generator=generator)


def _rebuild(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, source: torch.Tensor, start: torch.Tensor
) -> None:
    """param <- rows param[source] (rows `start` where source is -1), Adam moments likewise."""
    kept = source >= 0
    idx = source[kept].to(param.device)
    mask = kept.to(param.device)
    value = start.to(param.device, param.dtype).clone()
    value[mask] = param.data[idx]
    param.data = value
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            moment = torch.zeros_like(value)
            moment[mask] = state[key][idx]
            state[key] = moment


def resize(model: Crosscoder, optimizer: torch.optim.Optimizer, partition: Partition) -> None:
    """Give a crosscoder the block sizes of `partition`, with fresh parameters (for loading
    a checkpoint whose partition sizes adapted during training)."""
    if partition.n_features != model.partition.n_features:
        raise ValueError(
            f"cannot resize {model.partition.n_features} features to {partition.n_features}"
        )
    everything = torch.ones(partition.n_features, dtype=torch.bool)
    relayout(model, optimizer, role_codes(partition), everything, torch.Generator(), 1.0)
