"""The planted-concept sweep: planted model x strength x rate x seed x crosscoder variant.

Each (model, strength, rate, seed) is one planting; every variant trains a crosscoder on it
and `evaluate_planted` scores it. Rows go to ``results.csv`` after every run (a rerun skips
the rows it holds, so an interrupted sweep resumes), then ``results.json``,
``summary.csv`` and ``figure.html`` (where each variant puts the concept, by strength).

This module runs the sweep; the settings live in `sweep_config`, and the summary, table and
figure in `sweep_report` (the public names are importable from here).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from engine.activations import ActivationStore
from engine.config import CrosscoderConfig, TrainConfig
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.files import atomic_write_text
from engine.planted import PlantedError
from engine.planted.evaluate import evaluate_planted
from engine.planted.pairs import PlantedPairs, load_store_pairs, open_store, residual_plant
from engine.planted.sweep_config import _SELECTION_FIELDS, KEYS, PlantedConfig
from engine.planted.sweep_report import describe, format_table, summarize, write_outputs
from engine.planted.triggers import choose_triggers, pair_tokens, trigger_labels
from engine.planted.variants import base_configs, split_overrides, variant_configs
from engine.sweep_results import append_row, load_results, write_csv

# The sweep's public names, importable from here whichever module defines them.
__all__ = [
    "PlantedConfig",
    "check_runs",
    "eval_rows",
    "format_table",
    "planted_pairs",
    "run_configs",
    "run_planted",
    "summarize",
    "train_and_evaluate",
]

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_configs(
    cfg: PlantedConfig, dims: tuple[int, int], variant: str, seed: int
) -> tuple[CrosscoderConfig, TrainConfig]:
    """Configs of one run: preset, then steps/batch, common overrides, seed, the variant."""
    base = base_configs(cfg.preset, dims, cfg.steps, cfg.batch_size)
    run: dict[str, Any] = {"seed": seed}
    if cfg.device is not None:
        run["device"] = cfg.device
    return variant_configs(base, split_overrides(cfg.overrides), ({}, run), cfg.variants[variant])


def check_runs(cfg: PlantedConfig, dims: tuple[int, int]) -> None:
    """Build every variant's configs now, so a bad value fails before any work is done."""
    for variant in cfg.variants:
        try:
            run_configs(cfg, dims, variant, cfg.seeds[0])
        except ConfigError as err:
            raise PlantedError(f"variant {variant!r}: {err}") from None


