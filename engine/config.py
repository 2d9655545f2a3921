"""Typed configuration for every stage, loadable from TOML.

Each stage has its own dataclass; `RunConfig` groups them so one TOML file describes a
whole run. Unknown keys are rejected with the list of valid ones, so a typo never turns
silently into a default. Presets are such files shipped in `engine/presets/`, loaded by
name (`load_preset`, or any config path that names no file but a preset).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError  # defined there, importable from here too
from engine.partition import Architecture, Partition

SCORE_WEIGHTINGS = ("sum", "mean")
RECYCLE_INITS = ("random", "residual")
TRACKERS = ("none", "tensorboard")


@dataclass
class CrosscoderConfig:
    """Shape of a crosscoder: widths, dictionary size, architecture and partition."""

    d_a: int
    d_b: int
    n_features: int = 16_384
    architecture: str = "dfc"
    a_exclusive: float | int = 0.05
    b_exclusive: float | int = 0.05
    designated: float | int = 0.10
    decoder_init_norm: float = 0.4
    # BatchTopK ranks relu(pre) x decoder norm. "sum" (the paper): sum of the feature's
    # decoder norms over models. "mean": their mean over the models the feature exists in,
    # so exclusive features are not ranked at half the weight of shared ones.
    score_weighting: str = "sum"

    def __post_init__(self) -> None:
        for name in ("d_a", "d_b", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        try:
            Architecture(self.architecture)
        except ValueError:
            valid = ", ".join(a.value for a in Architecture)
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; choose one of: {valid}"
            ) from None
        if self.architecture == Architecture.DSF and self.d_a != self.d_b:
            raise ConfigError(
                f"a DSF crosscoder ties decoder vectors across models, which needs equal "
                f"hidden sizes, but d_a={self.d_a} and d_b={self.d_b}; use 'dfc' or 'standard'"
            )
        if self.score_weighting not in SCORE_WEIGHTINGS:
            raise ConfigError(
                f"unknown score_weighting {self.score_weighting!r}; choose one of: "
                f"{', '.join(SCORE_WEIGHTINGS)}"
            )
        if not self.decoder_init_norm > 0:
            raise ConfigError(f"decoder_init_norm must be > 0, got {self.decoder_init_norm}")
        try:
            self.partition()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def partition(self) -> Partition:
        """The feature partition these settings describe."""
        return Partition.build(
            self.architecture, self.n_features, self.a_exclusive, self.b_exclusive, self.designated
        )


@dataclass
class TrainConfig:
    """Optimisation, sparsity and bookkeeping settings of crosscoder training."""

    steps: int = 100_000
    batch_size: int = 2048
    lr: float = 1e-4
    warmup_steps: int = 1000
    decay_start: float | None = None  # fraction of steps after which lr decays linearly to 0
    grad_clip: float = 1.0
    k: int = 200
    k_initial: int | None = 1000  # None: no annealing
    anneal_steps: int = 5000
    designated_k_multiplier: float = 2.0  # DSF only: denser designated-shared block
    aux_alpha: float = 0.03
    k_aux: int = 512
    dead_window_tokens: int = 10_000_000
    threshold_ema: float = 0.99
    outlier_factor: float | None = 2.0  # mask rows whose norm > factor x batch median
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast_bf16: bool = True  # only used on CUDA
    compile: bool = False
    # Every this many steps, move live shared features whose relative decoder norm stayed
    # above reassign_high (or below reassign_low) at two checks into a dead slot of the
    # matching exclusive partition (see crosscoder/reassign.py). 0: never, the paper's
    # method. The bounds are wider than the 0.2/0.8 "leaning" labels: a concept planted
    # into Gemma-3 was held by a shared feature at 0.24-0.36 (docs/planted.md).
    reassign_every: int = 100
    reassign_low: float = 0.35
    reassign_high: float = 0.65
    # With reassignment on: partition sizes adapt. A moving feature changes role in place
    # (no dead slot needed) and dead exclusive features return to the shared block as
    # fresh features, so no exclusive partition stays mostly dead (docs/training.md).
    adapt_partitions: bool = True
    # Adaptive partitions: dead windows an exclusive feature stays silent before it returns
    # to the shared block. The default, a fifth of a window, recycles the exclusive
    # features that never won a selection early, while they can still learn as shared
    # features (at 1 most of them stayed dead: docs/planted.md); more than 1 gives AuxK
    # time to revive them as exclusive features.
    recycle_after_windows: float = 0.2
    # How a recycled feature starts: "random" direction, or "residual": the reconstruction
    # error of an example drawn by its squared error (where the crosscoder is worst).
    recycle_init: str = "random"
    # Adaptive partitions: share of each exclusive partition's configured size it starts
    # with (at least one feature); moves grow it up to the configured size.
    exclusive_start: float = 1.0
    # Step of the first reassignment check; "anneal": the end of the k anneal, when features
    # have settled (earlier checks fill small partitions with whatever leans first).
    reassign_after: int | str = 0
    # Steps at the start during which BatchTopK ranks features by their mean decoder norm
    # over the models they have: at initialisation every decoder has the same norm, so the
    # sum weighting gives an exclusive feature half a shared feature's score and it never
    # fires (docs/planted.md). 0: the crosscoder's score_weighting from the first step.
    equal_score_steps: int = 0
    # Adaptive partitions: when an exclusive partition is full, a lopsided candidate takes
    # the place of the member that leant least when it moved in, if it leans more by this
    # margin (lean = max(rel, 1 - rel), at most 1); that member returns to the shared
    # block. 0.5: no swaps, a partition keeps the features that filled it first.
    swap_margin: float = 0.05
    # Share of the run after which the partitions settle: no more recycling or swaps, and
    # only features whose other decoder is already negligible (lean >= late_lean) move.
    # A move drops a decoder; made at the last checks, it leaves the rest of the dictionary
    # no steps to absorb what that decoder carried (docs/planted.md), while a near-
    # exclusive feature loses almost nothing by moving. 1: the same checks to the end.
    reassign_stop: float = 0.9
    late_lean: float = 0.8
    # Pairs held out of training (whole windows of an activation store, at most a tenth of
    # it; in-memory pairs are not split) on which validation FVE is measured at every log
    # step, and on whose windows `modeldiff evaluate` measures CE loss recovered. 0: train
    # on everything (docs/training.md, "Held-out validation").
    validation_pairs: int = 1024
    # Experiment tracking of the logged metrics: "none" or "tensorboard" (needs the
    # `tracking` extra); events go to <run>/tensorboard.
    tracking: str = "none"

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "k", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        counts = (
            "warmup_steps",
            "anneal_steps",
            "k_aux",
            "dead_window_tokens",
            "reassign_every",
            "equal_score_steps",
            "validation_pairs",
        )
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.k_initial is not None and self.k_initial < self.k:
            raise ConfigError(f"k_initial ({self.k_initial}) must be >= k ({self.k})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.decay_start is not None and not 0 <= self.decay_start < 1:
            raise ConfigError(f"decay_start must be a fraction in [0, 1), got {self.decay_start}")
        if not 0 <= self.threshold_ema < 1:
            raise ConfigError(f"threshold_ema must be in [0, 1), got {self.threshold_ema}")
        if self.outlier_factor is not None and self.outlier_factor <= 1:
            raise ConfigError(f"outlier_factor must be > 1 or None, got {self.outlier_factor}")
        if self.designated_k_multiplier <= 0:
            raise ConfigError("designated_k_multiplier must be > 0")
        if not 0 <= self.reassign_low < 0.5 < self.reassign_high <= 1:
            raise ConfigError(
                f"reassign_low and reassign_high must satisfy 0 <= low < 0.5 < high <= 1, got "
                f"{self.reassign_low} and {self.reassign_high}"
            )
        after = self.reassign_after
        if after != "anneal" and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise ConfigError(
                f'reassign_after must be a step number (>= 0) or "anneal", got {after!r}'
            )
        if not (
            isinstance(self.recycle_after_windows, int | float) and self.recycle_after_windows > 0
        ):
            raise ConfigError(
                f"recycle_after_windows must be > 0, got {self.recycle_after_windows!r}"
            )
        if not 0 < self.exclusive_start <= 1:
            raise ConfigError(f"exclusive_start must be in (0, 1], got {self.exclusive_start}")
        if not (isinstance(self.swap_margin, int | float) and 0 <= self.swap_margin <= 0.5):
            raise ConfigError(f"swap_margin must be in [0, 0.5], got {self.swap_margin!r}")
        if not 0 < self.reassign_stop <= 1:
            raise ConfigError(f"reassign_stop must be in (0, 1], got {self.reassign_stop}")
        if not 0.5 < self.late_lean <= 1:
            raise ConfigError(f"late_lean must be in (0.5, 1], got {self.late_lean}")
        if self.recycle_init not in RECYCLE_INITS:
            raise ConfigError(
                f"unknown recycle_init {self.recycle_init!r}; choose one of: "
                f"{', '.join(RECYCLE_INITS)}"
            )
        if self.tracking not in TRACKERS:
            raise ConfigError(
                f"unknown tracking {self.tracking!r}; choose one of: {', '.join(TRACKERS)}"
            )

    @property
    def first_reassignment(self) -> int:
        """Step of the first reassignment check."""
        if self.reassign_after != "anneal":
            return int(self.reassign_after)
        return self.anneal_steps if self.k_initial is not None else 0

    def reassigns_at(self, step: int) -> bool:
        """Whether a partition check runs after `step` training steps."""
        every = self.reassign_every
        return bool(every) and step % every == 0 and step >= self.first_reassignment

    def settling(self, step: int) -> bool:
        """Whether a check after `step` steps is in the settling phase (reassign_stop)."""
        return step > self.reassign_stop * self.steps

    def k_at(self, step: int) -> int:
        """BatchTopK k per token at `step` (linear anneal from k_initial to k)."""
        if self.k_initial is None or self.anneal_steps == 0 or step >= self.anneal_steps:
            return self.k
        frac = step / self.anneal_steps
        return round(self.k_initial + (self.k - self.k_initial) * frac)

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warm-up, then constant, then optional linear decay."""
        scale = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            scale = (step + 1) / self.warmup_steps
        if self.decay_start is not None:
            start = int(self.decay_start * self.steps)
            if step >= start:
                scale *= max(0.0, (self.steps - step) / max(1, self.steps - start))
        return self.lr * scale


