"""Rendering a Document as the text one model reads.

`render` puts a chat through the model's chat template where it has one, else a plain
transcript. Either way the message contents appear verbatim and in order, which is what
`align.tokenize` needs to map two models' renderings onto the same shared text (the
concatenated contents).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError
from engine.harvest.text_documents import Document, Message

# Private-use characters stand in for message contents when a template is rendered to find
# where it puts them; no template writes them itself.
SENTINEL = "\ue000{}\ue001"


class RenderError(ConfigError):
    """A chat document cannot be rendered with its message contents recoverable for alignment."""


@dataclass(frozen=True)
class Rendered:
    """What one model reads for a document, and the message contents embedded in it."""

    text: str
    contents: list[str] | None  # chat: contents in order, for align.tokenize; prose: None
    starts: list[int] | None = None  # chat: where each content starts in `text`


def render(doc: Document, tokenizer: Any = None, use_template: bool = True) -> Rendered:
    """The text a model reads for `doc`: prose as is; a chat through the tokenizer's chat
    template if it has one (and `use_template`), else a "User: ...\\n\\nAssistant: ..." transcript.

    Raises RenderError when the message contents would not be recoverable from the result.
    """
    if doc.messages is None:
        return Rendered(doc.text or "", None)
    contents = [m.content for m in doc.messages]
    if use_template and getattr(tokenizer, "chat_template", None):
        pieces = _template_pieces(doc, tokenizer)
        text = _interleave(pieces, contents)
        if _apply_template(doc, tokenizer, contents) != text:
            raise RenderError(
                f"{doc.id}: the chat template of {type(tokenizer).__name__} alters message "
                "contents (or depends on them), so they cannot be aligned; skip the document "
                "or render with use_template=False"
            )
    else:
        pieces = _transcript_pieces(doc.messages)
        text = _interleave(pieces, contents)
    return Rendered(text, contents, _content_starts(pieces, contents))


def _transcript_pieces(messages: Sequence[Message]) -> list[str]:
    """Template text around the contents of a plain transcript (role labels, blank lines)."""
    labels = [f"{m.role.title()}: " for m in messages]
    return [labels[0]] + [f"\n\n{label}" for label in labels[1:]] + ["\n\n"]


def _template_pieces(doc: Document, tokenizer: Any) -> list[str]:
    """Template text around the contents: the template rendered with placeholder contents."""
    sentinels = [SENTINEL.format(i) for i in range(len(doc.messages or ()))]
    rendered = _apply_template(doc, tokenizer, sentinels)
    pieces = re.split("\ue000\\d+\ue001", rendered)
    if re.findall("\ue000\\d+\ue001", rendered) != sentinels:
        raise RenderError(
            f"{doc.id}: the chat template of {type(tokenizer).__name__} does not write every "
            "message content exactly once and in order; skip the document or render with "
            "use_template=False"
        )
    return pieces


def _apply_template(doc: Document, tokenizer: Any, contents: Sequence[str]) -> str:
    """The tokenizer's chat template applied to the document's roles with these contents."""
    roles = [m.role for m in doc.messages or ()]
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # jinja2 errors, and templates' own raise_exception()
        raise RenderError(
            f"{doc.id}: the chat template of {type(tokenizer).__name__} rejects this "
            f"conversation ({type(err).__name__}: {err}); skip it or render with "
            "use_template=False"
        ) from None


def _interleave(pieces: Sequence[str], contents: Sequence[str]) -> str:
    """pieces[0] + contents[0] + pieces[1] + ... + contents[-1] + pieces[-1]."""
    return "".join(p + c for p, c in zip(pieces, contents, strict=False)) + pieces[-1]


def _content_starts(pieces: Sequence[str], contents: Sequence[str]) -> list[int]:
    """Where each content starts in _interleave(pieces, contents)."""
    starts, pos = [], 0
    for piece, content in zip(pieces, contents, strict=False):
        pos += len(piece)
        starts.append(pos)
        pos += len(content)
    return starts
