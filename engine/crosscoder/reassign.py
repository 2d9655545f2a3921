"""Moving lopsided shared features into the exclusive partition of the model they serve.

Why: a concept only model A has is cheaper for a *shared* feature to learn than for an
A-exclusive one. The shared feature reconstructs A's concept and, with its B decoder, B's
mean activation on the same tokens; that is a real (if small) reduction of B's error,
and BatchTopK ranks it by the sum of both decoder norms. So the shared partition wins the
concept, its B decoder shrinks to 10-20% of its norm, and the exclusive partition starves.

The fix here is explicit: every few hundred steps, a live shared feature whose relative
decoder norm has stayed beyond a bound (> `high`: A-leaning, < `low`: B-leaning) at two
consecutive checks takes the place of a dead feature of the matching exclusive partition.
It keeps its own-model encoder row, decoder row and bias (and their optimiser moments);
its other-model decoder is dropped, and the encoder contribution of the other model is
folded into the bias at that model's mean. The shared slot it leaves is re-initialised as
a fresh dead feature, which AuxK then trains like any other dead feature.

With adaptive partitions (`adapt`, the default) no dead slot is needed: the moving feature
changes role in place, and exclusive features that have died go back to the shared block
as fresh features. The partitions then end at the sizes the data asked for, instead of a
B-exclusive block that is 80-90% dead on a pair where B has few concepts of its own.

Only replicated state (parameters, global firing counters) drives the decisions, so every
rank of a distributed run makes the same moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.partition import Role
from engine.crosscoder.relayout import ROLE_ORDER, relayout, role_codes

_NONE, _A_LEANING, _B_LEANING = 0, 1, 2


@dataclass
class Moves:
    """Features moved by one reassignment pass."""

    to_a: int = 0
    to_b: int = 0
    recycled: int = 0  # dead exclusive features given back to the shared block (adapt)
    swapped: int = 0  # moved-in features sent back to shared for more lopsided ones (adapt)


def leaning(
    model: Crosscoder, low: float, high: float, rel: torch.Tensor | None = None
) -> torch.Tensor:
    """Per feature: 1 where a shared feature leans to A (rel. norm > high), 2 to B (< low).

    `rel` is the model's relative decoder norm when the caller has it already."""
    rel = model.relative_decoder_norm() if rel is None else rel
    label = torch.zeros(rel.shape, dtype=torch.int8, device=rel.device)
    shared = model.partition.block(Role.SHARED)
    label[shared][rel[shared] > high] = _A_LEANING
    label[shared][rel[shared] < low] = _B_LEANING
    return label


@torch.no_grad()
def reassign(
    model: Crosscoder,
    optimizer: torch.optim.Optimizer,
    since_fired: torch.Tensor,
    previous: torch.Tensor,
    dead_window: int,
    low: float,
    high: float,
    generator: torch.Generator,
    init_norm: float,
    min_lean: float = 0.0,
) -> tuple[Moves, torch.Tensor]:
    """Move persistently lopsided live shared features into dead exclusive slots.

    `previous` is the leaning label of every feature at the last check; returns the moves
    made and the labels to pass as `previous` next time. Only features whose lean
    (max(rel, 1 - rel)) is at least `min_lean` move.
    """
    p = model.partition
    rel = model.relative_decoder_norm()
    current = leaning(model, low, high, rel)
    moves = Moves()
    if not (p.n_a_exclusive or p.n_b_exclusive):
        return moves, current
    live = since_fired < dead_window
    dead = ~live
    for role, tag, model_name in (
        (Role.A_EXCLUSIVE, _A_LEANING, "a"),
        (Role.B_EXCLUSIVE, _B_LEANING, "b"),
    ):
        block = p.block(role)
        candidates = _candidates(current, previous, live, rel, tag, min_lean)
        slots = torch.nonzero(dead[block]).squeeze(1) + block.start
        n = min(candidates.numel(), slots.numel())
        if n == 0:
            continue
        chosen = candidates[:n]
        for shared_id, slot in zip(chosen.tolist(), slots[:n].tolist(), strict=True):
            _move(model, optimizer, shared_id, slot, model_name)
            since_fired[slot] = since_fired[shared_id]
            _reinitialise(model, optimizer, shared_id, generator, init_norm)
            since_fired[shared_id] = dead_window  # a fresh dead feature, for AuxK
            current[shared_id] = _NONE
        if model_name == "a":
            moves.to_a = n
        else:
            moves.to_b = n
    return moves, current