ALIGNMENTS = ("offsets", "windows")


@dataclass
class HarvestConfig:
    """Which models, layers and texts to harvest paired activations from, and how."""

    model_a: str = "smollm2"  # demo name, hub id, local directory or .gguf file
    model_b: str = "gemma3"
    layer_a: int | str = "middle"  # index, negative index, or "middle"
    layer_b: int | str = "middle"
    # Text sources ("demo:chitchat", "demo:pydoc", "demo:kjv", "fineweb", "lmsys", a path,
    # or a table) and their shares of the text, by characters (paper: 50/50 web and chat).
    sources: list[Any] = field(default_factory=lambda: ["demo:chitchat", "demo:prose"])
    weights: list[float] | None = None  # None: equal shares
    context_length: int = 256  # tokens per window, per model, including the BOS
    max_pairs: int = 200_000
    batch_tokens: int = 4096  # padded tokens per forward pass
    shard_pairs: int = 16_384
    store_dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    model_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    alignment: str = "offsets"  # offsets | windows (the paper's Algorithm 1)
    dedupe: bool = True
    # Also pair the end of each chat model's answer header (where it decides how to answer),
    # which no message content covers (engine.harvest.align.with_answer_pairs).
    answer_pairs: bool = False

    def __post_init__(self) -> None:
        for name in ("context_length", "max_pairs", "batch_tokens", "shard_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.context_length < 8:
            raise ConfigError(f"context_length must be >= 8 tokens, got {self.context_length}")
        if self.batch_tokens < self.context_length:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens}) must be >= context_length "
                f"({self.context_length})"
            )
        from engine.dtypes import DTYPES

        for name, valid in (("store_dtype", DTYPES), ("model_dtype", ("auto", *DTYPES))):
            if getattr(self, name) not in valid:
                raise ConfigError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(valid)}"
                )
        if self.alignment not in ALIGNMENTS:
            raise ConfigError(
                f"unknown alignment {self.alignment!r}; choose one of: {', '.join(ALIGNMENTS)}"
            )
        if not self.sources:
            raise ConfigError("sources is empty; name at least one text source")
        if self.weights is not None and len(self.weights) != len(self.sources):
            raise ConfigError(
                f"{len(self.weights)} weights for {len(self.sources)} sources; give one each"
            )


