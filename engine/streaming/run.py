"""The data side of a streamed training run (`modeldiff train --stream`).

A streamed run directory holds, beside the training files (engine.crosscoder.checkpoint):

    stream.json   the stream's settings: models, layers, text sources, context length,
                  analysis_pairs, buffer_pairs, ...; a rerun that would stream other data
                  is refused (as a checkpoint refuses other training settings)
    store/        the analysis store: the stream's first documents, harvested with the
                  ordinary harvest up to analysis_pairs pairs. Training never sees them;
                  validation, `modeldiff analyze` and `evaluate` read them

`StreamRun` checks the run directory and loads the models (so the caller learns the widths
before the crosscoder config is read), then `open` harvests (or resumes, or finds complete)
the analysis store and returns the live source.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.activations.reader import read_manifest
from engine.config import HarvestConfig, StreamConfig, to_dict
from engine.crosscoder import checkpoint as ckpt
from engine.crosscoder.distributed import launched_world
from engine.errors import UserError
from engine.files import atomic_write_text
from engine.harvest.forward import load_pair, prepare
from engine.harvest.pipeline import harvest
from engine.harvest.text import mixture_of
from engine.models.capture import capture_residual
from engine.models.loading import LoadedModel
from engine.streaming.source import StreamSource

STORE_DIR = "store"
STREAM_FILE = "stream.json"
FORMAT = "modeldiff-stream"
# Harvest settings that change only speed or where things run, not which pairs are streamed
# (max_pairs: a streamed run's length is its steps; its store holds analysis_pairs).
_NOT_STREAM_SETTINGS = ("max_pairs", "batch_tokens", "shard_pairs", "device")
_RANK_POLL_SECONDS = 2.0


class StreamError(UserError, ValueError):
    """A streamed run cannot go on as asked (other stream settings, not a streamed run, no
    text left for training)."""


def stream_settings(cfg: HarvestConfig, stream: StreamConfig, world_size: int) -> dict[str, Any]:
    """What decides the pairs a streamed run trains on, as stream.json records it."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_STREAM_SETTINGS}
    return {**settings, **to_dict(stream), "world_size": world_size}


def check_run(run_dir: Path, settings: dict[str, Any], fresh: bool) -> None:
    """Refuse, before the models load, to resume a run that streamed other data, or to
    stream into a run trained on a store or pairs file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise StreamError(f"--out {run_dir} is a file; give a directory for the training run")
    if fresh:
        return
    file = run_dir / STREAM_FILE
    if not file.is_file():
        if ckpt.has_crosscoder(run_dir) or (run_dir / ckpt.CHECKPOINTS_DIR).is_dir():
            raise StreamError(
                f"{run_dir} holds a run trained on stored activations, not a stream; choose a "
                "new --out directory, or pass --fresh to start it over"
            )
        return
    saved = _read_record(file).get("settings", {})
    changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
    if changed:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise StreamError(
            f"the run at {run_dir} was streamed with other settings ({shown}); resuming it "
            "would train on other data: rerun with its settings, choose a new --out, or pass "
            "--fresh to start over"
        )


def _read_record(file: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StreamError(f"{file} is damaged ({err}); pass --fresh to start over") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise StreamError(f"{file} is not a modeldiff stream record; pass --fresh to start over")
    return record


def recorded_store(run_dir: str | Path) -> Path | None:
    """The analysis store of a streamed run (crosscoder.json "stream"), or None for a run
    that was not streamed."""
    header_file = Path(run_dir) / ckpt.HEADER_FILE
    try:
        stream = json.loads(header_file.read_text()).get("stream")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(stream, dict) or not isinstance(stream.get("store"), str):
        return None
    return Path(run_dir) / stream["store"]


class StreamRun:
    """A streamed run's data: settings checked against `run_dir` and models loaded at
    construction, the analysis store and the live source by `open`."""

    def __init__(
        self,
        cfg: HarvestConfig,
        stream: StreamConfig,
        run_dir: str | Path,
        *,
        fresh: bool = False,
        progress: bool = True,
        models: tuple[LoadedModel, LoadedModel] | None = None,
        capture: Callable[..., torch.Tensor] = capture_residual,
    ) -> None:
        self.cfg, self.stream = cfg, stream
        self.run_dir, self.fresh, self.capture = Path(run_dir), fresh, capture
        self.rank, self.world_size = (launched_world() or (0, 1, 0))[:2]
        self.progress = progress and self.rank == 0
        self.settings = stream_settings(cfg, stream, self.world_size)
        # Everything that can be checked without the models is checked first.
        check_run(self.run_dir, self.settings, fresh)
        mixture_of(cfg.sources, cfg.weights, check=True)
        self.models = models or load_pair(cfg, self.progress, self.rank, self.world_size)

    @property
    def dims(self) -> tuple[int, int]:
        return self.models[0].d_model, self.models[1].d_model

    @property
    def store(self) -> Path:
        return self.run_dir / STORE_DIR

    def open(self, batch_size: int) -> StreamSource:
        """Harvest (or resume) the analysis store and return the live source for training
        in batches of `batch_size`."""
        self.stream.check_batch(batch_size, self.world_size)
        if self.rank == 0:  # before the harvest: a rerun with other settings is then refused
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {"format": FORMAT, "settings": self.settings, "store": STORE_DIR}
            atomic_write_text(self.run_dir / STREAM_FILE, json.dumps(record, indent=1))
        result = harvest(
            replace(self.cfg, max_pairs=self.stream.analysis_pairs), self.store,
            fresh=self.fresh, progress=self.progress, models=self.models, capture=self.capture,
            rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        if self.progress:
            print(
                f"analysis store: {result.pairs:,} pairs at {self.store} (held out of "
                "training; validation and `modeldiff analyze` read it)",
                file=sys.stderr,
            )
        manifest = self._complete_store()
        if manifest["progress"].get("exhausted"):
            stored = manifest["stats"]["count"]
            raise StreamError(
                f"the text sources ran out within the analysis store ({stored:,} of "
                f"analysis_pairs {self.stream.analysis_pairs:,} pairs), leaving no text to "
                "train on; add text or lower analysis_pairs (with --fresh)"
            )
        models = tuple(prepare(m, layer, self.capture) for m, layer in self._layers())
        return StreamSource(
            self.cfg, self.stream, models, self.store, progress=self.progress,
            record={"store": STORE_DIR, "settings": self.settings},
            run_entries=(STORE_DIR, STREAM_FILE),
        )  # fmt: skip

    def _layers(self) -> list[tuple[LoadedModel, int | str]]:
        return [(self.models[0], self.cfg.layer_a), (self.models[1], self.cfg.layer_b)]

    def _complete_store(self) -> dict[str, Any]:
        """The store's manifest once every rank has harvested its share (torchrun)."""
        said = False
        while True:
            manifest = read_manifest(self.store)
            if manifest["progress"]["complete"]:
                return manifest
            if not said and self.progress:
                print("waiting for the other ranks to finish the analysis store", file=sys.stderr)
                said = True
            time.sleep(_RANK_POLL_SECONDS)
