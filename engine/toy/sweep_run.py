"""Running the toy-model sweep: train and score every missing (architecture, size, seed).

Rows already in ``results.csv`` are skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from engine.errors import ConfigError
from engine.files import atomic_write_text
from engine.progress import ProgressBar
from engine.sweep_results import append_row, load_results, write_csv
from engine.toy.evaluate import evaluate_recovery
from engine.toy.model import ToyModel
from engine.toy.sweep_config import _SELECTION_FIELDS, KEYS, SweepConfig, SweepError
from engine.toy.sweep_report import write_outputs

RunFn = Callable[[SweepConfig, ToyModel, str, int, int], dict[str, Any]]


def train_and_evaluate(
    cfg: SweepConfig, toy: ToyModel, architecture: str, n_features: int, seed: int
) -> dict[str, Any]:
    """Train one crosscoder on the toy model and return its recovery report and fit."""
    from engine.crosscoder.training import train

    result = train(
        cfg.crosscoder_config(architecture, n_features),
        cfg.train_config(seed, n_features),
        source=toy,
        out_dir=None,
        progress=False,
    )
    cc, norm = result.crosscoder, result.normalizer
    # The trainer works on scaled activations; map decoders back to the toy's own units.
    decoder_a = norm.to_raw(cc.decoder_matrix("a").cpu(), "a")
    decoder_b = norm.to_raw(cc.decoder_matrix("b").cpu(), "b")
    report = evaluate_recovery(
        toy, decoder_a, decoder_b, cc.partition.roles(), cfg.threshold, cfg.low, cfg.high
    )
    fit = {k: result.final.get(k) for k in ("fve", "fve_a", "fve_b", "l0", "dead_frac")}
    return {**report.to_dict(), **fit}


def run_sweep(
    cfg: SweepConfig, progress: bool = True, run_fn: RunFn = train_and_evaluate
) -> pd.DataFrame:
    """Run every missing (architecture, size, seed) combination and write all outputs."""
    _check_configs(cfg)  # a bad setting fails before anything is written
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, cfg)
    results = load_results(out, KEYS)
    done = {tuple(r) for r in results[KEYS].itertuples(index=False)} if len(results) else set()
    todo = [
        (arch, size, seed)
        for seed in cfg.seeds
        for size in cfg.sizes
        for arch in cfg.architectures
        if (arch, size, seed) not in done
    ]
    with ProgressBar("toy sweep", len(todo), progress) as bar:
        toys: dict[int, ToyModel] = {}
        for arch, size, seed in todo:
            bar.update(status=f"{arch} F={size} seed={seed}")
            if seed not in toys:  # each seed is its own toy model; toy.seed is not used
                toys[seed] = ToyModel(dataclasses.replace(cfg.toy, seed=seed))
            toy = toys[seed]
            start = time.perf_counter()
            row = {"architecture": arch, "n_features": size, "seed": seed}
            row.update(run_fn(cfg, toy, arch, size, seed))
            row["seconds"] = time.perf_counter() - start
            results = append_row(results, row)
            # Written after every run so an interruption loses at most the current one.
            write_csv(results, out / "results.csv")
            bar.update(advance=1)
    selected = _select(results, cfg)
    write_outputs(selected, cfg, out)
    return selected


def _select(results: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """Rows of the runs this configuration asks for, in a stable order."""
    if not len(results):
        return results
    mask = (
        results["architecture"].isin(cfg.architectures)
        & results["n_features"].isin(cfg.sizes)
        & results["seed"].isin(cfg.seeds)
    )
    return results[mask].sort_values(KEYS).reset_index(drop=True)


def _check_configs(cfg: SweepConfig) -> None:
    """Build every run's crosscoder and training config once, as a SweepError if one is bad."""
    try:
        for size in cfg.sizes:
            cfg.train_config(cfg.seeds[0] if cfg.seeds else 0, size)
            for arch in cfg.architectures:
                cfg.crosscoder_config(arch, size)
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _check_same_sweep(out: Path, cfg: SweepConfig) -> None:
    """Refuse to mix results made with different toy or training settings."""
    path = out / "sweep_config.json"
    current = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_FIELDS}
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diffs:
            raise SweepError(
                f"{out} holds a sweep made with different settings ({', '.join(diffs)}); "
                f"use another --out directory or delete it to start over"
            )
    else:
        atomic_write_text(path, json.dumps(current, indent=2))