@dataclass
class StreamConfig:
    """Streaming training (`modeldiff train --stream`): the pairs kept on disk for analysis
    and validation, and the mixing buffer of the pairs computed live (docs/scaling.md)."""

    # Pairs of the stream's first documents harvested into RUN_DIR/store: validation and
    # `modeldiff analyze` read them, training never sees their documents.
    analysis_pairs: int = 20_000
    # Pairs per mixing block: the stream is cut into blocks of this many pairs, each
    # shuffled before its batches are cut. A multiple of batch_size; memory
    # buffer_pairs x (d_a + d_b) x 4 bytes.
    buffer_pairs: int = 65_536

    def __post_init__(self) -> None:
        for name in ("analysis_pairs", "buffer_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def check_batch(self, batch_size: int, world_size: int = 1) -> None:
        """Refuse a batch size that does not cut the blocks (or the ranks' shares) evenly."""
        if self.buffer_pairs % batch_size:
            raise ConfigError(
                f"buffer_pairs ({self.buffer_pairs:,}) must be a multiple of batch_size "
                f"({batch_size:,}); e.g. {max(1, self.buffer_pairs // batch_size) * batch_size:,}"
            )
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size ({batch_size:,}) must be a multiple of the {world_size} "
                "processes streaming it: each takes an equal share of every batch"
            )


