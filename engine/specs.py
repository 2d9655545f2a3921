"""What a run records about its two models, typed: `ModelSpec` (one model) and `PairSpec`
(models A and B).

A harvest builds the pair once from the loaded models (`ModelSpec.from_loaded`) and writes
it into the activation store's manifest under "models" (`PairSpec.to_dict`); training copies
that entry into the run's crosscoder.json, and analysis into the results database's `runs`
row as its `model_a` / `model_b` columns (`PairSpec.run_columns`). Every reader parses the
entry back with `PairSpec.from_dict` / `PairSpec.from_run` instead of looking keys up.

The JSON shape is the one those files and rows have always had, one object per model::

    {"name": "smollm2", "source": {"kind": "demo", ...}, "class": "LlamaForCausalLM",
     "layer": 15, "n_layers": 30, "d_model": 576, "chat_template": true}

Every key is optional (older runs, stitches and hand-written rows record fewer), a missing
key reads as None and is left out again when written, and keys this version does not know
are kept, so `from_dict(d).to_dict() == d`.

This module imports nothing of the engine: any layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.models.loading import LoadedModel

SIDES = ("a", "b")

# A ModelSpec field -> its JSON key, in the order a harvest writes them.
_KEYS = {
    "name": "name",
    "source": "source",
    "model_class": "class",
    "layer": "layer",
    "n_layers": "n_layers",
    "d_model": "d_model",
    "chat_template": "chat_template",
}
# What a stitch records of each model, and compares against a run's.
STITCH_FIELDS = ("name", "layer", "d_model")


def _frozen(value: Any) -> Any:
    """A read-only view of a mapping (other values as they are)."""
    return MappingProxyType(dict(value)) if isinstance(value, Mapping) else value


def _thawed(value: Any) -> Any:
    """A plain dict again for JSON (other values as they are)."""
    return dict(value) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class ModelSpec:
    """One model of a pair as a run records it; None where the record lacks the field."""

    name: str | None = None  # the spec the user gave: demo name, hub id or local path
    # Where the weights came from: {"kind": "demo" | "hub" | "dir" | "gguf", "id" | "path",
    # "revision" | "sha256" | "file"} (`LoadedModel.source`); hand-written rows may hold a
    # string instead, kept as it is.
    source: Mapping[str, Any] | str | None = None
    model_class: str | None = None  # the transformers class, "class" in JSON
    layer: int | None = None  # the block whose output was captured
    n_layers: int | None = None
    d_model: int | None = None  # the width of the residual stream
    chat_template: bool | None = None  # whether the tokenizer has one
    # Other keys as read: a newer version's, and known ones written as null.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _frozen(self.source))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, layer: int) -> ModelSpec:
        """The record of a loaded model captured at `layer`."""
        return cls(
            name=loaded.name,
            source=loaded.source,
            model_class=type(loaded.model).__name__,
            layer=layer,
            n_layers=loaded.n_layers,
            d_model=loaded.d_model,
            chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelSpec:
        """Parse one model's record; None (or anything not a mapping) is an empty one."""
        if not isinstance(data, Mapping):
            return cls()
        known = {f: data[key] for f, key in _KEYS.items() if data.get(key) is not None}
        # Unknown keys, and known ones written as null, come back as they were.
        extra = {k: v for k, v in data.items() if k not in _KEYS.values() or v is None}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: the known fields in their usual order, the others after."""
        out = {key: _thawed(v) for f, key in _KEYS.items() if (v := getattr(self, f)) is not None}
        return out | {k: v for k, v in self.extra.items() if k not in out}

    @property
    def recorded(self) -> bool:
        """Whether the record says which model and layer (enough to load and steer it)."""
        return bool(self.name) and self.layer is not None

    @property
    def weights(self) -> Any:
        """What identifies the weights: their hash, a hub id at its revision, else the path,
        id or name."""
        src = self.source if isinstance(self.source, Mapping) else {}
        if src.get("sha256"):
            return src["sha256"]
        if src.get("kind") == "hub":
            return f"{src.get('id')}@{src.get('revision')}"
        return src.get("path") or src.get("id") or self.name

    @property
    def identity(self) -> tuple[Any, Any, Any]:
        """What makes two captures the same: the weights, the layer and the width."""
        return self.weights, self.layer, self.d_model

    def same_capture(self, other: ModelSpec) -> bool:
        """Whether both capture the same weights, layer and width. A run published to the
        Hub records a local model's folder by its last part only (`engine.hub.publishable`),
        so such a name matches a full path ending in it."""
        if self.identity == other.identity:
            return True
        ours, theirs = self.weights, other.weights
        if (self.layer, self.d_model) != (other.layer, other.d_model):
            return False
        if not (isinstance(ours, str) and isinstance(theirs, str)):
            return False
        if ("/" in ours) == ("/" in theirs):
            return False
        return PurePath(ours).name == PurePath(theirs).name

    @property
    def label(self) -> str:
        """Name, layer and width for messages: 'smollm2' (layer 15, d 576)."""
        return f"{self.name!r} (layer {self.layer}, d {self.d_model})"

    @property
    def where(self) -> str:
        """Name, layer and width for stitch messages: 'smollm2' layer 15 (width 576)."""
        return f"{self.name!r} layer {self.layer} (width {self.d_model})"

    def brief(self) -> ModelSpec:
        """Only the fields a stitch records (name, layer, width)."""
        return ModelSpec(**{f: getattr(self, f) for f in STITCH_FIELDS})

    def conflicts_with(self, other: ModelSpec) -> bool:
        """Whether a name, layer or width that both record differs."""
        pairs = ((getattr(self, f), getattr(other, f)) for f in STITCH_FIELDS)
        return any(x is not None and y is not None and x != y for x, y in pairs)


_EMPTY = ModelSpec()


@dataclass(frozen=True)
class PairSpec:
    """Models A and B of a run (a side is None where the record has no entry for it)."""

    a: ModelSpec | None = None
    b: ModelSpec | None = None

    @classmethod
    def from_dict(cls, models: Mapping[str, Any] | None) -> PairSpec:
        """Parse a "models" entry ({"a": {...}, "b": {...}}); None is an unknown pair."""
        if not isinstance(models, Mapping):
            return cls()
        return cls(**{k: ModelSpec.from_dict(models[k]) for k in SIDES if k in models})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The "models" entry of a store manifest or crosscoder.json."""
        return {k: spec.to_dict() for k in SIDES if (spec := getattr(self, k)) is not None}

    @classmethod
    def from_run(cls, run: Mapping[str, Any]) -> PairSpec:
        """The models of a results-database `runs` row (its model_a / model_b columns)."""
        return cls(*(ModelSpec.from_dict(run.get(f"model_{k}")) for k in SIDES))

    def run_columns(self) -> dict[str, dict[str, Any]]:
        """The model_a / model_b columns of a `runs` row."""
        return {f"model_{k}": self[k].to_dict() for k in SIDES}

    def __getitem__(self, side: str) -> ModelSpec:
        """Model 'a' or 'b' (an empty record where the pair has none)."""
        if side not in SIDES:
            raise KeyError(f"model must be 'a' or 'b', got {side!r}")
        spec = getattr(self, side)
        return _EMPTY if spec is None else spec

    @property
    def known(self) -> bool:
        """Whether anything is recorded (runs and stitches may record no models)."""
        return self.a is not None or self.b is not None

    def missing(self, side: str) -> str | None:
        """Why model `side` cannot be loaded and steered from this record (it lacks the
        model's name or layer), or None."""
        if self[side].recorded:
            return None
        return f"the run does not record which model {side.upper()} and layer it was trained on"

    def require(self, side: str, error: type[Exception] = ValueError) -> ModelSpec:
        """Model `side`, which records its name and layer; `error` says so if it does not."""
        problem = self.missing(side)
        if problem:
            raise error(problem)
        return self[side]

    def layer(self, side: str, error: type[Exception] = ValueError) -> int:
        """Model `side`'s captured layer; `error` says so if the run does not record it."""
        layer = self[side].layer
        if layer is None:
            raise error(f"the run does not record model {side.upper()}'s layer")
        return int(layer)

    def brief(self) -> PairSpec:
        """Only the fields a stitch records of each model."""
        return replace(self, **{k: s.brief() for k in SIDES if (s := getattr(self, k)) is not None})

    def difference(self, other: PairSpec) -> tuple[str, ModelSpec, ModelSpec] | None:
        """The first side whose model or layer differs from `other`'s (by weights, layer
        and width), as (side, ours, theirs); None when both sides match or either pair is
        unknown."""
        if not self.known or not other.known:
            return None
        for side in SIDES:
            if not self[side].same_capture(other[side]):
                return side, self[side], other[side]
        return None
