"""A run's training metrics, read back for reports: dead fraction per partition, and the
sizes of adaptive exclusive partitions.

The trainer logs `dead_frac` (all features) and `dead_frac_<partition>` for each non-empty
partition, in the final metrics and in every logged step of the history; a DFC with
adaptive partitions also logs `n_a_exclusive` and `n_b_exclusive` at every step.
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
