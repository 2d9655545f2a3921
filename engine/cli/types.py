"""argparse types of the `modeldiff` options: numbers and names are checked as they are
parsed, so a bad value is a one-line usage error instead of a traceback (or a silent no-op)
later on."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from engine.run_ids import RUN_ID_RULE, run_id_problem


def _number(text: str, kind: type, what: str) -> int | float:
    """`text` as an int or a finite float, else an argparse error that says what was wanted."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _checked(text: str, kind: type, what: str, ok) -> int | float:
    """`text` as a number of `kind` for which `ok(value)` holds, else an argparse error."""
    value = _number(text, kind, what)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _checked(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    return _checked(text, int, "an integer >= 0", lambda v: v >= 0)


def any_int(text: str) -> int:
    """Any integer (a seed)."""
    return int(_number(text, int, "an integer"))


def finite_float(text: str) -> float:
    """Any finite number (a steering strength)."""
    return float(_number(text, float, "a number"))


def positive_float(text: str) -> float:
    """A finite number above 0."""
    return float(_checked(text, float, "a number > 0", lambda v: v > 0))


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    return float(_checked(text, float, "a number >= 0", lambda v: v >= 0))


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a held-out share)."""
    return float(_checked(text, float, "a number between 0 and 1", lambda v: 0 < v < 1))


def port(text: str) -> int:
    """A TCP port number."""
    return _checked(text, int, "a port number (1-65535)", lambda v: 1 <= v <= 65535)


def run_id(text: str) -> str:
    """A run id that is safe in file names and URLs."""
    problem = run_id_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}: a run id has {RUN_ID_RULE}")
    return text


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage block; `--help` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")
