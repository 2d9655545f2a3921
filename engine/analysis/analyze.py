"""`analyze`: a trained crosscoder and its activation store into the results database.

One pass over the store gives every feature's statistics and example candidates
(scan.py); a second, smaller pass reads the chosen examples' activations (examples.py); the
decoder gives norms, cosines and nearest features (geometry.py). Everything is written to
DuckDB under one run id, replacing an earlier analysis of the same run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.activations import ActivationStore
from engine.analysis.examples import ExampleConfig, choose, read_examples
from engine.analysis.geometry import decoder_stats, neighbors
from engine.analysis.logit_effects import run_logit_effects
from engine.analysis.scan import EntryCache, ScanConfig, ScanResult, scan
from engine.crosscoder.checkpoint import (
    CheckpointError,
    check_models,
    header_models,
    load_crosscoder,
    weights_fingerprint,
)
from engine.results import Database, ResultsDBError
from engine.run_ids import RUN_ID_RULE, run_id_problem
from engine.specs import PairSpec

TEMP_PREFIX = "modeldiff-analyze-"


@dataclass(frozen=True)
class AnalyzeResult:
    """What an analysis wrote and how long its parts took."""

    run_id: str
    n_pairs: int
    n_features: int
    n_dead: int
    n_contexts: int
    seconds: dict[str, float]
    notes: tuple[str, ...] = ()  # parts left out, and why

    def summary(self) -> str:
        """A few lines for the command line."""
        s = self.seconds
        rate = self.n_pairs / s["scan"] if s["scan"] else float("nan")
        return (
            f"analysed run {self.run_id!r}: {self.n_pairs:,} pairs through {self.n_features:,} "
            f"features ({rate:,.0f} tokens/s), {self.n_dead:,} never active, "
            f"{self.n_contexts:,} contexts\n"
            + ", ".join(f"{k} {v:.1f} s" for k, v in s.items())
            + "".join(f"\n{note}" for note in self.notes)
        )


def analyze(
    run_dir: str | Path,
    store_path: str | Path,
    db_path: str | Path,
    *,
    run_id: str | None = None,
    scan_cfg: ScanConfig | None = None,
    example_cfg: ExampleConfig | None = None,
    neighbors_k: int = 10,
    progress: bool = True,
    cache_bytes: int = 2 << 30,
) -> AnalyzeResult:
    """Analyse every feature of the crosscoder in `run_dir` on the store at `store_path`."""
    run_dir, store_path = Path(run_dir), Path(store_path)
    run_id = run_id or run_dir.resolve().name
    if run_id_problem(run_id):
        # Before the scan, not after it: the id is written to rows and file names.
        raise ResultsDBError(
            f"{run_id_problem(run_id)} (the run directory's name): a run id has "
            f"{RUN_ID_RULE}; pass --run-id NAME"
        )
    cc, normalizer, header = load_crosscoder(run_dir)
    weights = weights_fingerprint(cc)
    if Path(db_path).is_file():  # before the scan: a refusal must not come after hours
        with Database(db_path, create=False) as db:
            db.check_weights(run_id, weights)
    store = ActivationStore(store_path)
    if (store.d_a, store.d_b) != (cc.d_a, cc.d_b):
        raise CheckpointError(
            f"the crosscoder in {run_dir} has widths {cc.d_a}/{cc.d_b} but the store at "
            f"{store_path} holds {store.d_a}/{store.d_b}; analyse it on the store it was "
            "trained on"
        )
    models = PairSpec.from_dict(store.manifest["models"])
    check_models(
        header_models(header),
        models,
        f"the store at {store_path}",
        "analyse it on the store it was trained on",
    )
    seconds: dict[str, float] = {}
    remove_stale_temp_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        # The scan keeps its non-zero activations on disk (bounded), so the examples are
        # read back instead of encoding the store a second time.
        cache = EntryCache(tmp, cache_bytes)
        t = time.perf_counter()
        result = scan(cc, normalizer, store, scan_cfg, progress, cache)
        seconds["scan"] = time.perf_counter() - t
        t = time.perf_counter()
        choices = choose(result, example_cfg)
        contexts, windows = read_examples(cc, normalizer, store, result, choices, progress, cache)
        seconds["examples"] = time.perf_counter() - t
    t = time.perf_counter()
    features = feature_table(result, decoder_stats(cc))
    near = neighbors(cc, neighbors_k)
    seconds["geometry"] = time.perf_counter() - t
    t = time.perf_counter()
    # Through each model's final norm and unembedding: needs the models, not the store.
    effects = run_logit_effects(cc, normalizer, models, progress=progress)
    seconds["logit effects"] = time.perf_counter() - t
    t = time.perf_counter()
    # One transaction: a run in the database is always a complete one, even if this
    # process is killed while writing.
    with Database(db_path) as db, db.transaction():
        db.add_run(
            run_id, weights=weights,
            **_run_record(run_dir, store_path, store, models, header, result, scan_cfg),
        )  # fmt: skip
        db.write_features(run_id, features)
        db.write_windows(run_id, windows)
        db.write_contexts(run_id, contexts)
        db.write_neighbors(run_id, near)
        db.write_logit_effects(run_id, effects.frame)
        for side in ("a", "b"):
            db.write_vocab(run_id, side, effects.vocab.get(side, []))
    seconds["write"] = time.perf_counter() - t
    return AnalyzeResult(
        run_id,
        result.n_pairs,
        len(features),
        int(features["dead"].sum()),
        len(contexts),
        seconds,
        (effects.skipped,) if effects.skipped else (),
    )


def remove_stale_temp_dirs() -> list[Path]:
    """Delete the temporary directories of analyses that were killed (`kill -9` leaves
    them, with up to `cache_bytes` each); returns those removed."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        match = re.match(rf"{TEMP_PREFIX}(\d+)-", folder.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def feature_table(result: ScanResult, geometry: pd.DataFrame) -> pd.DataFrame:
    """Per-feature statistics of the scan joined with the decoder geometry."""
    n_active = result.n_active.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_active > 0, result.sum_act.numpy() / n_active, 0.0)
    edges = ScanResult.hist_edges().tolist()
    stats = pd.DataFrame(
        {
            "density": n_active / max(result.n_pairs, 1),
            "n_active": n_active,
            "max_act": result.max_act.numpy().astype(np.float64),
            "mean_act": mean,
            "hist_counts": list(result.hist.numpy()),
            "hist_edges": [edges] * len(n_active),
            "dead": n_active == 0,
            # Steering adds alpha * s_max * decoder (paper B.4.3): s_max is the largest
            # activation seen, in crosscoder units (the steering code converts to raw units).
            "s_max": result.max_act.numpy().astype(np.float64),
        }
    )
    return pd.concat([geometry.reset_index(drop=True), stats], axis=1)


def _run_record(
    run_dir, store_path, store, models: PairSpec, header, result, scan_cfg
) -> dict[str, Any]:
    """The runs-table row: models, partition, config, metrics, paths and provenance."""
    return {
        "name": run_dir.name,
        **models.run_columns(),  # model_a, model_b
        "architecture": header["architecture"],
        "n_features": sum(header["partition"].values()),
        "partition": header["partition"],
        "config": {
            "crosscoder": header.get("crosscoder_config", {}),
            "train": header.get("train_config", {}),
            "scan": asdict(scan_cfg or ScanConfig()),
            "normalizer": header["normalizer"],
        },
        "metrics": header.get("metrics", {}),
        "history": header.get("history"),
        "checkpoint_path": str(run_dir.resolve()),
        "store_path": str(Path(store_path).resolve()),
        "provenance": {
            "store": store.manifest.get("provenance", {}),
            "store_data": store.manifest.get("data", {}),
            "analysed_pairs": result.n_pairs,
        },
    }
