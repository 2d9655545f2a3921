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


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def any_int(text: str) -> int:
    """Any integer (a seed)."""
    return int(_number(text, int, "an integer"))


def finite_float(text: str) -> float:
    """Any finite number (a steering strength)."""
    return float(_number(text, float, "a number"))


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = _number(text, float, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a held-out share)."""
    value = _number(text, float, "a number between 0 and 1")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port number."""
    value = _number(text, int, "a port number (1-65535)")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}")
    return value


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
