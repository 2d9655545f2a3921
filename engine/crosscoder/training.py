"""A training run: hold out validation pairs, fit the normalisation, resume from the latest
checkpoint, loop over the source's batches with progress, logs (validation FVE at every
log step, optionally sent to a tracker) and periodic checkpoints, and write the trained
crosscoder. One step of it is `trainer.Trainer.step`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import CrosscoderConfig, TrainConfig, to_dict
from engine.crosscoder import checkpoint as ckpt
from engine.crosscoder import distributed
from engine.crosscoder.data import RankSlice, as_source, check_pair_shapes, finite_rows
from engine.crosscoder.distributed import Context, StopRequests
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.tracking import Tracker, open_tracker
from engine.crosscoder.trainer import Trainer, TrainingError, resolve_device
from engine.crosscoder.validation import PREFIX, Validation, split
from engine.progress import ProgressBar

NORMALIZER_FIT_ROWS = 8192


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) training run produced."""

    crosscoder: Crosscoder
    normalizer: Normalizer
    history: list[dict[str, float]]
    final: dict[str, Any]
    out_dir: Path | None = None


def fit_normalizer(
    source, batch_size: int, seed: int
) -> tuple[Normalizer, torch.Tensor, torch.Tensor]:
    """Fit normalisation on the first rows of a source; also returns those rows."""
    parts_a, parts_b, rows = [], [], 0
    for x_a, x_b in source.batches(batch_size, 0, seed):
        check_pair_shapes(x_a, x_b)
        keep = finite_rows(x_a, x_b)
        parts_a.append(x_a[keep].float().cpu())
        parts_b.append(x_b[keep].float().cpu())
        rows += int(keep.sum())
        if rows >= NORMALIZER_FIT_ROWS:
            break
    if rows == 0:
        raise TrainingError("the activation source yielded no finite rows to fit normalisation")
    x_a, x_b = torch.cat(parts_a), torch.cat(parts_b)
    return Normalizer.fit(x_a, x_b), x_a, x_b


