"""Pair token positions of two tokenizers that end at the same point of a shared text.

Two models read the same text with different tokenizers. A pair ``(i, j)`` is aligned when
token ``i`` of model A and token ``j`` of model B both end at the same character of the text,
and each is the last of its tokenization to end there: from that point on both models have
read exactly the same text, so their residual-stream activations can be compared.

``align`` does this from the character offsets that fast tokenizers return: one
``np.intersect1d`` over each side's token boundaries, linear in the tokens and unable to
diverge. Only the END offset is used, so offsets that start at a leading space, byte-fallback
tokens that split one character, and tokens that straddle characters all come out right.

``align_windows`` is the paper's Algorithm 1 (greedy window expansion over decoded text),
kept as a reference: it reports why it stopped where it cannot align.

Chat templates render a conversation differently per model. ``tokenize`` maps each model's
offsets into the shared text (the concatenated message contents) and marks tokens that end
in template text, so a templated rendering for one model aligns with a plain one for the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import UserError

# Reasons a token is left out of the alignment (keys of Alignment.dropped_a / dropped_b).
SPECIAL = "special/template token"
FIRST = "position 0"
EMPTY = "empty span"
INSIDE = "not the last token at its end"
NO_MATCH = "no common boundary"
SKIPPED = "non-content or inside a window"
UNREACHED = "after divergence"


class AlignmentError(UserError, ValueError):
    """Inputs to an alignment are inconsistent (shapes, offsets, missing text)."""


@dataclass(frozen=True)
class Tokenized:
    """One model's tokenization of a document, with offsets in shared-text coordinates."""

    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n, 2]: (start, end) in the shared text
    ignore: np.ndarray  # bool [n]: special or template tokens, never aligned
    text: str  # the shared text the offsets refer to

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Alignment:
    """Aligned token positions of one document, with the text each pair covers."""

    n_a: int
    n_b: int
    idx_a: np.ndarray  # int64 [k], strictly increasing
    idx_b: np.ndarray  # int64 [k], strictly increasing
    spans: np.ndarray  # int64 [k, 2]: (start, end) chars; start = end of the previous pair
    dropped_a: dict[str, int] = field(default_factory=dict)
    dropped_b: dict[str, int] = field(default_factory=dict)
    failure: str | None = None  # why the reference algorithm stopped early, if it did

    def __len__(self) -> int:
        return int(self.idx_a.shape[0])

    @property
    def pairs(self) -> np.ndarray:
        """Aligned index pairs as an int64 array [k, 2] (column 0: model A, 1: model B)."""
        return np.stack([self.idx_a, self.idx_b], axis=1)


