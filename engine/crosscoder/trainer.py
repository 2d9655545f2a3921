"""The crosscoder trainer: one optimisation step (BatchTopK + AuxK, outlier masking), the
per-feature state it keeps, and its checkpoints. The run around it (normalisation fit,
resume, the loop, logging) is `training.py`. One concept, a single class: the step and
the state it updates (dead counters, thresholds, reassignment, checkpoint state).

One step (paper eq. 2 plus B.1.3-B.1.5):

1. drop rows with non-finite values (counted), scale each model to its median norm, drop
   rows where either model's norm exceeds `outlier_factor` x the batch median (counted);
2. dense pre-activations (bf16 on CUDA), BatchTopK over relu(pre) * (|d_A| + |d_B|)
   keeping k x n entries per batch (DSF: the designated block gets its own, denser budget);
3. sparse decode of each model from its own features; loss = sum of squared errors;
4. AuxK: the top-k_aux dead features of each row model the detached residual without
   decoder bias, normalised by the residual's variance; alpha-weighted; a NaN is zeroed;
5. Adam with warm-up, gradient clipping; update dead counters and the EMA threshold.

Under `torchrun` each rank trains on its slice of every global batch and every batch-wide
quantity above is global (see `distributed.py`), so the result equals one process.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import CrosscoderConfig, TrainConfig, to_dict
from engine.crosscoder import checkpoint as ckpt
from engine.crosscoder.data import check_pair_shapes, finite_rows
from engine.crosscoder.distributed import Context
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.partition import Partition, Role
from engine.crosscoder.reassign import adapt, reassign
from engine.crosscoder.relayout import resize
from engine.crosscoder.sparse import Entries, Workspace, gather, weighted_batch_topk
from engine.errors import UserError

# Settings that may change between a run and its resumption without changing the result.
# A checkpoint written before a training setting existed was trained as with this value,
# so it resumes when the run asks for the same (and is refused, naming the key, otherwise).
_BEFORE_THE_SETTING_EXISTED = {
    "recycle_init": "random",
    "exclusive_start": 1.0,
    "reassign_after": 0,
    "equal_score_steps": 0,
    "swap_margin": 0.5,
    "reassign_stop": 1.0,
    "late_lean": 0.8,
    "validation_pairs": 0,
}
_RESUMABLE_CHANGES = {
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "tracking",
}


class TrainingError(UserError, RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class _Counters:
    """Running totals kept in checkpoints."""

    step: int = 0
    tokens: int = 0
    masked_outliers: int = 0
    nonfinite_rows: int = 0
    aux_nan_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a clear error for unavailable CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but no CUDA GPU is available; use 'cpu'")
    return device


def _starting_partition(partition: Partition, cfg: TrainConfig) -> Partition:
    """The block sizes training starts from: adaptive partitions may start their exclusive
    blocks smaller than configured (`exclusive_start`) and grow them by moves."""
    adaptive = cfg.adapt_partitions and cfg.reassign_every and not partition.n_designated
    if not adaptive or cfg.exclusive_start >= 1:
        return partition

    def start(n: int) -> int:
        return min(n, max(1, round(n * cfg.exclusive_start)))

    n_a, n_b = start(partition.n_a_exclusive), start(partition.n_b_exclusive)
    n_shared = partition.n_shared + partition.n_a_exclusive + partition.n_b_exclusive - n_a - n_b
    return Partition(n_a, n_b, n_shared, partition.n_designated)


class Trainer:
    """Holds a crosscoder, its optimiser and training state; `step` trains on one batch."""

    def __init__(
        self,
        model_cfg: CrosscoderConfig,
        train_cfg: TrainConfig,
        normalizer: Normalizer | None = None,
        ctx: Context | None = None,
    ) -> None:
        partition = model_cfg.partition()
        if train_cfg.k > partition.n_features:
            raise TrainingError(
                f"k={train_cfg.k} active features per token exceeds the dictionary size "
                f"{partition.n_features}"
            )
        if train_cfg.k_initial is not None and train_cfg.k_initial > partition.n_features:
            raise TrainingError(
                f"k_initial={train_cfg.k_initial} exceeds the dictionary size "
                f"{partition.n_features}"
            )
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.ctx = ctx or Context(device=resolve_device(train_cfg.device))
        self.device = self.ctx.device
        gen = torch.Generator().manual_seed(train_cfg.seed)
        self.model = Crosscoder(
            model_cfg.d_a,
            model_cfg.d_b,
            _starting_partition(partition, train_cfg),
            model_cfg.decoder_init_norm,
            gen,
            model_cfg.score_weighting,
        ).to(self.device)
        self.model.grads_in_place = True  # see `_zero_grads`
        self.normalizer = normalizer or Normalizer.identity()
        # Fused Adam is one pass over each tensor: ~10x faster than the default on CPU.
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.999), fused=True
        )
        self.counters = _Counters()
        self.since_fired = torch.zeros(partition.n_features, dtype=torch.long, device=self.device)
        self.threshold_ready = torch.zeros(2, dtype=torch.bool, device=self.device)
        # Leaning label of every feature at the last reassignment check (reassign.py).
        self.leaning = torch.zeros(partition.n_features, dtype=torch.int8, device=self.device)
        # Per feature: how lopsided it was when it moved into an exclusive partition (1:
        # exclusive from the start); swaps give its slot to a more lopsided candidate.
        self.lean_at_move = torch.ones(partition.n_features, device=self.device)
        # Shared features moved to A, to B; dead exclusive features recycled into shared;
        # moved-in features swapped back out.
        self.moved = torch.zeros(4, dtype=torch.long)
        self.batch_rows = 0  # rows of the current global batch left after `prepare`
        self._encode = self.model.pre_activations
        self._workspace = Workspace()  # see `_pre_activations`
        if train_cfg.compile:
            self._encode = torch.compile(self.model.pre_activations, dynamic=True)
        self._groups = self._selection_groups()
        # Adaptive partitions grow an exclusive partition up to its configured size.
        self._capacity = (partition.n_a_exclusive, partition.n_b_exclusive)

    # -- one optimisation step -------------------------------------------------------

    def step(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train on one raw paired batch (this rank's slice of it); returns this step's
        statistics over the global batch as 0-d tensors."""
        cfg, ctx = self.cfg, self.ctx
        x_a, x_b = self.prepare(x_a, x_b)
        n = self.batch_rows
        with torch.no_grad():
            means = ctx.sum_(torch.cat([x_a.sum(0), x_b.sum(0)])) / n
            mean_a, mean_b = means.split([x_a.shape[1], x_b.shape[1]])
        out = self.losses(x_a, x_b)
        aux_local = out["aux_a"] + out["aux_b"]
        with torch.no_grad():
            parts = [out["recon_a"], out["recon_b"], aux_local]
            parts += [(x_a - mean_a).pow(2).sum(), (x_b - mean_b).pow(2).sum()]
            totals = torch.stack([t.detach().double().to(self.device) for t in parts])
            nnz = torch.tensor([float(out["entries"].nnz)], dtype=totals.dtype, device=self.device)
            totals = torch.cat([totals, nnz])
            recon_a, recon_b, aux, var_a, var_b, nnz = ctx.sum_(totals).unbind()
        if not torch.isfinite(aux):
            self.counters.aux_nan_steps += 1
            aux_local, aux = torch.zeros_like(aux_local), torch.zeros_like(aux)
        loss = out["recon_a"] + out["recon_b"] + cfg.aux_alpha * aux_local

        self._zero_grads()
        loss.backward()
        ctx.sum_grads_(self.model.parameters())
        grad_norm = self._clip(cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.counters.step)
        self.optimizer.step()

        with torch.no_grad():
            self._update_state(out["entries"], n, out["group_minima"])
        if cfg.reassigns_at(self.counters.step):
            self._reassign(out["errors"])
        sse_a, sse_b = recon_a * n, recon_b * n
        return {
            "loss": recon_a + recon_b + cfg.aux_alpha * aux,
            "recon_a": recon_a,
            "recon_b": recon_b,
            "aux": aux,
            "fve_a": 1 - sse_a / var_a,
            "fve_b": 1 - sse_b / var_b,
            "fve": 1 - (sse_a + sse_b) / (var_a + var_b),
            "l0": nnz / max(n, 1),
            "grad_norm": grad_norm.detach(),
            "rows": torch.tensor(n),
        }

    def losses(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        """Per-model loss terms on a prepared batch (no parameter update).

        Returns recon_a / recon_b (squared error summed over dims, over the global batch's
        rows), aux_a / aux_b (variance-normalised AuxK terms, 0 with no dead features), the
        selected entries and each selection group's smallest selected score. Under torchrun
        the loss terms are this rank's share: their sum over ranks is the global value.
        """
        model, n_local = self.model, x_a.shape[0]
        # The global row count comes from `prepare`; one process needs no bookkeeping.
        n = self.batch_rows if self.ctx.distributed else n_local
        k = self.cfg.k_at(self.counters.step)
        with torch.no_grad():
            pre = self._pre_activations(x_a, x_b)
            weights = model.score_weights(self._weighting())
            main, group_minima = self._select(pre, weights, k, n, n_local)
            dead = self.dead_mask() if self.cfg.k_aux else None
            aux = self._select_aux(pre, dead) if dead is not None and dead.any() else None
            pre_values = gather(pre, main.rows, main.features)
            del pre

        values = model.entry_values(pre_values, main, x_a, x_b)
        err_a = x_a - model.decode_entries("a", main, values)
        err_b = x_b - model.decode_entries("b", main, values)
        zero = torch.zeros((), device=self.device)
        out = {
            "recon_a": err_a.pow(2).sum() / n,
            "recon_b": err_b.pow(2).sum() / n,
            "aux_a": zero,
            "aux_b": zero,
            "entries": main,
            "group_minima": group_minima,
            "errors": (err_a.detach(), err_b.detach()),
        }
        if aux is not None:
            dead_ids, pre_dead, keep = aux
            z = model.block_values(pre_dead, keep, dead_ids, x_a, x_b)
            approx_a, approx_b = model.decode_block(z, dead_ids)
            residual_a, residual_b = err_a.detach(), err_b.detach()
            var_a, var_b = self._variances(residual_a, residual_b, n)
            out["aux_a"] = self._aux_term(residual_a, approx_a, var_a)
            out["aux_b"] = self._aux_term(residual_b, approx_b, var_b)
        return out

    def prepare(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate, drop non-finite and outlier rows, normalise; counts what was dropped.

        Sets `batch_rows` to the rows left in the global batch.
        """
        check_pair_shapes(x_a, x_b, self.model_cfg.d_a, self.model_cfg.d_b)
        x_a = x_a.to(self.device, torch.float32, non_blocking=True)
        x_b = x_b.to(self.device, torch.float32, non_blocking=True)
        finite = finite_rows(x_a, x_b)
        x_a, x_b = self.normalizer.apply(x_a, x_b)
        # The outlier medians are over the global batch: gather every rank's row norms.
        local = torch.stack([x_a.norm(dim=1), x_b.norm(dim=1), finite.float()], dim=1)
        norms = self.ctx.gather_rows(local)
        ok = norms[:, 2] > 0
        n_finite = int(ok.sum())
        self.counters.nonfinite_rows += norms.shape[0] - n_finite
        if n_finite == 0:
            raise TrainingError("a batch contained no finite rows; check the activation source")
        keep, keep_all = finite, ok
        factor = self.cfg.outlier_factor
        if factor is not None:
            for col in (0, 1):
                limit = factor * norms[ok, col].median()
                keep = keep & (local[:, col] <= limit)
                keep_all = keep_all & (norms[:, col] <= limit)
        self.batch_rows = int(keep_all.sum())
        self.counters.masked_outliers += n_finite - self.batch_rows
        if not bool(keep.all()):
            x_a, x_b = x_a[keep], x_b[keep]
        return x_a, x_b

    def _pre_activations(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations of a batch: on CPU (uncompiled) by one GEMM into tensors
        kept between steps, elsewhere by the model's linears (bf16 under autocast)."""
        if self.device.type == "cpu" and not self.cfg.compile:
            return self.model.pre_activations(x_a, x_b, self._workspace)
        with self._autocast():
            return self._encode(x_a, x_b)

    def _clip(self, max_norm: float) -> torch.Tensor:
        """The total gradient norm; the gradients are scaled down to `max_norm` when above
        it by the fused Adam step, as its gradient scale (what `clip_grad_norm_` would
        multiply in a separate pass over every gradient)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        self.optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0)
        return norm

    def _zero_grads(self) -> None:
        """Zero the gradients in place: the sparse backward accumulates into `param.grad`
        (`Crosscoder.grads_in_place`), and reusing them saves allocating and filling a
        fresh dense gradient per kernel. One whose parameter was resized (partition
        moves) is dropped."""
        for param in self.model.parameters():
            if param.grad is not None and param.grad.shape != param.shape:
                param.grad = None
        self.optimizer.zero_grad(set_to_none=False)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _weighting(self) -> str | None:
        """The BatchTopK score weighting of this step: "mean" during `equal_score_steps`
        (an exclusive feature, with one decoder, is not outscored 2:1 at initialisation),
        then the crosscoder's own."""
        return "mean" if self.counters.step < self.cfg.equal_score_steps else None

    def _selection_groups(self) -> list[tuple[slice, float]]:
        """Feature blocks that get separate BatchTopK budgets, with their share of k."""
        p = self.model.partition
        if not p.n_designated:
            return [(slice(0, p.n_features), 1.0)]
        frac = p.n_designated / p.n_features
        designated = p.block(Role.DESIGNATED)
        return [
            (slice(0, designated.start), 1.0 - frac),
            (designated, frac * self.cfg.designated_k_multiplier),
        ]

    def _select(
        self, pre: torch.Tensor, weights: torch.Tensor, k: int, n: int, n_local: int
    ) -> tuple[Entries, list[torch.Tensor | None]]:
        """BatchTopK entries (row-sorted) over the global batch of `n` rows, this rank's
        `n_local` of them, by the score relu(pre) x weights, and the smallest selected
        score of each group."""
        rows, feats, minima = [], [], []
        for block, share in self._groups:
            sub = pre[:, block]
            budget = min(round(k * share) * n, n * sub.shape[1])
            r, c, selected = self._batch_topk(sub, weights[block], budget)
            if not bool((selected > 0).all()):  # a zero score is not an activation
                positive = torch.nonzero(selected > 0).squeeze(1)
                r, c, selected = r[positive], c[positive], selected[positive]
            rows.append(r)
            feats.append(c + block.start)
            minima.append(selected.min().float() if selected.numel() else None)
        minima = self._global_minima(minima)
        if len(rows) == 1:
            return Entries(rows[0], feats[0], n_local), minima
        r, f = torch.cat(rows), torch.cat(feats)
        order = (r * pre.shape[1] + f).argsort()
        return Entries(r[order], f[order], n_local), minima

    def _batch_topk(
        self, sub: torch.Tensor, weights: torch.Tensor, budget: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, scores) of this rank's entries among the `budget` largest scores
        relu(sub) x weights of the global batch.

        Each rank's winners are among its own top `budget`: gathering those (padded with
        -inf) lets every rank find the same global winners and count how many are its own.
        """
        ctx = self.ctx
        if not ctx.distributed:
            return weighted_batch_topk(sub, weights, budget)
        local = min(budget, sub.numel())
        r, c, scores = weighted_batch_topk(sub, weights, local)
        values = scores.float()
        padded = values.new_full((budget,), -math.inf)
        padded[:local] = values
        winners = ctx.gather(padded).topk(budget, sorted=False).indices
        mine = int((winners // budget == ctx.rank).sum())
        if mine < local:
            keep = values.topk(mine, sorted=False).indices.sort().values  # stay row-major
            r, c, scores = r[keep], c[keep], scores[keep]
        return r, c, scores

    def _global_minima(self, minima: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each group's smallest selected score over all ranks (None where none was)."""
        if not self.ctx.distributed:
            return minima
        inf = torch.tensor(math.inf, device=self.device)
        reduced = self.ctx.min_(torch.stack([inf if m is None else m for m in minima]))
        return [None if math.isinf(v) else reduced[i] for i, v in enumerate(reduced.tolist())]

    def _select_aux(
        self, pre: torch.Tensor, dead: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Dead feature ids, their pre-activations [n, n_dead], and a mask of each row's
        top-k_aux positive ones (None if no dead feature is positive on any rank)."""
        # Each model's dead features contiguous: its AuxK products read column views.
        dead_ids = self.model.block_order(torch.nonzero(dead).squeeze(1))
        pre_dead = pre.index_select(1, dead_ids)
        k_aux = min(self.cfg.k_aux, dead_ids.numel())
        values, idx = pre_dead.topk(k_aux, dim=1, sorted=False)
        keep = torch.zeros(pre_dead.shape, dtype=torch.bool, device=pre.device)
        keep.scatter_(1, idx, values > 0)
        if not self.ctx.any(bool(keep.any())):
            return None
        return dead_ids, pre_dead, keep

    def _variances(
        self, err_a: torch.Tensor, err_b: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, ...]:
        """Total variance of each model's residual over the global batch of `n` rows."""
        ctx = self.ctx
        means = ctx.sum_(torch.cat([err_a.sum(0), err_b.sum(0)])) / n
        mean_a, mean_b = means.split([err_a.shape[1], err_b.shape[1]])
        sums = torch.stack([(err_a - mean_a).pow(2).sum(), (err_b - mean_b).pow(2).sum()])
        return tuple(ctx.sum_(sums).clamp_min(1e-12).unbind())

    def _aux_term(
        self, residual: torch.Tensor, approx: torch.Tensor, variance: torch.Tensor
    ) -> torch.Tensor:
        """Error of modelling one model's residual with dead features, over its variance."""
        return (residual - approx).pow(2).sum() / variance

    def _update_state(self, main: Entries, n: int, minima: list[torch.Tensor | None]) -> None:
        """Dead-feature counters, EMA inference threshold, token and step counts."""
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[main.features] = True
        if self.ctx.distributed:  # a feature fired if it fired on any rank
            fired = self.ctx.max_(fired.to(torch.uint8)).bool()
        self.since_fired += n
        self.since_fired[fired] = 0
        ema = self.cfg.threshold_ema
        for i, ((block, _), minimum) in enumerate(zip(self._groups, minima, strict=True)):
            if minimum is None:
                continue
            current = self.model.threshold[block.start]
            minimum = minimum.float()
            new = torch.where(self.threshold_ready[i], ema * current + (1 - ema) * minimum, minimum)
            self.model.threshold[block] = new
            self.threshold_ready[i] = True
        self.counters.step += 1
        self.counters.tokens += n

    def _reassign(self, errors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Move persistently lopsided shared features into the exclusive partitions
        (`errors`: this step's reconstruction errors per model)."""
        cfg = self.cfg
        # Seeded by step so every rank, and a resumed run, draws the same re-initialisations.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.counters.step)
        recycle_after = round(cfg.recycle_after_windows * cfg.dead_window_tokens)
        swap_margin, min_lean = cfg.swap_margin, 0.0
        if cfg.settling(self.counters.step):
            # Only near-free moves: no recycling (inf: no feature is silent that long),
            # no swaps, and only features whose other decoder is already negligible.
            recycle_after, swap_margin, min_lean = math.inf, 0.5, cfg.late_lean
        args = (
            self.model,
            self.optimizer,
            self.since_fired,
            self.leaning,
            cfg.dead_window_tokens,
            cfg.reassign_low,
            cfg.reassign_high,
            gen,
            self.model_cfg.decoder_init_norm,
        )
        if cfg.adapt_partitions:
            residual = self._gathered(errors) if cfg.recycle_init == "residual" else None
            moves, self.leaning, order = adapt(
                *args,
                self._capacity,
                recycle_after,
                residual,
                self.lean_at_move,
                swap_margin,
                min_lean,
            )
            if order is not None:
                self._groups = self._selection_groups()
        else:
            moves, self.leaning = reassign(*args, min_lean=min_lean)
        self.moved += torch.tensor([moves.to_a, moves.to_b, moves.recycled, moves.swapped])

    def _gathered(self, errors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The global batch's reconstruction errors (every rank draws from the same rows)."""
        return tuple(self.ctx.gather_rows(e.float()) for e in errors)

    def moves(self) -> dict[str, int]:
        """Shared features moved to each exclusive partition so far (empty when off)."""
        if not self.cfg.reassign_every:
            return {}
        out = {"moved_to_a": int(self.moved[0]), "moved_to_b": int(self.moved[1])}
        if self.cfg.adapt_partitions:
            out["recycled_to_shared"] = int(self.moved[2])
            out["swapped_to_shared"] = int(self.moved[3])
        return out

    # -- state for logs and checkpoints ---------------------------------------------

    def dead_mask(self) -> torch.Tensor:
        """Features that have not fired in the last dead_window_tokens tokens."""
        return self.since_fired >= self.cfg.dead_window_tokens

    def dead_fractions(self) -> dict[str, float]:
        """Dead fraction overall and per partition block."""
        dead = self.dead_mask()
        out = {"dead_frac": dead.float().mean().item()}
        p = self.model.partition
        for role in Role:
            block = p.block(role)
            if block.stop > block.start:
                out[f"dead_frac_{role.value}"] = dead[block].float().mean().item()
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "since_fired": self.since_fired,
            "threshold_ready": self.threshold_ready,
            "leaning": self.leaning,
            "lean_at_move": self.lean_at_move,
            "moved": self.moved,
            "rng_cpu": torch.get_rng_state(),
        }

    def state_json(self) -> dict[str, Any]:
        c = self.counters
        return {
            "crosscoder_config": to_dict(self.model_cfg),
            "train_config": to_dict(self.cfg),
            "tokens": c.tokens,
            "masked_outliers": c.masked_outliers,
            "nonfinite_rows": c.nonfinite_rows,
            "aux_nan_steps": c.aux_nan_steps,
            "history": c.history,
        }

    def save_checkpoint(self, run_dir: Path) -> Path:
        return ckpt.save_training_checkpoint(
            run_dir,
            self.counters.step,
            self.model,
            self.normalizer,
            self.optimizer,
            self.state_tensors(),
            self.state_json(),
            self.cfg.keep_checkpoints,
        )

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote, refusing a different configuration."""
        header = ckpt.read_checkpoint_header(path)
        _check_same_run(header, self.model_cfg, self.cfg, path)
        saved = Partition(**header["partition"])
        if saved != self.model.partition:  # adaptive partitions had changed sizes
            resize(self.model, self.optimizer, saved)
            self._groups = self._selection_groups()
        state = ckpt.load_training_checkpoint(path, self.model, self.optimizer)
        self.normalizer = Normalizer(**header["normalizer"])
        self.since_fired.copy_(state["since_fired"])
        self.threshold_ready.copy_(state["threshold_ready"])
        if "leaning" in state:  # absent from checkpoints made before reassignment existed
            self.leaning.copy_(state["leaning"])
            moved = state["moved"]  # fewer entries in checkpoints of earlier versions
            self.moved[: moved.numel()].copy_(moved)
        if "lean_at_move" in state:
            self.lean_at_move.copy_(state["lean_at_move"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        self.counters = _Counters(
            step=header["step"],
            tokens=header["tokens"],
            masked_outliers=header["masked_outliers"],
            nonfinite_rows=header["nonfinite_rows"],
            aux_nan_steps=header["aux_nan_steps"],
            history=header["history"],
        )


def _check_same_run(
    header: dict[str, Any], model_cfg: CrosscoderConfig, train_cfg: TrainConfig, path: Path
) -> None:
    """Raise if a checkpoint was made with settings that would change the result."""
    saved_model = header.get("crosscoder_config", {})
    saved_train = {**_BEFORE_THE_SETTING_EXISTED, **header.get("train_config", {})}
    diffs = [k for k, v in to_dict(model_cfg).items() if saved_model.get(k) != v]
    diffs += [
        k
        for k, v in to_dict(train_cfg).items()
        if k not in _RESUMABLE_CHANGES and saved_train.get(k) != v
    ]
    if diffs:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was made with different settings ({', '.join(sorted(diffs))}); "
            f"use a new output directory, or pass resume=False / --fresh to start over"
        )
