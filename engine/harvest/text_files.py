"""Local text files as sources: .txt files (one, or a directory of them), JSON lines
(.jsonl, .jsonl.gz) and parquet, chosen by `file_source` from the path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from engine.errors import ConfigError
from engine.harvest.text_documents import (
    SPEC_FORMS,
    Document,
    TextSource,
    chat_fields,
    record_document,
)

BATCH_ROWS = 1024


class _LocalSource:
    """A source read from this machine's files (`path`)."""

    path: Path

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ConfigError unless the source holds at least one document: checked before
        the models load or a store is written."""
        if next(iter(self.documents()), None) is None:
            raise ConfigError(
                f"{self.path} holds no text (empty, or only blank lines or records without "
                "text); point --sources at files with text"
            )


class TextFiles(_LocalSource):
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


class _RecordFile(_LocalSource):
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
        self.chat_fields = chat_fields(messages_field)
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
                doc = record_document(
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
            doc = record_document(
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
