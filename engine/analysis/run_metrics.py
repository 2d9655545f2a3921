"""A run's training metrics, read back for reports: dead fraction per partition, the
sizes of adaptive exclusive partitions, the training curves (loss, AuxK loss, FVE on the
training batch and on the held-out pairs, L0) and held-out FVE by partition.

The trainer logs `dead_frac` (all features) and `dead_frac_<partition>` for each non-empty
partition, in the final metrics and in every logged step of the history; a DFC with
adaptive partitions also logs `n_a_exclusive` and `n_b_exclusive` at every step. With a
validation split it logs `val_fve_a`, `val_fve_b`, `val_l0` and `val_fve_<model>_<partition>`
(engine/crosscoder/validation.py) at every step too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from engine.partition import Role

DEAD_PREFIX = "dead_frac_"
ALL = "all"  # the key of the dead fraction over every feature


def dead_fractions(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{partition: dead fraction at the end of training} for the partitions the metrics
    report, in partition order."""
    out = {}
    for role in Role:
        value = metrics.get(f"{DEAD_PREFIX}{role.value}")
        if _number(value):
            out[role.value] = float(value)
    return out


def dead_history(history: pd.DataFrame) -> pd.DataFrame:
    """The dead fraction over training in long form: step, partition (`ALL` for every
    feature), dead_frac; empty when the history logs none."""
    columns = {"dead_frac": ALL}
    columns.update({f"{DEAD_PREFIX}{role.value}": role.value for role in Role})
    return _by_partition(history, columns, "dead_frac")


SIZE_COLUMNS = {"n_a_exclusive": Role.A_EXCLUSIVE.value, "n_b_exclusive": Role.B_EXCLUSIVE.value}


def partition_size_history(history: pd.DataFrame) -> pd.DataFrame:
    """Exclusive partition sizes over training in long form: step, partition, features;
    empty when the partitions did not adapt."""
    return _by_partition(history, SIZE_COLUMNS, "features")


MODELS = {"a": "A", "b": "B"}
TRAINING, HELD_OUT = "training batch", "held out"


def fve_history(history: pd.DataFrame) -> pd.DataFrame:
    """FVE over training in long form: step, model ("A"/"B"), data (`TRAINING` for the
    step's own batch, `HELD_OUT` for the validation pairs), fve; empty when none logged."""
    columns = {}
    for m, name in MODELS.items():
        columns[f"fve_{m}"] = (name, TRAINING)
        columns[f"val_fve_{m}"] = (name, HELD_OUT)
    return _long(history, columns, ["model", "data"], "fve")


def l0_history(history: pd.DataFrame) -> pd.DataFrame:
    """Active features per token over training: step, data, l0."""
    return _long(history, {"l0": (TRAINING,), "val_l0": (HELD_OUT,)}, ["data"], "l0")


def loss_history(history: pd.DataFrame) -> pd.DataFrame:
    """The training loss and its AuxK term over training: step, term, value."""
    terms = {"loss": ("loss",), "aux": ("AuxK loss",)}
    return _long(history, terms, ["term"], "value")


def partition_fve_history(history: pd.DataFrame) -> pd.DataFrame:
    """Held-out FVE of each model from one partition's features alone (plus the decoder
    bias) over training: step, model, partition, fve; empty without a validation split."""
    columns = {
        f"val_fve_{m}_{role.value}": (name, role.value)
        for m, name in MODELS.items()
        for role in Role
    }
    return _long(history, columns, ["model", "partition"], "fve")


def validation_fves(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{model: held-out FVE at the end of training} ("A", "B"), for runs that log it."""
    out = {}
    for m, name in MODELS.items():
        value = metrics.get(f"val_fve_{m}")
        if _number(value):
            out[name] = float(value)
    return out


def _long(
    history: pd.DataFrame, columns: dict[str, tuple[str, ...]], keys: list[str], value: str
) -> pd.DataFrame:
    """Logged `columns` (name -> values of `keys`) in long form: step, *keys, `value`."""
    present = [c for c in columns if c in history.columns]
    if "step" not in history.columns or not present:
        return pd.DataFrame(columns=["step", *keys, value])
    # The value column is named last: it may be one of the melted columns' own names.
    long = history[["step", *present]].melt(id_vars="step", var_name="_column")
    long = long.dropna(subset=["value"])
    for i, key in enumerate(keys):
        long[key] = long["_column"].map(lambda c, i=i: columns[c][i])
    long[value] = long["value"].astype(float)
    return long[["step", *keys, value]].reset_index(drop=True)


def _by_partition(history: pd.DataFrame, columns: dict[str, str], value: str) -> pd.DataFrame:
    """Logged `columns` (name -> partition) in long form: step, partition, `value`; empty
    when the history logs none of them."""
    present = [c for c in columns if c in history.columns]
    if "step" not in history.columns or not present:
        return pd.DataFrame(columns=["step", "partition", value])
    # The logged columns, renamed to their partitions, then one row per (step, partition).
    wide = history[["step", *present]].rename(columns=columns)
    long = wide.melt(id_vars="step", var_name="partition", value_name=value)
    return long.dropna(subset=[value]).reset_index(drop=True)


def _number(value: Any) -> bool:
    """Whether a metric value is a finite number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
