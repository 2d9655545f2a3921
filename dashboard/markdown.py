"""Text from the database made safe for Streamlit's Markdown and for spreadsheets.

A results database can be shared, so run ids, model names, judge names and notes are
untrusted: in `st.markdown` a name like ``![x](https://host/t.png)`` would make the browser
fetch that URL, and in a CSV opened in a spreadsheet a cell like ``=HYPERLINK(...)`` runs
as a formula.
"""

from __future__ import annotations

import re
from typing import Any

# ASCII punctuation that starts a link, image, HTML tag, emphasis or entity in CommonMark,
# or Streamlit's `$` math and `:` directives, mid-line; a backslash makes each literal.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>!|~$:&])")
_BACKTICKS = re.compile(r"`+")
# Cells a spreadsheet reads as a formula (OWASP: CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _one_line(value: Any) -> str:
    """A value as text on one line (None becomes empty)."""
    return "" if value is None else " ".join(str(value).split())


def md(value: Any) -> str:
    """A value as literal Markdown text: no link, image, emphasis or directive."""
    return _SPECIAL.sub(r"\\\1", _one_line(value))


def md_code(value: Any) -> str:
    """A value as a Markdown code span, whatever backticks it holds."""
    text = _one_line(value)
    # A span's fence is longer than any run of backticks inside it (CommonMark 6.1).
    fence = "`" * (1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, quoted with a leading ';
    other values unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
