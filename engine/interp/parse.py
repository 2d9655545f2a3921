"""Parse model answers: the explainer's three sections and the judge's per-example labels.

Parsing is tolerant of formatting (markdown bold or italics, list markers, missing colon,
any letter case) but never guesses: an answer without a clear value raises `ParseError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SECTIONS = ("EXPLANATION", "HARMFUL", "HARMFUL_REASON")

# A section label at the start of a line: "[EXPLANATION]:", "**[Harmful]**", "- HARMFUL:",
# "[HARMFUL REASON]". Without brackets the colon is required, so prose that merely starts
# with the word "Explanation" is not taken for a label.
_NAME = r"EXPLANATION|HARMFUL[ _-]?REASON|HARMFUL"
_LABEL = re.compile(
    rf"^[ \t>#*_-]*(?:\[[ \t*_]*(?P<bracketed>{_NAME})[ \t*_]*\]|(?P<bare>{_NAME})(?=[ \t*_]*:))"
    r"[ \t*_]*:?",
    re.IGNORECASE | re.MULTILINE,
)
_WRAP = "*_` \t\n"
_YES_NO = re.compile(r"^(YES|NO)\b", re.IGNORECASE)
_LIST = re.compile(r"\[[^\[\]]*\]")
_LINE_LABEL = re.compile(
    r"^[ \t>#*_-]*(?:example|excerpt)?[ \t]*(\d+)[ \t]*[:.)\]-][ \t*_]*"
    r"(1|0|yes|no|true|false|match(?:es)?|no match)\b",
    re.IGNORECASE | re.MULTILINE,
)
_TRUE = {"1", "yes", "true", "match", "matches"}
_FALSE = {"0", "no", "false", "no match"}


class ParseError(ValueError):
    """A model's answer does not have the form the prompt asked for."""


@dataclass(frozen=True)
class ParsedExplanation:
    """The three sections of an explainer's answer."""

    explanation: str
    harmful: bool
    harmful_reason: str


def _canonical(name: str) -> str:
    """Section name in the prompt's spelling."""
    name = name.upper()
    return "HARMFUL_REASON" if "REASON" in name else name


def _unwrap(value: str) -> str:
    """A section value on one line, without surrounding markdown emphasis."""
    value = " ".join(value.split())
    return value.strip(_WRAP).strip()


def sections(text: str) -> dict[str, str]:
    """Each labelled section's value; a section given twice keeps its last value."""
    found: dict[str, str] = {}
    labels = list(_LABEL.finditer(text))
    for i, label in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        name = _canonical(label.group("bracketed") or label.group("bare"))
        found[name] = _unwrap(text[label.end() : end])
    return found


def parse_explanation(text: str) -> ParsedExplanation:
    """The explanation, harmful flag and reason of an answer, or `ParseError`."""
    found = sections(text)
    missing = [name for name in SECTIONS if not found.get(name)]
    if missing:
        raise ParseError(f"answer lacks the section(s) {', '.join(missing)}")
    flag = _YES_NO.match(found["HARMFUL"])
    if not flag:
        raise ParseError(f"[HARMFUL] must be YES or NO, got {found['HARMFUL']!r}")
    return ParsedExplanation(
        explanation=found["EXPLANATION"],
        harmful=flag.group(1).upper() == "YES",
        harmful_reason=found["HARMFUL_REASON"],
    )


def _label(value: object) -> bool | None:
    """A judge's label as a bool, or None when it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else None
    return None


def _from_lists(text: str, n: int) -> list[bool] | None:
    """Labels from the last bracketed list in the text holding exactly n labels."""
    for match in reversed(_LIST.findall(text)):
        try:
            items = json.loads(match.replace("'", '"'))
        except json.JSONDecodeError:
            items = [part.strip() for part in match[1:-1].split(",")]
        labels = [_label(item) for item in items]
        if len(labels) == n and all(label is not None for label in labels):
            return [bool(label) for label in labels]
    return None


def _from_lines(text: str, n: int) -> list[bool] | None:
    """Labels from lines like ``Example 3: 1`` or ``3. no``, each of 1..n exactly once."""
    found: dict[int, bool] = {}
    for match in _LINE_LABEL.finditer(text):
        index, label = int(match.group(1)), _label(match.group(2))
        if index in found and found[index] != label:
            return None
        found[index] = bool(label)
    if sorted(found) != list(range(1, n + 1)):
        return None
    return [found[i] for i in range(1, n + 1)]


def parse_judgement(text: str, n: int) -> list[bool]:
    """The judge's n labels (True = matches) from a JSON list or numbered lines."""
    labels = _from_lists(text, n) or _from_lines(text, n)
    if labels is None:
        raise ParseError(f"expected {n} labels as a JSON list of 0/1, got {text[:200]!r}")
    return labels
