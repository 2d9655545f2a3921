"""Crosscoder variants of the benchmark: a name and overrides of the preset's configs.

A variant is ``(crosscoder overrides, train overrides)``, applied with `dataclasses.replace`
to the preset's `CrosscoderConfig` and `TrainConfig`. Any field those dataclasses have may
be overridden, including fields added later; unknown keys are refused with the valid ones.
On the command line a variant is ``NAME`` (a known variant) or ``NAME:KEY=VALUE,...``
(the known variant NAME, or the preset when NAME is new, with these settings on top).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.config import CrosscoderConfig, TrainConfig, load_preset
from engine.planted import PlantedError

Overrides = dict[str, Any]
Variant = tuple[Overrides, Overrides]

KNOWN_VARIANTS: dict[str, Variant] = {
    "standard": ({"architecture": "standard"}, {}),
    "dfc": ({"architecture": "dfc"}, {}),  # the default: reassignment, adaptive partitions
    "dfc-fixed": ({"architecture": "dfc"}, {"adapt_partitions": False}),  # fixed sizes
    "dfc-paper": ({"architecture": "dfc"}, {"reassign_every": 0}),  # the paper's method
    "dfc-mean": ({"architecture": "dfc", "score_weighting": "mean"}, {}),
}
DEFAULT_VARIANTS = ("standard", "dfc-paper", "dfc")
# Set from the activations, never by a variant.
_FIXED = {"d_a", "d_b"}
_SECTIONS = {"crosscoder": CrosscoderConfig, "train": TrainConfig}


def field_names(cls: type) -> set[str]:
    """Names of a config dataclass's fields."""
    return {f.name for f in dataclasses.fields(cls)}


def split_overrides(settings: Overrides) -> Variant:
    """Route flat KEY -> VALUE settings (or 'crosscoder.KEY' / 'train.KEY') to each config."""
    out: Variant = ({}, {})
    cc_fields, train_fields = field_names(CrosscoderConfig) - _FIXED, field_names(TrainConfig)
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        if section and section not in _SECTIONS:
            raise PlantedError(f"unknown section {section!r} in {key!r}; use crosscoder. or train.")
        in_cc = name in cc_fields and section in ("", "crosscoder")
        in_train = name in train_fields and section in ("", "train")
        if in_cc and in_train:
            raise PlantedError(f"{name!r} is a crosscoder and a train setting; prefix it")
        if not (in_cc or in_train):
            raise PlantedError(
                f"unknown setting {key!r}; valid: crosscoder: {', '.join(sorted(cc_fields))}; "
                f"train: {', '.join(sorted(train_fields))}"
            )
        out[0 if in_cc else 1][name] = value
    return out


def parse_value(text: str) -> Any:
    """A command-line value: bool, None, int, float or else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_settings(items: list[str]) -> Overrides:
    """KEY=VALUE strings as a dict (values parsed with `parse_value`)."""
    out: Overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PlantedError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_variant(spec: str) -> tuple[str, Variant]:
    """(name, variant) of a command-line spec `NAME` or `NAME:KEY=VALUE,...`."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise PlantedError(f"variant {spec!r} has no name; write NAME or NAME:KEY=VALUE,...")
    if not rest and name not in KNOWN_VARIANTS:
        raise PlantedError(
            f"unknown variant {name!r}; known: {', '.join(KNOWN_VARIANTS)}, or define one "
            f"as {name}:KEY=VALUE,..."
        )
    base_cc, base_train = KNOWN_VARIANTS.get(name, ({}, {}))
    extra_cc, extra_train = split_overrides(parse_settings([s for s in rest.split(",") if s]))
    return name, ({**base_cc, **extra_cc}, {**base_train, **extra_train})


def check_variant(name: str, variant: Variant) -> Variant:
    """The variant as two plain dicts, with unknown keys refused."""
    try:
        cc, train = variant
    except (TypeError, ValueError):
        raise PlantedError(
            f"variant {name!r} must be (crosscoder overrides, train overrides)"
        ) from None
    sections = (("crosscoder", CrosscoderConfig, cc), ("train", TrainConfig, train))
    for section, cls, overrides in sections:
        unknown = sorted(set(overrides) - (field_names(cls) - _FIXED))
        if unknown:
            raise PlantedError(
                f"variant {name!r}: unknown {section} setting(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(field_names(cls) - _FIXED))}"
            )
    return dict(cc), dict(train)


def base_configs(
    preset: str, dims: tuple[int, int], steps: int | None = None, batch_size: int | None = None
) -> tuple[CrosscoderConfig, TrainConfig]:
    """The preset's configs for activations of widths `dims`, with steps/batch size changed.

    A changed step count scales the schedule (warm-up, k annealing) with it, and the dead
    window keeps the same share of the training tokens, so short runs keep their shape.
    """
    run = load_preset(preset)  # widths come from the store, not from the preset
    if run.crosscoder is None:
        raise PlantedError(f"preset {preset!r} has no [crosscoder] section")
    cc = dataclasses.replace(run.crosscoder, d_a=dims[0], d_b=dims[1])
    train = run.train
    step_scale = 1.0 if steps is None else steps / train.steps
    batch = train.batch_size if batch_size is None else batch_size
    if steps is not None or batch_size is not None:
        train = dataclasses.replace(
            train,
            steps=steps or train.steps,
            batch_size=batch,
            warmup_steps=round(train.warmup_steps * step_scale),
            anneal_steps=round(train.anneal_steps * step_scale),
            dead_window_tokens=max(
                batch, round(train.dead_window_tokens * step_scale * batch / train.batch_size)
            ),
            log_every=max(1, min(train.log_every, (steps or train.steps) // 10)),
        )
    return cc, train


def variant_configs(
    base: tuple[CrosscoderConfig, TrainConfig], *overrides: Variant
) -> tuple[CrosscoderConfig, TrainConfig]:
    """The base configs with each (crosscoder, train) override pair applied in order."""
    cc, train = base
    for i, variant in enumerate(overrides):
        extra_cc, extra_train = check_variant(f"#{i}", variant)
        cc = dataclasses.replace(cc, **extra_cc)
        train = dataclasses.replace(train, **extra_train)
    return cc, train
