"""Trigger tokens of the embedding planting: which tokens carry the concept, and which pairs.

A pair is a trigger pair when the planted model's token at its aligned position is one of
the trigger tokens. Tokens are counted at aligned positions, since those are the pairs the
crosscoder sees.
"""

from __future__ import annotations

import torch

from engine.activations import ActivationStore
from engine.planted import PlantedError
from engine.planted.pairs import check_model

# "Mid-frequency": neither the commonest tokens (punctuation, articles) nor the rare ones.
DEFAULT_RANKS = (200, 5000)


def pair_tokens(store: ActivationStore, model: str, max_pairs: int | None = None) -> torch.Tensor:
    """Token id of `model` at every pair of the store, in store order (int64 [n])."""
    side = check_model(model)
    col = 0 if side == "a" else 1
    keys = ("pair_window", "pair_pos", "window_index", f"ids_{side}", f"ptr_{side}")
    parts, have = [], 0
    for i in range(len(store.shards)):
        if max_pairs is not None and have >= max_pairs:
            break
        t = store.load_shard(i, keys)
        # Each pair's window, as a row of this shard's window table.
        order = torch.argsort(t["window_index"])
        local = order[torch.searchsorted(t["window_index"][order], t["pair_window"])]
        start = t[f"ptr_{side}"][local] + t["pair_pos"][:, col].long()
        parts.append(t[f"ids_{side}"][start].long())
        have += len(start)
    tokens = torch.cat(parts)
    return tokens if max_pairs is None else tokens[:max_pairs]


def choose_triggers(
    tokens: torch.Tensor,
    rate: float,
    seed: int,
    ranks: tuple[int, int] = DEFAULT_RANKS,
) -> torch.Tensor:
    """Seeded trigger token ids among frequency ranks [lo, hi) covering about `rate` of pairs.

    Ranks are by count among the tokens seen; a vocabulary smaller than `hi` tokens shrinks
    the range (lo to a tenth of the tokens seen), so small stores still get triggers.
    """
    if not 0 < rate < 1:
        raise PlantedError(f"rate must be in (0, 1), got {rate}")
    ids, counts = torch.unique(tokens, return_counts=True)
    # Descending count, ties by id, so the ranking does not depend on torch's sort.
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))
    lo, hi = min(ranks[0], len(ids) // 10), min(ranks[1], len(ids))
    candidates = torch.tensor(order[lo:hi], dtype=torch.long)
    if len(candidates) == 0:
        raise PlantedError(f"no tokens in frequency ranks {ranks} of the {len(ids)} seen")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    candidates = candidates[torch.randperm(len(candidates), generator=gen)]
    covered = torch.cumsum(counts[candidates], 0)
    take = int(torch.searchsorted(covered, rate * len(tokens))) + 1
    return torch.sort(ids[candidates[:take]]).values


def trigger_labels(tokens: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
    """Bool per pair: its token is a trigger."""
    return torch.isin(tokens, triggers)