@dataclass
class RunConfig:
    """Everything one run needs; sections map to TOML tables."""

    crosscoder: CrosscoderConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the valid ones."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in [{section}]" if section else ""
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}{where}; valid: {', '.join(sorted(names))}"
        )
    try:
        return cls(**data)
    except TypeError as err:  # a required setting is missing
        raise ConfigError(f"[{section or cls.__name__}] {err}") from None


def load_run_config(path: str | Path, dims: tuple[int, int] | None = None) -> RunConfig:
    """Read a RunConfig from a TOML file, or from the preset `path` names if no such file
    exists.

    `dims` (d_a, d_b), e.g. from an activation store, fill in the crosscoder widths when the
    file leaves them out, and must agree with them when it does not.
    """
    if not Path(path).is_file() and str(path) in preset_names():
        return load_preset(str(path), dims)
    text, where = _config_text(path)
    return _parse_run_config(text, where, dims, preset=False)


def load_data_config(path: str | Path) -> tuple[HarvestConfig, StreamConfig]:
    """The [harvest] and [stream] settings of a TOML file or preset (what `modeldiff train
    --stream` streams); its other tables are read where they are used."""
    text, where = _config_text(path)
    data = _parse_toml(text, where)
    return (
        from_dict(HarvestConfig, data.get("harvest", {}), "harvest"),
        from_dict(StreamConfig, data.get("stream", {}), "stream"),
    )


def _config_text(path: str | Path) -> tuple[str, str]:
    """The TOML text of a config file, or of the preset `path` names if no such file
    exists, and its name for error messages."""
    path = Path(path)
    if not path.is_file():
        if str(path) in preset_names():
            text = (resources.files("engine") / "presets" / f"{path}.toml").read_text()
            return text, f"preset {str(path)!r}"
        raise ConfigError(
            f"config file not found: {path}; give a TOML file or a preset "
            f"({', '.join(preset_names())})"
        )
    try:
        text = path.read_text(encoding="utf-8")  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason}); save the "
            "config as UTF-8 TOML"
        ) from None
    return text, str(path)


def preset_names() -> list[str]:
    """Names of the presets shipped with modeldiff."""
    folder = resources.files("engine") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str, dims: tuple[int, int] | None = None) -> RunConfig:
    """The RunConfig of a shipped preset (`demo`, `paper-llama-qwen`, ...); `dims` as in
    `load_run_config`."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    text = (resources.files("engine") / "presets" / f"{name}.toml").read_text()
    return _parse_run_config(text, f"preset {name!r}", dims, preset=True)


def _parse_run_config(
    text: str, where: str, dims: tuple[int, int] | None, preset: bool
) -> RunConfig:
    """A RunConfig from TOML text; `where` names its origin in error messages."""
    data = _parse_toml(text, where)
    crosscoder = None
    if "crosscoder" in data or dims is not None:
        section = dict(data.get("crosscoder", {}))
        for name, value in zip(("d_a", "d_b"), dims or (), strict=False):
            if section.setdefault(name, value) != value:
                fix = (
                    "these activations come from other models than the preset's; use a config "
                    "file for them"
                    if preset
                    else f"remove {name} from the file or fix it"
                )
                raise ConfigError(
                    f"[crosscoder] {name} = {section[name]} in {where}, but the activations "
                    f"have width {value}; {fix}"
                )
        crosscoder = from_dict(CrosscoderConfig, section, "crosscoder")
    return RunConfig(
        crosscoder=crosscoder,
        train=from_dict(TrainConfig, data.get("train", {}), "train"),
        harvest=from_dict(HarvestConfig, data.get("harvest", {}), "harvest"),
        stream=from_dict(StreamConfig, data.get("stream", {}), "stream"),
    )


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    """The tables of a run TOML, refusing invalid TOML and unknown tables."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from None
    unknown = sorted(set(data) - {"crosscoder", "train", "harvest", "stream"})
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)} in {where}; valid: crosscoder, harvest, "
            "stream, train"
        )
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (for JSON provenance)."""
    return dataclasses.asdict(config)