def _candidates(
    current: torch.Tensor,
    previous: torch.Tensor,
    live: torch.Tensor,
    rel: torch.Tensor,
    tag: int,
    min_lean: float = 0.0,
) -> torch.Tensor:
    """Live features leaning the `tag` way at this check and the last (and now by at least
    `min_lean`), the most lopsided first: they are the surest exclusive concepts."""
    lean = rel if tag == _A_LEANING else 1 - rel
    mask = (current == tag) & (previous == tag) & live & (lean >= min_lean)
    candidates = torch.nonzero(mask).squeeze(1)
    order = rel[candidates].argsort(descending=tag == _A_LEANING)
    return candidates[order]


def _move(
    model: Crosscoder, optimizer: torch.optim.Optimizer, shared_id: int, slot: int, own: str
) -> None:
    """Copy a shared feature's own-model parameters (and Adam moments) into `slot`."""
    other = "b" if own == "a" else "a"
    src_own, dst_own = _row(model, own, shared_id), _row(model, own, slot)
    enc_own, dec_own = _tables(model, own)
    enc_other, _ = _tables(model, other)
    b_dec_other = model.b_dec_b if other == "b" else model.b_dec_a
    # The other model's encoder input is gone; at its mean activation (its decoder bias,
    # initialised there) it contributed this much to the pre-activation.
    fold = enc_other[_row(model, other, shared_id)] @ b_dec_other
    for table in (enc_own, dec_own):
        _copy_row(optimizer, table, src_own, dst_own)
    _copy_row(optimizer, model.b_enc, shared_id, slot)
    model.b_enc[slot] += fold


def _reinitialise(
    model: Crosscoder,
    optimizer: torch.optim.Optimizer,
    feature: int,
    generator: torch.Generator,
    init_norm: float,
) -> None:
    """Give a shared feature fresh random decoders (encoders their copies), zero bias."""
    for name in ("a", "b"):
        row = _row(model, name, feature)
        enc, dec = _tables(model, name)
        direction = torch.randn(dec.shape[1], generator=generator).to(dec.device, dec.dtype)
        direction *= init_norm / direction.norm().clamp_min(1e-12)
        dec[row] = direction
        enc[row] = direction
        _zero_moments(optimizer, dec, row)
        _zero_moments(optimizer, enc, row)
    model.b_enc[feature] = 0.0
    _zero_moments(optimizer, model.b_enc, feature)


def _row(model: Crosscoder, name: str, feature: int) -> int:
    row = int((model.rows_in_a if name == "a" else model.rows_in_b)[feature])
    if row < 0:
        raise ValueError(f"feature {feature} has no parameters in model {name.upper()}")
    return row


