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
    BlockDecoding,
    BlockEncoding,
    Entries,
    EntryIndex,
    SelectedEncoding,
    SparseDecoding,
    Workspace,
    owned_columns,
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
        # Training path: accumulate weight gradients in place into param.grad (the trainer
        # keeps them between steps) instead of returning fresh ones to autograd.
        self.grads_in_place = False

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

    def pre_activations(
        self, x_a: torch.Tensor, x_b: torch.Tensor, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """Encoder pre-activations [n, n_features]; with a `workspace` (no autograd, for
        training steps on CPU) into a tensor kept there, by one GEMM."""
        if workspace is not None:
            return self._pre_activations_joint(x_a, x_b, workspace)
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

    def _pre_activations_joint(
        self, x_a: torch.Tensor, x_b: torch.Tensor, workspace: Workspace
    ) -> torch.Tensor:
        """[x_a | x_b] @ [[W_a | W_b]].T + b_enc, with zeros where a feature has no row.

        Why: the per-model linears give [n, n_a_features] outputs to copy into place, and
        an odd row stride (n_a_features = 15,565) ran MKL ~30% below its aligned speed;
        one GEMM into the kept [n, n_features] result, 5% more multiply-adds, took 0.52 s
        of CPU time where the two linears and their copies took 0.71 s (1 thread)."""
        p, d_a = self.partition, self.d_a
        n_ae, shared = p.n_a_exclusive, p.shared_start
        # The zero blocks depend on the partition: a new one starts a new (zero) tensor.
        w = workspace.get("w_enc", (p.n_features, d_a + self.d_b), self.w_enc_a, key=p)
        w[:n_ae, :d_a] = self.w_enc_a[:n_ae]
        w[shared:, :d_a] = self.w_enc_a[n_ae:]
        w[n_ae:, d_a:] = self.w_enc_b
        x = workspace.get("x", (x_a.shape[0], d_a + self.d_b), x_a)
        x[:, :d_a] = x_a
        x[:, d_a:] = x_b
        pre = workspace.get("pre", (x_a.shape[0], p.n_features), x_a)
        return torch.addmm(self.b_enc, x, w.T, out=pre)

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

    def entry_index(self, entries: Entries, model: str) -> EntryIndex:
        """Where `entries` sit in one model's parameter tables (cached on the entries)."""
        key = ("index", model)
        if key not in entries.cache:
            rows = self._rows(model)
            n_table = (self.w_enc_a if model == "a" else self.w_enc_b).shape[0]
            entries.cache[key] = EntryIndex(entries, rows, n_table)
        return entries.cache[key]

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
            (self.entry_index(entries, "a"), self.entry_index(entries, "b")),
            self.grads_in_place,
        )

    def decode_entries(
        self, model: str, entries: Entries, values: torch.Tensor, bias: bool = True
    ) -> torch.Tensor:
        """Reconstruction of one model from sparse entries (entries sorted by row)."""
        index = self.entry_index(entries, model)
        table = self._decoder_table(model)
        out = SparseDecoding.apply(values, table, index, self.grads_in_place)
        if bias:
            out = out + (self.b_dec_a if model == "a" else self.b_dec_b)
        return out

    def block_values(
        self,
        pre_block: torch.Tensor,
        keep: torch.Tensor,
        features: torch.Tensor,
        x_a: torch.Tensor,
        x_b: torch.Tensor,
    ) -> torch.Tensor:
        """Differentiable activations [n, m] of the features `features` for every row: the
        pre-activations `pre_block` where `keep` (selected, positive), else 0."""
        return BlockEncoding.apply(
            pre_block.float(),
            keep,
            self.w_enc_a,
            self.w_enc_b,
            self.b_enc,
            x_a,
            x_b,
            features,
            self.rows_in_a[features],
            self.rows_in_b[features],
            self.grads_in_place,
        )

    def decode_block(
        self, z: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' reconstructions (no bias) from dense activations [n, m] of
        `features` (in `block_order`, each model's own columns are views)."""
        blocks = []
        for model in ("a", "b"):
            rows = self._rows(model)[features]
            cols = owned_columns(rows)
            blocks.append((cols, rows[cols]))
        tables = (self._decoder_table("a"), self._decoder_table("b"))
        return BlockDecoding.apply(z, *tables, *blocks, self.grads_in_place)

    def block_order(self, features: torch.Tensor) -> torch.Tensor:
        """Sorted `features` reordered [B-exclusive | shared | designated | A-exclusive], so
        that each model's own features are contiguous (a block's columns are then views)."""
        a_only = features < self.partition.n_a_exclusive
        return torch.cat([features[~a_only], features[a_only]])

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