def ignore_from_special(
    special_tokens_mask: Sequence[int] | np.ndarray,
    offsets: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of positions never to align: special tokens, and (0, 0) offsets."""
    ignore = np.asarray(special_tokens_mask, dtype=bool).copy()
    if offsets is not None:
        off = _as_offsets(offsets, ignore.shape[0])
        # Template and added tokens often carry the (0, 0) offset without being flagged.
        ignore |= (off[:, 0] == 0) & (off[:, 1] == 0)
    return ignore


def shared_char_counts(
    rendered: str, contents: Sequence[str], starts: Sequence[int] | None = None
) -> np.ndarray:
    """Shared-text characters before each position of `rendered` (int64 [len + 1]).

    The shared text is ``"".join(contents)``; each content appears in `rendered`, in order.
    With `starts` (where the renderer put each content) the positions are taken as given;
    without, each content is searched for after the previous one (stripped of surrounding
    whitespace where a template trims it), which can misplace a short content that also
    occurs in the template text before it. Everything else in `rendered` is template text,
    which advances no count.
    """
    if starts is not None and len(starts) != len(contents):
        raise AlignmentError(f"{len(starts)} content positions for {len(contents)} contents")
    is_content = np.zeros(len(rendered), dtype=np.int64)
    pos = 0
    for i, content in enumerate(contents):
        if starts is not None:
            at, part = starts[i], content
            if at < pos or rendered[at : at + len(part)] != part:
                raise AlignmentError(
                    f"message content {content[:40]!r} is not at position {at} of the rendered text"
                )
        else:
            at, part = _find_content(rendered, content, pos)
        is_content[at : at + len(part)] = 1
        pos = at + len(part)
    return np.concatenate([[0], np.cumsum(is_content)])


def _find_content(rendered: str, content: str, pos: int) -> tuple[int, str]:
    """First position at or after `pos` where `content` (or its stripped form) occurs."""
    at = rendered.find(content, pos)
    if at >= 0:
        return at, content
    part = content.strip()
    at = rendered.find(part, pos)
    if at < 0 or part != content:
        raise AlignmentError(
            f"message content {content[:40]!r} does not appear verbatim in the rendered "
            "text; render the template without altering message contents"
        )
    return at, part


def tokenize(
    tokenizer: Any,
    rendered: str,
    contents: Sequence[str] | None = None,
    add_special_tokens: bool = True,
    starts: Sequence[int] | None = None,
) -> Tokenized:
    """Tokenize `rendered` with a fast tokenizer, in the coordinates of the shared text.

    Without `contents` the rendered text is the shared text. With `contents` (the message
    texts a chat template embedded), offsets map onto ``"".join(contents)`` and tokens that end
    in template text are ignored; `starts` gives each content's position in `rendered`
    where the renderer knows it (engine.harvest.chat.render does).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise AlignmentError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    enc = tokenizer(
        rendered,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        add_special_tokens=add_special_tokens,
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = _as_offsets(enc["offset_mapping"], ids.shape[0])
    # Special tokens written into the text (chat markers) are not flagged by the mask.
    special = np.isin(ids, np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    ignore = ignore_from_special(enc["special_tokens_mask"], offsets) | special
    if contents is None:
        return Tokenized(ids, offsets, ignore, rendered)
    counts = shared_char_counts(rendered, contents, starts)
    start, end = counts[offsets[:, 0]], counts[offsets[:, 1]]
    # A token belongs to the template when its last character does.
    last = np.maximum(offsets[:, 1] - 1, 0)
    ends_in_template = (offsets[:, 1] > offsets[:, 0]) & (counts[last + 1] == counts[last])
    return Tokenized(
        ids, np.stack([start, end], axis=1), ignore | ends_in_template, "".join(contents)
    )


def align(a: Tokenized, b: Tokenized, drop_first: bool = True) -> Alignment:
    """Align two tokenizations of the same shared text by common token end offsets."""
    if a.text != b.text:
        raise AlignmentError("the two tokenizations are of different texts")
    return align_offsets(a.offsets, b.offsets, a.ignore, b.ignore, drop_first)


def align_offsets(
    offsets_a: np.ndarray,
    offsets_b: np.ndarray,
    ignore_a: np.ndarray | None = None,
    ignore_b: np.ndarray | None = None,
    drop_first: bool = True,
) -> Alignment:
    """Pair positions whose tokens are each the last to end at the same character offset."""
    off_a, off_b = _as_offsets(offsets_a), _as_offsets(offsets_b)
    bound_a, drop_a = _boundaries(off_a, _mask(ignore_a, len(off_a)), drop_first)
    bound_b, drop_b = _boundaries(off_b, _mask(ignore_b, len(off_b)), drop_first)
    # Boundary ends are strictly increasing on each side, hence unique.
    ends, ia, ib = np.intersect1d(
        off_a[bound_a, 1], off_b[bound_b, 1], assume_unique=True, return_indices=True
    )
    idx_a, idx_b = bound_a[ia].astype(np.int64), bound_b[ib].astype(np.int64)
    drop_a[NO_MATCH] = len(bound_a) - len(idx_a)
    drop_b[NO_MATCH] = len(bound_b) - len(idx_b)
    return Alignment(
        n_a=len(off_a),
        n_b=len(off_b),
        idx_a=idx_a,
        idx_b=idx_b,
        spans=_spans(ends),
        dropped_a=_nonzero(drop_a),
        dropped_b=_nonzero(drop_b),
    )


def _boundaries(
    offsets: np.ndarray, ignore: np.ndarray, drop_first: bool
) -> tuple[np.ndarray, dict[str, int]]:
    """Positions after which all text up to their end, and nothing beyond, has been read."""
    empty = (offsets[:, 1] <= offsets[:, 0]) & ~ignore
    keep = np.flatnonzero(~ignore & ~empty)
    starts, ends = offsets[keep, 0], offsets[keep, 1]
    # Every later token must start at or after this end (no token reaches back into it, as
    # the byte pieces of one character do) and every earlier one end at or before it.
    later_start = np.full(len(starts), np.iinfo(np.int64).max)
    later_start[:-1] = np.minimum.accumulate(starts[:0:-1])[::-1]
    earlier_end = np.maximum.accumulate(ends)
    ok = (later_start >= ends) & (earlier_end <= ends)
    # Of several tokens ending at the same offset only the last one has read the whole text.
    ok[:-1] &= ends[1:] > ends[:-1]
    bound = keep[ok]
    dropped = {SPECIAL: int(ignore.sum()), EMPTY: int(empty.sum()), INSIDE: int((~ok).sum())}
    if drop_first and len(bound) and bound[0] == 0:
        bound = bound[1:]
        dropped[FIRST] = 1
    return bound, dropped


def align_windows(
    a: Tokenized,
    b: Tokenized,
    tokenizer_a: Any,
    tokenizer_b: Any,
    drop_first: bool = True,
) -> Alignment:
    """The paper's Algorithm 1: greedy window expansion over decoded text (reference only)."""
    ids_a, ids_b = a.ids.tolist(), b.ids.tolist()
    n_a, n_b = len(ids_a), len(ids_b)
    dec_a = lambda i, j: tokenizer_a.decode(ids_a[i:j])
    dec_b = lambda i, j: tokenizer_b.decode(ids_b[i:j])
    skip_a = lambda p: bool(a.ignore[p]) or not dec_a(p, p + 1).strip()
    skip_b = lambda p: bool(b.ignore[p]) or not dec_b(p, p + 1).strip()
    out_a: list[int] = []
    out_b: list[int] = []
    p_a = p_b = 0
    failure = None
    while p_a < n_a and p_b < n_b:
        while p_a < n_a and skip_a(p_a):
            p_a += 1
        while p_b < n_b and skip_b(p_b):
            p_b += 1
        if p_a >= n_a or p_b >= n_b:
            break  # only non-content tokens were left on one side
        if _norm(dec_a(p_a, p_a + 1)) == _norm(dec_b(p_b, p_b + 1)):
            out_a.append(p_a)
            out_b.append(p_b)
            p_a, p_b = p_a + 1, p_b + 1
            continue
        e_a, e_b = p_a + 1, p_b + 1
        found = False
        # The pseudo-code lets a window grow to |T| + 1, one past the last activation; windows
        # here stop at the end of the sequence, which decodes the same text.
        while True:
            w_a, w_b = _norm(dec_a(p_a, e_a)), _norm(dec_b(p_b, e_b))
            if w_a == w_b:
                out_a.append(e_a - 1)
                out_b.append(e_b - 1)
                p_a, p_b, found = e_a, e_b, True
                break
            if len(w_a) < len(w_b) and e_a < n_a:
                e_a += 1
            elif e_b < n_b:
                e_b += 1
            else:
                break
        if not found:
            failure = (
                f"no window from A[{p_a}] {dec_a(p_a, p_a + 1)!r} and B[{p_b}] "
                f"{dec_b(p_b, p_b + 1)!r} decodes to the same text"
            )
            break
    return _window_result(a, b, out_a, out_b, failure, drop_first, (p_a, p_b))


def _window_result(
    a: Tokenized,
    b: Tokenized,
    out_a: list[int],
    out_b: list[int],
    failure: str | None,
    drop_first: bool,
    stop: tuple[int, int],
) -> Alignment:
    """Package Algorithm 1's output as an Alignment with per-reason drop counts."""
    idx_a, idx_b = np.asarray(out_a, dtype=np.int64), np.asarray(out_b, dtype=np.int64)
    first = np.zeros(len(idx_a), dtype=bool)
    if drop_first:
        first = (idx_a == 0) | (idx_b == 0)
        idx_a, idx_b = idx_a[~first], idx_b[~first]
    drops = []
    for tok, idx, p in ((a, idx_a, stop[0]), (b, idx_b, stop[1])):
        n = len(tok)
        unreached = n - p if failure else 0
        special = int(tok.ignore[:p].sum()) if failure else int(tok.ignore.sum())
        drop = {FIRST: int(first.sum()), SPECIAL: special, UNREACHED: unreached}
        drop[SKIPPED] = n - len(idx) - sum(drop.values())
        drops.append(_nonzero(drop))
    return Alignment(
        n_a=len(a),
        n_b=len(b),
        idx_a=idx_a,
        idx_b=idx_b,
        spans=_spans(a.offsets[idx_a, 1]),
        dropped_a=drops[0],
        dropped_b=drops[1],
        failure=failure,
    )


def _norm(text: str) -> str:
    """Algorithm 1's normalize(): the decoded text without surrounding whitespace."""
    return text.strip()


def _spans(ends: np.ndarray) -> np.ndarray:
    """(start, end) of each aligned pair, where each starts at the previous pair's end."""
    ends = np.asarray(ends, dtype=np.int64)
    starts = np.concatenate([[0], ends])[:-1].astype(np.int64)
    return np.stack([starts, ends], axis=1)


def _as_offsets(offsets: Any, n: int | None = None) -> np.ndarray:
    """Offsets as an int64 [n, 2] array, checked."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if n is not None and off.shape[0] != n:
        raise AlignmentError(f"{off.shape[0]} offsets for {n} tokens")
    return off


def _mask(ignore: np.ndarray | None, n: int) -> np.ndarray:
    """An ignore mask of length n (all False when none is given)."""
    if ignore is None:
        return np.zeros(n, dtype=bool)
    mask = np.asarray(ignore, dtype=bool)
    if mask.shape != (n,):
        raise AlignmentError(f"ignore mask of shape {mask.shape} for {n} tokens")
    return mask


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    """Drop-reason counts without the zero entries."""
    return {k: int(v) for k, v in counts.items() if v}


def answer_boundaries(tok: Tokenized, contents: Sequence[str], roles: Sequence[str]) -> np.ndarray:
    """For each assistant message after the first message, the last template token before
    its content (the end of the chat template's answer header), or -1 where the content
    follows without a template token in between.

    These are the positions where a chat model has read the request and its own answer
    header, and decides how to answer: no content token ends there, so `align` never pairs
    them, but every model's rendering of the same conversation has one.
    """
    ends = tok.offsets[:, 1]
    out = []
    shared = np.cumsum([0, *map(len, contents)])
    for i, role in enumerate(roles):
        if i == 0 or role != "assistant":
            continue
        first = int(np.searchsorted(ends, shared[i], side="right"))  # first token of content i
        before = first - 1
        out.append(before if before > 0 and tok.ignore[before] else -1)
    return np.asarray(out, dtype=np.int64)


def with_answer_pairs(al: Alignment, a: Tokenized, b: Tokenized, contents: Sequence[str],
                      roles: Sequence[str]) -> Alignment:
    """`al` with each answer header of A paired with the same answer header of B.

    The pair covers no shared text (its span is empty at the start of the answer): both
    models have read the same messages so far, each in its own template.
    """
    bound_a = answer_boundaries(a, contents, roles)
    bound_b = answer_boundaries(b, contents, roles)
    keep = (bound_a >= 0) & (bound_b >= 0)
    if not keep.any():
        return al
    shared = np.cumsum([0, *map(len, contents)])
    at = np.asarray([shared[i] for i, r in enumerate(roles) if i > 0 and r == "assistant"])[keep]
    idx_a = np.concatenate([al.idx_a, bound_a[keep]])
    idx_b = np.concatenate([al.idx_b, bound_b[keep]])
    order = np.argsort(idx_a, kind="stable")
    idx_a, idx_b = idx_a[order], idx_b[order]
    if np.any(np.diff(idx_b) <= 0):  # templates that disagree on order: leave them out
        return al
    ends = np.concatenate([al.spans[:, 1], at])[order]
    return Alignment(
        n_a=al.n_a,
        n_b=al.n_b,
        idx_a=idx_a,
        idx_b=idx_b,
        spans=_spans(ends),
        dropped_a=al.dropped_a,
        dropped_b=al.dropped_b,
        failure=al.failure,
    )
