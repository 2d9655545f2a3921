"""Cut documents into windows both models read, with their aligned token pairs.

A document is rendered and tokenized for each model, then aligned once over its whole
length. Windows are cut at aligned boundaries (points where both models have read exactly
the same text), so every window starts at the same character for both models and no token
is split between windows. Each window holds at most `context_length` input tokens per
model. The first window keeps the tokenizer's own leading tokens (BOS, chat template);
later ones are prefixed with the BOS alone, so no window starts cold at position 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from engine.activations.shards import WindowRecord
from engine.config import HarvestConfig
from engine.harvest.align import Alignment, align, align_windows, tokenize, with_answer_pairs
from engine.harvest.chat import RenderError, render
from engine.harvest.text import mixture_of
from engine.harvest.text_documents import Document

OVERFLOW = "gap wider than a window"
POSITION_0 = "position 0"


@dataclass(frozen=True)
class Side:
    """One model's tokenizer and the prefix that starts each window after the first."""

    tokenizer: Any
    prefix: tuple[int, ...]  # e.g. (bos_id,), or () for models without a BOS


def side(tokenizer: Any) -> Side:
    """A Side with the BOS prefix this tokenizer adds to a text (if any)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    return Side(tokenizer, (bos,) if adds_bos else ())


def document_windows(
    doc: Document,
    a: Side,
    b: Side,
    context_length: int,
    method: str = "offsets",
    answer_pairs: bool = False,
) -> tuple[list[WindowRecord], dict[str, Any]]:
    """Windows of one document (indices unset: -1) and its alignment counts; with
    `answer_pairs`, a chat's answer headers are paired too (align.with_answer_pairs)."""
    try:
        r_a, r_b = render(doc, a.tokenizer), render(doc, b.tokenizer)
    except RenderError:
        # A chat template that alters or hides message text (rare): nothing can be aligned
        # safely, so the document is skipped and counted.
        return [], {"documents": 1, "unrenderable_documents": 1}
    t_a = tokenize(a.tokenizer, r_a.text, r_a.contents, starts=r_a.starts)
    t_b = tokenize(b.tokenizer, r_b.text, r_b.contents, starts=r_b.starts)
    if method == "windows":
        al = align_windows(t_a, t_b, a.tokenizer, b.tokenizer)
    else:
        al = align(t_a, t_b)
    if answer_pairs and doc.messages is not None and r_a.contents is not None:
        al = with_answer_pairs(al, t_a, t_b, r_a.contents, [m.role for m in doc.messages])
    counts: dict[str, Any] = {
        "documents": 1,
        "tokens_a": len(t_a),
        "tokens_b": len(t_b),
        "pairs_aligned": len(al),
        "dropped_a": dict(al.dropped_a),
        "dropped_b": dict(al.dropped_b),
        "failed_documents": int(al.failure is not None),
        "unrenderable_documents": 0,
    }
    windows, dropped = _cut(doc, t_a, t_b, al, a, b, context_length)
    if dropped:
        counts["pairs_not_windowed"] = dropped
    return windows, counts


def _cut(doc, t_a, t_b, al: Alignment, a: Side, b: Side, ctx: int):
    """Greedy windows over the aligned pairs; returns (windows, pairs left out)."""
    windows: list[WindowRecord] = []
    dropped: dict[str, int] = {}
    n = len(al)
    start_a = start_b = 0  # first token of the current window
    char_lo = 0
    j = 0
    while j < n:
        pre_a = 0 if start_a == 0 else len(a.prefix)
        pre_b = 0 if start_b == 0 else len(b.prefix)
        # Pairs j..end-1 fit: their last token is within ctx tokens of the window start.
        end = min(
            np.searchsorted(al.idx_a, start_a + ctx - 1 - pre_a, side="right"),
            np.searchsorted(al.idx_b, start_b + ctx - 1 - pre_b, side="right"),
        )
        end = max(int(end), j)
        if end == j:
            # Not even one pair fits (a long unaligned stretch): skip past it.
            dropped[OVERFLOW] = dropped.get(OVERFLOW, 0) + 1
            start_a, start_b = int(al.idx_a[j]) + 1, int(al.idx_b[j]) + 1
            char_lo = int(al.spans[j, 1])
            j += 1
            continue
        window, lost = _window(doc, t_a, t_b, al, a, b, (start_a, start_b), (j, end), char_lo)
        if lost:
            dropped[POSITION_0] = dropped.get(POSITION_0, 0) + lost
        windows.append(window)
        last = end - 1
        start_a, start_b = int(al.idx_a[last]) + 1, int(al.idx_b[last]) + 1
        char_lo = int(al.spans[last, 1])
        j = end
    return windows, dropped


