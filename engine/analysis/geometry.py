"""Decoder geometry: per-feature norms, nearest features, and matching features across runs.

All cosines are between decoder vectors in one model's space (A or B): the two models'
spaces have different widths in general, so a vector of A is never compared with one of B.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from engine.crosscoder.checkpoint import CheckpointError, check_models, trained_on
from engine.crosscoder.model import Crosscoder
from engine.partition import Role


def roles(crosscoder: Crosscoder) -> np.ndarray:
    """The partition of every feature ('a_exclusive', 'b_exclusive', 'shared', ...)."""
    p = crosscoder.partition
    sizes = [
        (Role.A_EXCLUSIVE, p.n_a_exclusive),
        (Role.B_EXCLUSIVE, p.n_b_exclusive),
        (Role.SHARED, p.n_shared),
        (Role.DESIGNATED, p.n_designated),
    ]
    return np.concatenate([np.full(n, role.value, dtype=object) for role, n in sizes])


def decoder_stats(crosscoder: Crosscoder) -> pd.DataFrame:
    """Per feature: decoder norm in each model (NaN where absent), relative norm, and the
    cosine between its A and B decoders (only when both exist and the widths match)."""
    with torch.no_grad():
        norm_a, norm_b = crosscoder.decoder_norms()
        owns_a = (crosscoder.rows_in_a >= 0).numpy()
        owns_b = (crosscoder.rows_in_b >= 0).numpy()
        cos = np.full(len(owns_a), np.nan)
        if crosscoder.d_a == crosscoder.d_b:
            both = owns_a & owns_b
            d_a, d_b = crosscoder.decoder_matrix("a"), crosscoder.decoder_matrix("b")
            cos[both] = F.cosine_similarity(d_a[both], d_b[both], dim=1).numpy()
    return pd.DataFrame(
        {
            "feature_id": np.arange(len(owns_a)),
            "partition": roles(crosscoder),
            "dec_norm_a": np.where(owns_a, norm_a.numpy(), np.nan),
            "dec_norm_b": np.where(owns_b, norm_b.numpy(), np.nan),
            "rel_norm": crosscoder.relative_decoder_norm().numpy(),
            "dec_cos": cos,
        }
    )


def unit_decoders(crosscoder: Crosscoder, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature ids, unit-norm decoder rows) of the features that decode into `model`."""
    with torch.no_grad():
        owned = torch.nonzero(crosscoder._rows(model) >= 0).flatten()
        rows = crosscoder.decoder_matrix(model)[owned]
        return owned, F.normalize(rows, dim=1)


def nearest(
    query: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosines and indices of `keys` for each row of `query` (both unit-norm)."""
    k = min(k, keys.shape[0] - int(exclude_self))
    vals, idx = [], []
    for lo in range(0, query.shape[0], chunk):
        sims = query[lo : lo + chunk] @ keys.T
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + lo] = -2.0
        v, i = sims.topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def neighbors(crosscoder: Crosscoder, k: int = 10) -> pd.DataFrame:
    """Each feature's k nearest features by decoder cosine, in each model's space it has."""
    frames = []
    for model in ("a", "b"):
        ids, unit = unit_decoders(crosscoder, model)
        if len(ids) < 2:
            continue
        vals, idx = nearest(unit, unit, k, exclude_self=True)
        kk = vals.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "feature_id": ids.repeat_interleave(kk).numpy(),
                    "neighbor_id": ids[idx.flatten()].numpy(),
                    "cosine": vals.flatten().numpy(),
                    "rank": np.tile(np.arange(kk), len(ids)),
                    "space": model,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def match_runs(ours: Crosscoder, theirs: Crosscoder, chunk: int = 2048) -> pd.DataFrame:
    """For each of our features, the most similar feature of another run on the same models
    (refused where the runs record other models: see `checkpoint.trained_on`).

    Similarity is the decoder cosine in the space(s) our feature decodes into, averaged over
    A and B when it has both; their features lacking a decoder in that space cannot match.
    """
    if (ours.d_a, ours.d_b) != (theirs.d_a, theirs.d_b):
        raise CheckpointError(
            f"the runs have different widths ({ours.d_a}/{ours.d_b} vs {theirs.d_a}/"
            f"{theirs.d_b}): they were trained on different model pairs or layers, and only "
            "runs on the same ones can be matched"
        )
    check_models(
        trained_on(ours),
        trained_on(theirs),
        "the other run",
        "only runs on the same model pair and layers can be matched",
    )
    spaces = [(_dense_units(ours, m), _dense_units(theirs, m)) for m in ("a", "b")]
    best, match = [], []
    for lo in range(0, ours.partition.n_features, chunk):
        total = 0.0
        count = 0.0
        for (own_o, unit_o), (own_t, unit_t) in spaces:
            sims = unit_o[lo : lo + chunk] @ unit_t.T
            sims[:, ~own_t] = -1.0  # their features absent from this space cannot match
            mine = own_o[lo : lo + chunk, None].float()
            total = total + sims * mine
            count = count + mine
        v, i = (total / count).max(dim=1)
        best.append(v)
        match.append(i)
    match_ids = torch.cat(match).numpy()
    return pd.DataFrame(
        {
            "feature_id": np.arange(ours.partition.n_features),
            "other_feature_id": match_ids,
            "cosine": torch.cat(best).numpy(),
            "partition": roles(ours),
            "other_partition": roles(theirs)[match_ids],
        }
    )


def _dense_units(crosscoder: Crosscoder, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(owns [n_features] bool, unit decoder rows [n_features, d], zero where absent)."""
    with torch.no_grad():
        owns = crosscoder._rows(model) >= 0
        return owns, F.normalize(crosscoder.decoder_matrix(model), dim=1)