def _tables(model: Crosscoder, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(encoder, decoder) row tables of one model."""
    return (model.w_enc_a, model.w_dec_a) if name == "a" else (model.w_enc_b, model.w_dec_b)


def _copy_row(optimizer: torch.optim.Optimizer, param: torch.Tensor, src: int, dst: int) -> None:
    """param[dst] = param[src], and the same for its Adam moments."""
    param[dst] = param[src]
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dst] = state[key][src]


def _zero_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, row: int) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][row] = 0


@torch.no_grad()
def adapt(
    model: Crosscoder,
    optimizer: torch.optim.Optimizer,
    since_fired: torch.Tensor,
    previous: torch.Tensor,
    dead_window: int,
    low: float,
    high: float,
    generator: torch.Generator,
    init_norm: float,
    capacity: tuple[int, int],
    recycle_after: float | None = None,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    lean_at_move: torch.Tensor | None = None,
    swap_margin: float | None = None,
    min_lean: float = 0.0,
) -> tuple[Moves, torch.Tensor, torch.Tensor | None]:
    """Adaptive partitions: exclusive features that have not fired for `recycle_after`
    tokens (default: the dead window) return to the shared block as fresh features, and
    lopsided shared features change role while their exclusive partition is below
    `capacity` (its configured size: A, B). With `residual` (a batch's reconstruction
    errors per model) recycled features start from the errors of badly reconstructed
    examples instead of random directions.

    With `swap_margin`, a full partition also swaps: its live member that was least
    lopsided when it moved in (`lean_at_move`: max(rel, 1 - rel) at that time, 1 for
    features that started exclusive) goes back to the shared block, keeping its own-model
    rows and gaining fresh rows for the other model, when a candidate leans more by the
    margin. Slots filled early by whatever leant first then pass to the concepts that turn
    out most exclusive (a planted concept's other-model decoder shrinks slowly). The
    caller's `lean_at_move` is updated and reordered in place. Only candidates whose lean
    is at least `min_lean` move.

    Returns the moves, the leaning labels for the next check, and the new feature order
    (new feature i was feature order[i]; None when nothing changed) for the caller's own
    per-feature state. An exclusive partition keeps at least one feature, so a DFC stays
    a DFC.
    """
    p = model.partition
    rel = model.relative_decoder_norm()
    current = leaning(model, low, high, rel)
    moves = Moves()
    if not (p.n_a_exclusive or p.n_b_exclusive):
        return moves, current, None
    roles = role_codes(p).to(since_fired.device)
    fresh = torch.zeros_like(roles, dtype=torch.bool)
    live = since_fired < dead_window
    shared = ROLE_ORDER.index(Role.SHARED)
    for role, tag, cap in (
        (Role.A_EXCLUSIVE, _A_LEANING, capacity[0]),
        (Role.B_EXCLUSIVE, _B_LEANING, capacity[1]),
    ):
        block = p.block(role)
        if cap == 0:
            continue  # the user asked for no features of this kind
        dead = torch.zeros_like(fresh)
        dead[block] = since_fired[block] >= (recycle_after or dead_window)
        candidates = _candidates(current, previous, live, rel, tag, min_lean)
        n_move = min(candidates.numel(), cap - (block.stop - block.start - int(dead.sum())))
        movers = candidates[: max(n_move, 0)]
        if n_move <= 0 and int(dead.sum()) == block.stop - block.start:
            dead[torch.nonzero(dead).squeeze(1)[0]] = False  # keep one
        lean = rel if tag == _A_LEANING else 1 - rel
        swapped = torch.empty(0, dtype=torch.long, device=rel.device)
        if swap_margin is not None and swap_margin < 0.5 and lean_at_move is not None:
            members = torch.nonzero(~dead[block]).squeeze(1) + block.start
            movers, swapped = _swaps(
                movers, candidates[movers.numel() :], members, lean, lean_at_move, swap_margin
            )
            roles[swapped] = shared
            current[swapped] = _NONE
            moves.swapped += swapped.numel()
        if lean_at_move is not None:
            lean_at_move[movers] = lean[movers].to(lean_at_move.dtype)
        roles[movers] = ROLE_ORDER.index(role)
        roles[dead] = shared
        fresh |= dead
        current[movers] = _NONE
        if role is Role.A_EXCLUSIVE:
            moves.to_a = movers.numel()
        else:
            moves.to_b = movers.numel()
        moves.recycled += int(dead.sum())
    if not (moves.to_a or moves.to_b or moves.recycled):
        return moves, current, None
    order = relayout(model, optimizer, roles.cpu(), fresh.cpu(), generator, init_norm, residual)
    order = order.to(since_fired.device)
    since_fired.copy_(torch.where(fresh[order], dead_window, since_fired[order]))
    if lean_at_move is not None:
        lean_at_move.copy_(lean_at_move[order])
    return moves, current[order], order


def _swaps(
    movers: torch.Tensor,
    waiting: torch.Tensor,
    members: torch.Tensor,
    lean: torch.Tensor,
    lean_at_move: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(movers plus the candidates that swap in, the members they replace): the most
    lopsided waiting candidates take the places of the members that leant least when they
    moved in, while a candidate leans more than its member by `margin`."""
    if not (waiting.numel() and members.numel()):
        return movers, members[:0]
    weakest = members[lean_at_move[members].argsort()]  # least lopsided first
    n = min(waiting.numel(), weakest.numel())
    gain = lean[waiting[:n]].to(lean_at_move.dtype) - lean_at_move[weakest[:n]]
    n_swap = int((gain > margin).sum())  # waiting descends, weakest ascends: a prefix
    return torch.cat([movers, waiting[:n_swap]]), weakest[:n_swap]