def _window(doc, t_a, t_b, al, a: Side, b: Side, starts, pairs, char_lo):
    """One WindowRecord: input tokens per model, pair positions and spans."""
    (start_a, start_b), (lo, hi) = starts, pairs
    char_hi = int(al.spans[hi - 1, 1])
    text = t_a.text[char_lo:char_hi]
    ids, offs, pos = {}, {}, {}
    for key, tok, sd, start, idx in (
        ("a", t_a, a, start_a, al.idx_a),
        ("b", t_b, b, start_b, al.idx_b),
    ):
        last = int(idx[hi - 1]) + 1
        prefix = sd.prefix if start > 0 else ()
        ids[key] = np.concatenate([np.asarray(prefix, dtype=np.int64), tok.ids[start:last]])
        off = np.clip(tok.offsets[start:last] - char_lo, 0, len(text))
        offs[key] = np.concatenate([np.zeros((len(prefix), 2), dtype=np.int64), off])
        pos[key] = idx[lo:hi] - start + len(prefix)
    # A window without a prefix that starts mid-document would put a pair at position 0,
    # where activations are attention-sink outliers.
    keep = (pos["a"] > 0) & (pos["b"] > 0)
    spans = al.spans[lo:hi].copy()
    spans[0, 0] = char_lo  # the first pair covers everything since the window start
    spans = spans - char_lo
    window = WindowRecord(
        index=-1,
        doc_id=doc.id,
        source=doc.source,
        char_start=char_lo,
        text=text,
        ids_a=ids["a"],
        offsets_a=offs["a"],
        ids_b=ids["b"],
        offsets_b=offs["b"],
        pos_a=pos["a"][keep],
        pos_b=pos["b"][keep],
        spans=spans[keep],
    )
    return window, int((~keep).sum())


def window_key(window: WindowRecord) -> bytes:
    """Content hash used to drop duplicate windows."""
    return hashlib.blake2b(window.text.encode(), digest_size=16).digest()


class StreamWindow(NamedTuple):
    """One window of the stream, with what the harvest records about it."""

    window: WindowRecord  # with its stream index
    counts: dict[str, Any]  # counters to record with it
    duplicate: bool  # its text was already seen (dedupe)
    document: int  # number of its document in the stream (which rank harvests it)


def numbered_windows(
    documents: Iterator[Document],
    a: Side,
    b: Side,
    context_length: int,
    method: str = "offsets",
    dedupe: bool = True,
    answer_pairs: bool = False,
) -> Iterator[StreamWindow]:
    """The window stream, numbered from 0 in document order.

    Counts of a document ride on its first window; a document with no window yields a
    placeholder window with no pairs so that its counts are still recorded.
    """
    seen: set[bytes] = set()
    index = 0
    for number, doc in enumerate(documents):
        windows, counts = document_windows(doc, a, b, context_length, method, answer_pairs)
        if not windows:
            windows = [_empty(doc)]
        duplicates = []
        for window in windows:
            window.index = index
            index += 1
            key = window_key(window) if dedupe and len(window) else None
            duplicates.append(key in seen)
            if key is not None:
                seen.add(key)
        kept = [len(w) for w, dup in zip(windows, duplicates, strict=True) if not dup]
        counts["pairs_kept"] = sum(kept)
        for w, (window, duplicate) in enumerate(zip(windows, duplicates, strict=True)):
            record = dict(counts) if w == 0 else {}
            record["windows"] = 1
            record["duplicate_windows"] = int(duplicate)
            yield StreamWindow(window, record, duplicate, number)


def window_stream(cfg: HarvestConfig, a: Side, b: Side) -> Iterator[StreamWindow]:
    """The numbered window stream of `cfg`'s text sources (a fresh pass from the start)."""
    documents = mixture_of(cfg.sources, cfg.weights).documents()
    return numbered_windows(
        documents, a, b, cfg.context_length, cfg.alignment, cfg.dedupe, cfg.answer_pairs
    )


def _empty(doc: Document) -> WindowRecord:
    """A window with no tokens or pairs (a document nothing of which aligned)."""
    z1, z2 = np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    return WindowRecord(-1, doc.id, doc.source, 0, "", z1, z2, z1, z2, z1, z1, z2)
