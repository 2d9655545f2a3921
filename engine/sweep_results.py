"""Resumable results of a benchmark sweep: one row per finished run in ``results.csv``.

Shared by the toy sweep and the planted-concept sweep: rows are appended and written after
every run, so an interrupted sweep loses at most the run in progress, and JSON outputs get
plain values (NaN as null).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from engine.files import atomic_write_text


def append_row(results: pd.DataFrame, row: dict[str, Any]) -> pd.DataFrame:
    """Results with one more run."""
    new = pd.DataFrame([row])
    return new if not len(results) else pd.concat([results, new], ignore_index=True)


def load_results(out: Path, keys: list[str]) -> pd.DataFrame:
    """Rows finished by earlier invocations (an empty frame with `keys` if none)."""
    path = out / "results.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=keys)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame as CSV atomically."""
    atomic_write_text(path, frame.to_csv(index=False))


def write_sweep_outputs(
    out: Path,
    config: dict[str, Any],
    results: pd.DataFrame,
    summary: pd.DataFrame,
    make_figure: Callable[[], Any],
) -> None:
    """Write ``summary.csv``, ``results.json`` (config, rows, summary) and ``figure.html``.

    `make_figure` builds the Plotly figure; it is called after the other two are written.
    """
    write_csv(summary, out / "summary.csv")
    payload = {
        "config": config,
        "results": json_records(results),
        "summary": json_records(summary),
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    make_figure().write_html(out / "figure.html", include_plotlyjs=True)


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows (numpy scalars as Python values, NaN as null)."""
    rows = frame.to_dict(orient="records")
    return [{k: _json_value(v) for k, v in row.items()} for row in rows]


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
