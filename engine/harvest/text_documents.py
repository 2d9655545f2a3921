"""Documents and the sources that stream them, and records (JSON lines, parquet rows, hub
rows) turned into documents.

A source yields `Document`s (prose, or chat messages) in a deterministic order, one at a time,
so a corpus larger than memory streams through.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import ConfigError

CHAT_FIELDS = ("messages", "conversation")
# ShareGPT-style records name roles and contents differently.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
SPEC_FORMS = (
    "'demo:chitchat', 'demo:pydoc', 'demo:kjv', 'fineweb', 'lmsys', a path to a .txt, .jsonl "
    "(.jsonl.gz) or .parquet file or to a directory of .txt files, "
    "{path = ..., text_field = ..., messages_field = ...}, or "
    "{dataset = 'org/name', config = ..., split = ..., text_field = ..., messages_field = ...}"
)


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class Document:
    """One document of a source: prose `text`, or chat `messages` (exactly one is set)."""

    id: str  # stable and unique within its source
    source: str
    text: str | None = None
    messages: tuple[Message, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"document {self.id!r} needs exactly one of text and messages")

    @property
    def is_chat(self) -> bool:
        """Whether the document is a conversation."""
        return self.messages is not None

    @property
    def n_chars(self) -> int:
        """Characters of content: the text, or the message contents (not roles or template)."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return len(self.text or "")


class TextSource(Protocol):
    """Anything with a name that streams Documents in a deterministic order."""

    name: str

    def documents(self) -> Iterator[Document]:
        """The source's documents, first to last."""
        ...


def chat_document(doc_id: str, source: str, messages: Iterable[Message]) -> Document | None:
    """A chat Document with contents stripped and empty messages dropped (None if none left)."""
    # Templates often trim contents (`| trim`), and alignment needs each content verbatim in
    # every model's rendering; stripped contents render the same under every template.
    kept = tuple(Message(m.role, m.content.strip()) for m in messages if m.content.strip())
    return Document(doc_id, source, messages=kept) if kept else None


def _message(item: Any, where: str) -> Message:
    """A Message from a {"role", "content"} (or ShareGPT {"from", "value"}) object."""
    if isinstance(item, dict):
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if isinstance(role, str) and isinstance(content, str):
            return Message(ROLE_ALIASES.get(role, role), content)
    raise ConfigError(
        f"{where}: each chat message must be an object with string 'role' and 'content' "
        f"fields, got {str(item)[:80]!r}"
    )


def record_document(
    record: Any,
    doc_id: str,
    source: str,
    text_field: str | None,
    chat_fields: Sequence[str],
    where: str,
) -> Document | None:
    """The Document a record holds: its text field, else its first chat field (None if empty)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field is not None and isinstance(record.get(text_field), str):
        text = record[text_field]
        return Document(doc_id, source, text=text) if text.strip() else None
    for name in chat_fields:
        if isinstance(record.get(name), list | tuple):
            messages = [_message(item, where) for item in record[name]]
            return chat_document(doc_id, source, messages)
    wanted = " or ".join(repr(f) for f in (text_field, *chat_fields) if f)
    raise ConfigError(
        f"{where}: no text or chat field ({wanted}) in a record with fields "
        f"{sorted(record)[:12]}; name the fields with text_field = ... or messages_field = ..."
    )


def chat_fields(messages_field: str | None) -> tuple[str, ...]:
    """Field names searched for a conversation."""
    return CHAT_FIELDS if messages_field is None else (messages_field,)
