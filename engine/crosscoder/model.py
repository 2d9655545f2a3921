"""The crosscoder: one module for standard, DFC and DSF architectures.

Parameters exist only where a feature is allowed to act (see `partition.py`):

* ``w_enc_a`` [n_a_features, d_a] and ``w_enc_b`` [n_b_features, d_b]: each model's
  encoder rows for the features it owns; a shared feature's pre-activation is the sum of
  both models' contributions, an exclusive feature reads only its own model;
* ``w_dec_a`` [n_a_features, d_a]: A's decoder rows [A-exclusive | shared | designated];
* ``w_dec_b`` [n_b_exclusive + n_shared, d_b]: B's decoder rows [B-exclusive | shared];
  designated-shared features (DSF) decode into B through A's rows (tied decoders);
* ``b_enc`` [n_features], ``b_dec_a`` [d_a], ``b_dec_b`` [d_b];
* buffer ``threshold`` [n_features]: inference threshold on the BatchTopK score
  relu(pre) * (|d_A| + |d_B|), learned as an EMA during training.

Because an A-exclusive feature has no row in any B tensor, no value, gradient or
optimiser state can connect it to model B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.crosscoder.sparse import (
    BlockEncoding,
    Entries,
    SelectedEncoding,
    weighted_gather_sum,
)
from engine.partition import Partition, Role


class Crosscoder(nn.Module):
    """Sparse dictionary over paired activations of two models with widths d_a and d_b."""

    def __init__(
        self,
        d_a: int,
        d_b: int,
        partition: Partition,
        decoder_init_norm: float = 0.4,
        generator: torch.Generator | None = None,
        score_weighting: str = "sum",
    ) -> None:
        super().__init__()
        if partition.n_designated and d_a != d_b:
            raise ValueError(
                f"designated-shared features tie decoders across models and need d_a == d_b "
                f"(got {d_a} and {d_b})"
            )
        if score_weighting not in ("sum", "mean"):
            raise ValueError(f"score_weighting must be 'sum' or 'mean', got {score_weighting!r}")
        self.d_a, self.d_b, self.partition = d_a, d_b, partition
        self.score_weighting = score_weighting
        p = partition
        self.w_dec_a = nn.Parameter(_random_rows(p.n_a_features, d_a, decoder_init_norm, generator))
        n_b_own = p.n_b_exclusive + p.n_shared
        self.w_dec_b = nn.Parameter(_random_rows(n_b_own, d_b, decoder_init_norm, generator))
        # Encoder starts as the decoder's transpose (rows here, since encoders are stored
        # feature-major too).
        self.w_enc_a = nn.Parameter(self.w_dec_a.detach().clone())
        enc_b = self.w_dec_b.detach()
        if p.n_designated:
            enc_b = torch.cat([enc_b, self.w_dec_a.detach()[p.n_a_exclusive + p.n_shared :]])
        self.w_enc_b = nn.Parameter(enc_b.clone())
        self.b_enc = nn.Parameter(torch.zeros(p.n_features))
        self.b_dec_a = nn.Parameter(torch.zeros(d_a))
        self.b_dec_b = nn.Parameter(torch.zeros(d_b))
        self.register_buffer("threshold", torch.zeros(p.n_features))
        # Global id <-> per-model parameter row maps, as buffers so they follow .to(device).
        self.register_buffer("rows_in_a", _row_map(p, "a"), persistent=False)
        self.register_buffer("rows_in_b", _row_map(p, "b"), persistent=False)

    # -- geometry ---------------------------------------------------------------------

    def decoder_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature L2 norms of the A and B decoder vectors (0 where absent)."""
        norm_a_rows = self.w_dec_a.norm(dim=1)
        norm_b_rows = self.w_dec_b.norm(dim=1)
        p = self.partition
        norm_a = torch.zeros(p.n_features, device=norm_a_rows.device, dtype=norm_a_rows.dtype)
        norm_b = torch.zeros_like(norm_a)
        owned_a = self.rows_in_a >= 0
        norm_a[owned_a] = norm_a_rows
        norm_b[p.n_a_exclusive : p.designated_start] = norm_b_rows
        norm_b[p.block(Role.DESIGNATED)] = norm_a_rows[p.n_a_exclusive + p.n_shared :]
        return norm_a, norm_b

    def relative_decoder_norm(self) -> torch.Tensor:
        """Paper eq. 1: |d_A| / (|d_A| + |d_B|) per feature (1 = A only, 0 = B only)."""
        with torch.no_grad():
            norm_a, norm_b = self.decoder_norms()
            return norm_a / (norm_a + norm_b).clamp_min(1e-12)

    def decoder_matrix(self, model: str) -> torch.Tensor:
        """Dense [n_features, d] decoder of one model, zero rows where a feature is absent."""
        with torch.no_grad():
            rows = self._rows(model)
            weight = self._decoder_table(model)
            out = weight.new_zeros(self.partition.n_features, weight.shape[1])
            owned = rows >= 0
            out[owned] = weight[rows[owned]]
            return out

    # -- dense forward (inference) ---------------------------------------------------

    def pre_activations(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [n, n_features]."""
        p = self.partition
        enc_a = F.linear(x_a, self.w_enc_a)
        enc_b = F.linear(x_b, self.w_enc_b)
        if p.n_a_exclusive == 0 and p.n_b_exclusive == 0:
            return enc_a.add_(enc_b).add_(self.b_enc)
        pre = enc_a.new_empty(x_a.shape[0], p.n_features)
        pre[:, : p.n_a_exclusive] = enc_a[:, : p.n_a_exclusive]
        pre[:, p.n_a_exclusive :] = enc_b
        pre[:, p.shared_start :] += enc_a[:, p.n_a_exclusive :]
        return pre.add_(self.b_enc)

    def selection_scores(self, pre: torch.Tensor, weighting: str | None = None) -> torch.Tensor:
        """BatchTopK ranking score: relu(pre) x the feature's decoder-norm weight
        (`weighting` overrides the crosscoder's own `score_weighting`)."""
        return pre.relu() * self.score_weights(weighting).to(pre.dtype)

    def score_weights(self, weighting: str | None = None) -> torch.Tensor:
        """|d_A| + |d_B| ("sum"), or that over the number of models owning it ("mean")."""
        norm_a, norm_b = self.decoder_norms()
        weights = norm_a + norm_b
        if (weighting or self.score_weighting) == "mean":
            owners = (self.rows_in_a >= 0).float() + (self.rows_in_b >= 0).float()
            weights = weights / owners
        return weights

    def encode(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        """Feature activations [n, n_features] using the learned inference threshold."""
        pre = self.pre_activations(x_a, x_b)
        scores = self.selection_scores(pre)
        return torch.where(scores > self.threshold.to(pre.dtype), pre.relu(), 0.0)

    def decode(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions (x̂_a, x̂_b) from dense feature activations."""
        return (
            f @ self.decoder_matrix("a") + self.b_dec_a,
            f @ self.decoder_matrix("b") + self.b_dec_b,
        )

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor):
        """Encode then decode (inference path)."""
        return self.decode(self.encode(x_a, x_b))

    # -- sparse path (training) ------------------------------------------------------

    def entry_values(
        self,
        pre_values: torch.Tensor,
        entries: Entries,
        x_a: torch.Tensor,
        x_b: torch.Tensor,
    ) -> torch.Tensor:
        """Differentiable activations of selected entries (gradient reaches the encoder)."""
        return SelectedEncoding.apply(
            pre_values.float(),
            self.w_enc_a,
            self.w_enc_b,
            self.b_enc,
            x_a,
            x_b,
            entries.features,
            entries.rows,
            self.rows_in_a[entries.features],
            self.rows_in_b[entries.features],
        )

    def decode_entries(
        self, model: str, entries: Entries, values: torch.Tensor, bias: bool = True
    ) -> torch.Tensor:
        """Reconstruction of one model from sparse entries (entries sorted by row)."""
        rows = self._rows(model)[entries.features]
        owned = rows >= 0
        out = weighted_gather_sum(
            self._decoder_table(model),
            rows[owned],
            entries.rows[owned],
            values[owned],
            entries.n_rows,
            groups_sorted=True,
        )
        if bias:
            out = out + (self.b_dec_a if model == "a" else self.b_dec_b)
        return out

    def block_values(
        self, pre_block: torch.Tensor, features: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable pre-activations [n, m] of the features `features` for every row."""
        return BlockEncoding.apply(
            pre_block.float(),
            self.w_enc_a,
            self.w_enc_b,
            self.b_enc,
            x_a,
            x_b,
            features,
            self.rows_in_a[features],
            self.rows_in_b[features],
        )

    def decode_block(self, model: str, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One model's reconstruction (no bias) from dense activations [n, m] of `features`."""
        rows = self._rows(model)[features]
        owned = rows >= 0
        return z[:, owned] @ self._decoder_table(model)[rows[owned]]

    # -- helpers ----------------------------------------------------------------------

    def decodes(self, feature: int, model: str) -> bool:
        """Whether `feature` has a decoder vector in `model` (exclusive features lack one)."""
        return int(self._rows(model)[feature]) >= 0

    def _rows(self, model: str) -> torch.Tensor:
        """Decoder-table row of every global feature in `model` (-1 where absent)."""
        if model == "a":
            return self.rows_in_a
        if model == "b":
            return self.rows_in_b
        raise ValueError(f"model must be 'a' or 'b', got {model!r}")

    def _decoder_table(self, model: str) -> torch.Tensor:
        """Decoder rows `_rows(model)` indexes into (B's designated rows live in A's table)."""
        if model == "a" or self.partition.n_designated == 0:
            return self.w_dec_a if model == "a" else self.w_dec_b
        return torch.cat([self.w_dec_b, self.w_dec_a[self._designated_rows_a()]])

    def _designated_rows_a(self) -> slice:
        p = self.partition
        return slice(p.n_a_exclusive + p.n_shared, p.n_a_features)


def _row_map(partition: Partition, model: str) -> torch.Tensor:
    """Global feature id -> parameter row in `model`, -1 where the feature is absent."""
    rows = torch.full((partition.n_features,), -1, dtype=torch.long)
    owned = partition.model_rows(model)
    rows[owned] = torch.arange(owned.numel())
    return rows


def _random_rows(n: int, d: int, norm: float, generator: torch.Generator | None) -> torch.Tensor:
    """n random directions in R^d, each scaled to L2 norm `norm`."""
    w = torch.randn(n, d, generator=generator)
    return w * (norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