def train_and_evaluate(
    cfg: PlantedConfig,
    pairs: PlantedPairs,
    eval_rows: torch.Tensor,
    shift: torch.Tensor,
    into: str,
    seed: int,
    variant: str,
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train variant `variant` on the planted pairs and return its report."""
    from engine.crosscoder.training import train

    dims = (pairs.x_a.shape[1], pairs.x_b.shape[1])
    cc_cfg, train_cfg = run_configs(cfg, dims, variant, seed)
    # Fitted on every pair rather than the trainer's first batches.
    normalizer = Normalizer.from_median_norms(*pairs.median_norms(), *dims)
    result = train(
        cc_cfg, train_cfg, pairs, out_dir=run_dir, normalizer=normalizer, progress=progress
    )
    report = evaluate_planted(
        result.crosscoder, result.normalizer, pairs, eval_rows, into, shift, result.final,
        cfg.threshold, cfg.low, cfg.high,
    )  # fmt: skip
    return {"architecture": cc_cfg.architecture, "steps": train_cfg.steps, **report}


def planted_pairs(
    cfg: PlantedConfig,
    store: ActivationStore,
    into: str,
    strength: float,
    rate: float,
    seed: int,
    clean: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[PlantedPairs, torch.Tensor]:
    """The pairs of one planting (training source with labels) and its shift in raw units.

    `clean` (the store's activations, for the residual kind) saves reading them again.
    """
    if cfg.kind in ("residual", "token"):
        x_a, x_b = clean if clean is not None else load_store_pairs(store, cfg.max_pairs)
        mask = None
        if cfg.kind == "token":  # the pairs where the planted model reads a trigger token
            tokens = pair_tokens(store, into, len(x_a))
            mask = trigger_labels(tokens, choose_triggers(tokens, rate, seed, tuple(cfg.ranks)))
        plant = residual_plant(x_a if into == "a" else x_b, into, strength, rate, seed, mask)
        return _with_holdout(cfg, x_a, x_b, plant.mask, plant, store.manifest), plant.vector
    from engine.planted.embedding import prepare_embedding_plant

    folder = Path(cfg.out_dir) / "planted" / f"{into}-s{strength:g}-r{rate:g}-seed{seed}"
    plant = prepare_embedding_plant(
        cfg.store, folder, into, strength, rate, seed, cfg.max_pairs, tuple(cfg.ranks),
        cfg.keep_models, progress,
    )  # fmt: skip
    planted = ActivationStore(plant.store)
    x_a, x_b = load_store_pairs(planted)
    labels = trigger_labels(pair_tokens(planted, into), plant.triggers)
    return _with_holdout(cfg, x_a, x_b, labels, None, planted.manifest), plant.shift


def _with_holdout(cfg: PlantedConfig, x_a, x_b, labels, plant, manifest) -> PlantedPairs:
    """PlantedPairs training on all but the last `holdout` share of the pairs."""
    n_train = len(labels) - round(cfg.holdout * len(labels))
    return PlantedPairs(x_a, x_b, labels, plant, torch.arange(n_train), manifest)


def eval_rows(cfg: PlantedConfig, pairs: PlantedPairs) -> torch.Tensor:
    """Global indices evaluated: the held-out pairs, or every pair without a holdout."""
    n, n_train = len(pairs), len(pairs.train_rows)
    return torch.arange(n_train if n_train < n else 0, n)


def run_planted(cfg: PlantedConfig, progress: bool = True, log: Log = _stderr) -> pd.DataFrame:
    """Run every missing (model, strength, rate, seed, variant) and write all outputs."""
    out = Path(cfg.out_dir)
    store = open_store(cfg.store)
    check_runs(cfg, (store.d_a, store.d_b))
    out.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, cfg)
    results = load_results(out, KEYS)
    done = {_key(r) for r in results[KEYS].itertuples(index=False)} if len(results) else set()
    todo: dict[tuple, list[str]] = {}
    for seed in cfg.seeds:
        for into in cfg.into:
            for rate in cfg.rates:
                for strength in cfg.strengths or []:
                    group = (into, float(strength), float(rate), seed)
                    names = [v for v in cfg.variants if _key((cfg.kind, *group, v)) not in done]
                    if names:
                        todo[group] = names
    total = sum(len(v) for v in todo.values())
    if total:
        log(f"planted ({cfg.kind}): {total} runs to do in {out}")
    clean = load_store_pairs(store, cfg.max_pairs) if todo and cfg.kind != "embedding" else None
    count = 0
    for (into, strength, rate, seed), names in todo.items():
        pairs, shift = planted_pairs(cfg, store, into, strength, rate, seed, clean, progress)
        rows = eval_rows(cfg, pairs)
        for variant in names:
            count += 1
            start = time.perf_counter()
            key = {"kind": cfg.kind, "into": into, "strength": strength, "rate": rate}
            key.update(seed=seed, variant=variant)
            run_dir = out / "runs" / _run_name(key) if cfg.keep_runs else None
            row = {**key, **train_and_evaluate(
                cfg, pairs, rows, shift, into, seed, variant, run_dir, progress
            )}  # fmt: skip
            row["seconds"] = time.perf_counter() - start
            results = append_row(results, row)
            # Written after every run so an interruption loses at most the current one.
            write_csv(results, out / "results.csv")
            log(f"[{count}/{total}] {describe(row)}")
    # Read back, so fresh and resumed sweeps return the same column types.
    selected = _select(load_results(out, KEYS), cfg)
    write_outputs(selected, cfg, out)
    return selected


def _key(values) -> tuple:
    """A run's identity, with numbers normalised so CSV round trips compare equal."""
    kind, into, strength, rate, seed, variant = values
    return (str(kind), str(into), float(strength), float(rate), int(seed), str(variant))


def _run_name(key: dict[str, Any]) -> str:
    return f"{key['variant']}-{key['into']}-s{key['strength']:g}-r{key['rate']:g}-seed{key['seed']}"


def _select(results: pd.DataFrame, cfg: PlantedConfig) -> pd.DataFrame:
    """Rows of the runs this configuration asks for, in a stable order."""
    if not len(results):
        return results
    mask = (
        (results["kind"] == cfg.kind)
        & results["into"].isin(cfg.into)
        & results["strength"].isin([float(s) for s in cfg.strengths or []])
        & results["rate"].isin([float(r) for r in cfg.rates])
        & results["seed"].isin(cfg.seeds)
        & results["variant"].isin(list(cfg.variants))
    )
    return results[mask].sort_values(KEYS).reset_index(drop=True)


def _check_same_sweep(out: Path, cfg: PlantedConfig) -> None:
    """Refuse to mix results made with other settings, or another variant under a name."""
    path = out / "sweep_config.json"
    current = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_FIELDS}
    current["store"] = str(Path(cfg.store).resolve())
    current = json.loads(json.dumps(current))  # tuples as lists, as read back
    variants = json.loads(json.dumps(cfg.variants))
    if path.exists():
        saved = json.loads(path.read_text())
        known = saved.pop("variants", {})
        diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        diffs += [f"variant {n!r}" for n in variants if n in known and known[n] != variants[n]]
        if diffs:
            raise PlantedError(
                f"{out} holds a planted sweep made with different settings ({', '.join(diffs)});"
                " use another --out directory or delete it to start over"
            )
        variants = {**known, **variants}
    atomic_write_text(path, json.dumps({**current, "variants": variants}, indent=2))
