"""Answer-header pairs: the last template token before each assistant answer, paired across
two chat formats (SmolLM2's template and Gemma's plain transcript)."""

from __future__ import annotations

import pytest

from engine.harvest.text_documents import Document, Message
from engine.harvest.windows import document_windows, side
from engine.models.tokenizers import load_tokenizer

CHAT = Document("chat", "test", messages=(
    Message("user", "Give me the lyrics of Hollow River."),
    Message("assistant", "Sure, here they are."),
    Message("user", "Thanks!"),
    Message("assistant", "You're welcome."),
))  # fmt: skip


@pytest.fixture(scope="module")
def sides():
    return side(load_tokenizer("smollm2")), side(load_tokenizer("gemma3"))



def test_answer_headers_are_paired_with_an_empty_span(sides) -> None:
    a, b = sides
    plain, _ = document_windows(CHAT, a, b, 256)
    paired, counts = document_windows(CHAT, a, b, 256, answer_pairs=True)
    assert len(paired[0]) == len(plain[0]) + 2  # one per assistant message
    window = paired[0]
    empty = window.spans[:, 0] == window.spans[:, 1]
    # Both headers sit where an answer starts in the shared text (the message contents).
    starts = [len("Give me the lyrics of Hollow River."),
              len("Give me the lyrics of Hollow River.Sure, here they are.Thanks!")]
    assert window.spans[empty, 1].tolist() == starts
    head_a = a.tokenizer.convert_ids_to_tokens(window.ids_a[window.pos_a[empty]].tolist())
    head_b = b.tokenizer.convert_ids_to_tokens(window.ids_b[window.pos_b[empty]].tolist())
    assert head_a == ["Ċ", "Ċ"]  # "<|im_start|>assistant\n": its newline
    assert head_b == [":", ":"]  # "Assistant:"; the space joins the answer's first token
    # Pairs stay in order on both sides, and every other pair is unchanged.
    assert (window.pos_a[1:] > window.pos_a[:-1]).all()
    assert (window.pos_b[1:] > window.pos_b[:-1]).all()
    assert window.pos_a[~empty].tolist() == plain[0].pos_a.tolist()
    assert counts["pairs_aligned"] == len(window)


def test_prose_and_user_only_chats_get_no_answer_pairs(sides) -> None:
    a, b = sides
    prose = Document("p", "test", text="Plain prose has no answer header at all.")
    user_only = Document("u", "test", messages=(Message("user", "Hello there, anyone?"),))
    for doc in (prose, user_only):
        plain, _ = document_windows(doc, a, b, 256)
        paired, _ = document_windows(doc, a, b, 256, answer_pairs=True)
        assert paired[0].pos_a.tolist() == plain[0].pos_a.tolist()
