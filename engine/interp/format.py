"""Render a feature's contexts as prompt text: highlighted examples and token importances.

A piece of text is highlighted when its activation is at least `HIGHLIGHT_FRACTION` of the
feature's maximum; consecutive highlighted pieces are merged into one «...». After each
example, every piece of importance at least 1 is listed with its importance on a 0-10 scale
(activation / feature max), e.g. ``(world: 7, !: 2)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.contexts import Context

# delphi's explainer highlights tokens above 0.3 x the feature's maximum activation.
HIGHLIGHT_FRACTION = 0.3
OPEN, CLOSE = "«", "»"
IMPORTANCE_SCALE = 10
_NEWLINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Segment:
    """A stretch of a context's text, highlighted or not, with its largest activation."""

    text: str
    highlighted: bool
    act: float


def clean(text: str) -> str:
    """Text safe inside one example line: newlines shown as \\n, delimiters replaced."""
    # A literal « or » in the text would read as a highlight; a raw newline would split the
    # example across lines and blur where the next one starts.
    text = text.replace(OPEN, "<<").replace(CLOSE, ">>").replace("\t", " ")
    return _NEWLINES.sub("\\\\n", text)


def feature_max(contexts: Sequence[Context]) -> float:
    """The largest activation over all contexts (0 when there are none)."""
    return max((c.max_act for c in contexts), default=0.0)


def threshold(max_act: float) -> float:
    """The activation a piece needs to be highlighted, given the feature's max."""
    return HIGHLIGHT_FRACTION * max_act


def is_highlighted(act: float, max_act: float) -> bool:
    """Whether a piece with this activation is highlighted."""
    return max_act > 0 and act > 0 and act >= threshold(max_act)


def segments(context: Context, max_act: float) -> list[Segment]:
    """The context's text as alternating plain and highlighted segments, highlights merged."""
    out: list[Segment] = []
    pending = ""
    for piece, act in context.pieces():
        lit = is_highlighted(act, max_act)
        if not lit and not piece.strip() and out and out[-1].highlighted:
            # Whitespace after a highlight joins the run only if another highlight follows.
            pending += piece
            continue
        if pending:
            _append(out, pending, lit, 0.0)
            pending = ""
        _append(out, piece, lit, act)
    if pending:
        _append(out, pending, False, 0.0)
    return out


def _append(out: list[Segment], text: str, lit: bool, act: float) -> None:
    """Add text to the last segment when its highlight state matches, else start a new one."""
    if out and out[-1].highlighted == lit:
        prev = out[-1]
        out[-1] = Segment(prev.text + text, lit, max(prev.act, act))
    else:
        out.append(Segment(text, lit, act))


def highlight(context: Context, max_act: float) -> str:
    """The context's text with highlighted runs wrapped in «», whitespace kept outside."""
    parts: list[str] = []
    for seg in segments(context, max_act):
        text = clean(seg.text)
        if not seg.highlighted or not text.strip():
            parts.append(text)
            continue
        core = text.strip()
        lead = text[: len(text) - len(text.lstrip())]
        tail = text[len(text.rstrip()) :]
        parts.append(f"{lead}{OPEN}{core}{CLOSE}{tail}")
    return "".join(parts)


def importance(act: float, max_act: float) -> int:
    """An activation on the 0-10 scale relative to the feature's maximum."""
    if max_act <= 0:
        return 0
    return max(0, min(IMPORTANCE_SCALE, round(IMPORTANCE_SCALE * act / max_act)))


def importances(context: Context, max_act: float) -> str:
    """Pieces of importance >= 1 with their importance, e.g. ``(world: 7, !: 2)``; "" if none.

    This lists weaker pieces too: a piece at 2/10 is not highlighted but still tells the
    reader where the feature stirs."""
    items = [
        f"{clean(piece).strip()}: {importance(act, max_act)}"
        for piece, act in context.pieces()
        if importance(act, max_act) >= 1 and clean(piece).strip()
    ]
    return f"({', '.join(items)})" if items else ""


def format_example(index: int, context: Context, max_act: float) -> str:
    """One example: ``Example i: text with «highlights»`` and its importances below."""
    line = f"Example {index}: {highlight(context, max_act)}"
    weights = importances(context, max_act)
    return f"{line}\n{weights}" if weights else line


def format_examples(contexts: Sequence[Context], max_act: float | None = None) -> str:
    """Examples numbered from 1, separated by blank lines, for the explainer's user turn."""
    top = feature_max(contexts) if max_act is None else max_act
    return "\n\n".join(format_example(i, c, top) for i, c in enumerate(contexts, 1))


def format_plain(contexts: Sequence[Context]) -> str:
    """Examples numbered from 1 without highlights or importances, for the judge."""
    return "\n".join(f"Example {i}: {clean(c.text)}" for i, c in enumerate(contexts, 1))