def train(
    model_cfg: CrosscoderConfig,
    train_cfg: TrainConfig,
    source,
    out_dir: str | Path | None = None,
    resume: bool = True,
    normalizer: Normalizer | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a crosscoder on paired batches; with `out_dir`, checkpoint and resume there.

    Launched by `torchrun` (or inside an initialised process group), each process trains
    on its slice of every global batch of `batch_size` rows; only rank 0 writes.
    """
    with distributed.session(resolve_device(train_cfg.device)) as ctx:
        return _train(
            ctx, model_cfg, train_cfg, as_source(source), out_dir, resume, normalizer, progress
        )


def _train(
    ctx: Context,
    model_cfg: CrosscoderConfig,
    train_cfg: TrainConfig,
    source,
    out_dir: str | Path | None,
    resume: bool,
    normalizer: Normalizer | None,
    progress: bool,
) -> TrainResult:
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ckpt.CheckpointError(f"{out} is a file; give a directory for the training run")
    trainer = Trainer(model_cfg, train_cfg, normalizer, ctx)
    # Every rank holds out the same pairs (a fixed split), before anything reads the data.
    source, held = split(source, train_cfg.validation_pairs)
    validation = held and Validation(held.x_a, held.x_b, held.info(), train_cfg.outlier_factor)
    if out is not None and not resume:  # an old run's checkpoint must not outlive this one
        # A streamed run's store and settings live in the run directory: they stay.
        ckpt.clear_run(out, remove=ctx.is_main, keep=getattr(source, "run_entries", ()))
        ctx.barrier()
    latest = ckpt.latest_checkpoint(out) if out is not None and resume else None
    if latest is not None:
        trainer.load_checkpoint(latest)  # every rank reads it: a shared file system
    else:
        _initialise(trainer, source, normalizer)
    tracker = open_tracker(
        train_cfg.tracking, out, ctx.is_main, to_dict(train_cfg),
        first_step=trainer.counters.step + 1,  # after the checkpoint resumed from
    )  # fmt: skip
    try:
        _loop(
            trainer, RankSlice(source, ctx.rank, ctx.world_size), out, progress, validation, tracker
        )
    except KeyboardInterrupt:
        if out is not None and ctx.is_main:
            trainer.save_checkpoint(out)
        raise
    finally:
        tracker.close()
    final = {**trainer.dead_fractions(), **_last(trainer.counters.history)}
    final.update(
        steps=trainer.counters.step,
        tokens=trainer.counters.tokens,
        masked_outliers=trainer.counters.masked_outliers,
        nonfinite_rows=trainer.counters.nonfinite_rows,
        aux_nan_steps=trainer.counters.aux_nan_steps,
    )
    final.update(trainer.moves())
    if out is not None and ctx.is_main:
        if latest is None or trainer.counters.step != latest_step(latest):
            trainer.save_checkpoint(out)
        ckpt.save_crosscoder(
            out,
            trainer.model,
            trainer.normalizer,
            crosscoder_config=to_dict(model_cfg),
            train_config=to_dict(train_cfg),
            metrics=final,
            history=trainer.counters.history,
            feature_stats={"tokens_since_fired": trainer.since_fired},
            # The store's models and layers, so analysis and matching can refuse another pair.
            **({"models": source.manifest["models"]} if _store_models(source) else {}),
            # What was held out: `modeldiff evaluate` reads the held-out windows from here.
            **({"validation": validation.info} if validation else {}),
            # What the source records of itself (a streamed run: its settings and store).
            **(source.run_record() if hasattr(source, "run_record") else {}),
        )
    ctx.barrier()  # when train returns on any rank, the files are written
    return TrainResult(trainer.model, trainer.normalizer, trainer.counters.history, final, out)


def _store_models(source) -> bool:
    """Whether the training source is an activation store that records its models."""
    manifest = getattr(source, "manifest", None)
    return isinstance(manifest, dict) and bool(manifest.get("models"))


def latest_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _initialise(trainer: Trainer, source, normalizer: Normalizer | None) -> None:
    """Fit normalisation (unless given) and start decoder biases at the data mean."""
    cfg = trainer.cfg
    # Every rank fits on the same global rows; rank 0's result is then broadcast so the
    # replicas start bit-identical whatever the devices' rounding.
    fitted, x_a, x_b = fit_normalizer(source, cfg.batch_size, cfg.seed)
    normalizer = normalizer or fitted
    x_a, x_b = normalizer.apply(x_a, x_b)
    check_pair_shapes(x_a, x_b, trainer.model_cfg.d_a, trainer.model_cfg.d_b)
    with torch.no_grad():
        # Starting at the mean spares the features from spending capacity on it.
        trainer.model.b_dec_a.copy_(x_a.mean(0))
        trainer.model.b_dec_b.copy_(x_b.mean(0))
    ctx = trainer.ctx
    ctx.broadcast_([*trainer.model.parameters(), *trainer.model.buffers()])
    scales = torch.tensor([normalizer.scale_a, normalizer.scale_b], dtype=torch.float64)
    scales = scales.to(trainer.device)
    ctx.broadcast_([scales])
    trainer.normalizer = Normalizer(*scales.tolist())


def _loop(
    trainer: Trainer,
    source,
    out: Path | None,
    progress: bool,
    validation: Validation | None = None,
    tracker: Tracker | None = None,
) -> None:
    cfg, ctx = trainer.cfg, trainer.ctx
    start = trainer.counters.step
    if start >= cfg.steps:
        return
    batches = source.batches(cfg.batch_size, start, cfg.seed)
    window_start, window_tokens = time.perf_counter(), 0
    # A step and its bookkeeping are one unit: Ctrl-C/SIGTERM take effect after a step, on
    # every rank after the same one, so the checkpoint saved then is consistent.
    with (
        ProgressBar("train", cfg.steps, progress and ctx.is_main, start) as bar,
        StopRequests() as stop,
    ):
        for step in range(start, cfg.steps):
            batch = next(batches, None)
            # Every rank stops at the same step, also when only one ran out (a stream's
            # ranks read different documents), or the others would wait in a collective.
            if ctx.any(batch is None):
                raise TrainingError(_ran_out(source, step, cfg.steps, batch is not None))
            stats = trainer.step(*batch)
            window_tokens += int(stats["rows"])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_start
                record = _record(trainer, stats, done, window_tokens / max(elapsed, 1e-9))
                if validation is not None:
                    record.update(_finite(_validate(trainer, validation, done)))
                trainer.counters.history.append(record)
                if tracker is not None:
                    tracker.log(record)
                window_start, window_tokens = time.perf_counter(), 0
                bar.update(completed=done, status=_status(record))
            else:
                bar.update(completed=done)
            checkpoint_due = done % cfg.checkpoint_every == 0 and done != cfg.steps
            if out is not None and checkpoint_due and ctx.is_main:
                trainer.save_checkpoint(out)
            if stop.pending(ctx):
                raise KeyboardInterrupt


def _ran_out(source, step: int, steps: int, elsewhere: bool = False) -> str:
    """Why training stopped at `step`: the source's own account where it gives one
    (`elsewhere`: another rank's source ran out, not this one's)."""
    if elsewhere:
        return f"stopped after {step:,} of {steps:,} steps: another rank's data ran out"
    inner = getattr(source, "source", source)  # a RankSlice's source
    reason = getattr(inner, "ran_out", None)
    if reason:
        return f"stopped after {step:,} of {steps:,} steps: {reason}"
    return (
        f"the activation source ran out after {step} of {steps} steps; lower `steps` or "
        "provide more data"
    )


def _record(trainer: Trainer, stats: dict[str, torch.Tensor], step: int, rate: float) -> dict:
    record = {k: float(v) for k, v in stats.items() if k != "rows"}
    record.update(
        step=step,
        k=trainer.cfg.k_at(step - 1),
        lr=trainer.cfg.lr_at(step - 1),
        tokens_per_s=rate,
        masked_outliers=trainer.counters.masked_outliers,
        nonfinite_rows=trainer.counters.nonfinite_rows,
        aux_nan_steps=trainer.counters.aux_nan_steps,
        **trainer.dead_fractions(),
    )
    record.update(trainer.moves())
    if trainer.cfg.adapt_partitions and trainer.cfg.reassign_every:
        p = trainer.model.partition  # sizes change during training
        record.update(n_a_exclusive=p.n_a_exclusive, n_b_exclusive=p.n_b_exclusive)
    return _finite(record)


def _finite(record: dict) -> dict:
    """The record with non-finite numbers as None (JSON has no NaN)."""
    return {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in record.items()}


def _validate(trainer: Trainer, validation: Validation, step: int) -> dict[str, float]:
    """Held-out FVE after `step` steps, encoded as the last step encoded its batch."""
    cfg = trainer.cfg
    return validation.measure(
        trainer.model,
        trainer.normalizer,
        cfg.k_at(step - 1),
        cfg.batch_size,
        trainer._groups,  # DSF: the designated block's own BatchTopK budget
        trainer._weighting(),
    )


def _last(history: list[dict]) -> dict:
    keys = ("loss", "fve_a", "fve_b", "fve", "l0")
    if not history:
        return {}
    last = history[-1]
    return {k: v for k, v in last.items() if k in keys or k.startswith(PREFIX)}


def _status(record: dict) -> str:
    """One-line summary of a logged record for the progress bar."""
    held_out = ""
    if record.get(f"{PREFIX}fve_a") is not None and record.get(f"{PREFIX}fve_b") is not None:
        held_out = f" (held out {record[f'{PREFIX}fve_a']:.3f}/{record[f'{PREFIX}fve_b']:.3f})"
    return (
        f"{record['tokens_per_s']:,.0f} tok/s  loss {record['loss']:.3g}  "
        f"FVE {record['fve_a']:.3f}/{record['fve_b']:.3f}{held_out}  L0 {record['l0']:.0f}  "
        f"dead {record['dead_frac']:.1%}"
    )
