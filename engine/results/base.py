"""A Database's foundation: opening the file, a connection and cursor per call, the write
lock and transactions, and the schema check and upgrade on opening.

The table families (`engine.results.runs`, `engine.results.features`, ...) build on it through
`engine.results.tables`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import duckdb

from engine.results import schema
from engine.results.connection import LOCK_WAIT_S, Cursor, _connect, _damaged, _is_damage
from engine.results.errors import ResultsDBError, _first_line


class StoreBase:
    """The connection, transactions and schema version of a results database file."""

    def __init__(
        self,
        path: str | Path,
        read_only: bool = False,
        create: bool = True,
        hold: bool = True,
        wait: float = LOCK_WAIT_S,
    ) -> None:
        """Open (with `create`, also create) the database file at `path`; with `hold=False`,
        check it and close it again until a call needs it."""
        self.path = Path(path)
        self.read_only = read_only
        self.wait = wait
        self._lock = threading.RLock()  # serialises writes (DuckDB allows one writer at a time)
        self._tx: Cursor | None = None  # the open `transaction()`'s cursor, if any
        self._local = threading.local()  # hold=False: this thread's open connection, if any
        self._closed = False
        self._conn: duckdb.DuckDBPyConnection | None = _connect(
            str(path), read_only, create, wait=wait
        )
        try:
            self._version = self._prepare()
        except BaseException:
            self.close()
            raise
        if not hold and str(path) != ":memory:":  # an in-memory database lives in its connection
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"Database({str(self.path)!r}{mode})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def schema_version(self) -> int:
        """The file's schema version (always the current one once opened)."""
        return self._version

    # connection plumbing ----------------------------------------------------------------

    @contextmanager
    def _connection(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """The held connection; with hold=False, this thread's open one, or one opened for
        this call (read-only unless it writes) and closed after it, releasing the file."""
        if self._closed:
            raise ResultsDBError(f"the database {self.path} is closed; open a new Database")
        if self._conn is not None:
            yield self._conn
            return
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            # A read inside a write (or a write inside a transaction) uses the open
            # connection: opening the file again with other settings would wait on itself.
            if write and not self._local.writes:
                raise ResultsDBError("cannot write to the database from inside a read")
            yield pinned
            return
        read_only = self.read_only or not write
        conn = _connect(str(self.path), read_only, create=False, wait=self.wait, check=False)
        self._local.conn, self._local.writes = conn, not read_only
        try:
            yield conn
        finally:
            self._local.conn = None
            conn.close()

    @contextmanager
    def _cursor(self, write: bool = False) -> Iterator[Cursor]:
        """A fresh cursor of the connection, closed afterwards."""
        with self._connection(write) as conn:
            cur = conn.cursor()
            try:
                yield cur
            except duckdb.Error as err:
                # Damage in a block only shows when a query reads it.
                if _is_damage(err):
                    raise ResultsDBError(_damaged(self.path, err)) from None
                raise
            finally:
                cur.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: everything written inside lands together or not at all (an
        interrupted analysis leaves no partial run behind)."""
        with self._write() as cur:
            self._tx = cur
            try:
                yield
            finally:
                self._tx = None

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        """A cursor in one transaction under the write lock, rolled back on any error;
        inside `transaction()`, that transaction's cursor."""
        if self.read_only:
            raise ResultsDBError(
                f"{self.path} was opened read-only; open Database(path, read_only=False) to write"
            )
        with self._lock:
            if self._tx is not None:  # the lock is held by this thread's transaction
                yield self._tx
                return
        with self._lock, self._cursor(write=True) as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _prepare(self) -> int:
        """Check the file's schema version, upgrading an older file; return the version."""
        target = len(schema.MIGRATIONS)
        with self._cursor() as cur:
            version = _file_version(cur, self.path)
        if version > target:
            raise ResultsDBError(
                f"{self.path} was written by a newer modeldiff (schema {version}, this reads "
                f"{target}); upgrade modeldiff"
            )
        if version < target:
            if self.read_only:
                raise ResultsDBError(
                    f"{self.path} has schema {version} and this modeldiff reads {target}; open "
                    "it once with read_only=False to upgrade it"
                )
            self._migrate(version, target)
        return target

    def _migrate(self, version: int, target: int) -> None:
        """Apply the migrations from `version` to `target` in one transaction."""
        try:
            with self._write() as cur:
                for script in schema.MIGRATIONS[version:target]:
                    cur.execute(script)
                cur.execute(
                    "INSERT INTO meta VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    ["schema_version", str(target)],
                )
        except duckdb.Error as err:
            raise ResultsDBError(
                f"upgrading {self.path} from schema {version} to {target} failed, and the file "
                f"was left unchanged: {_first_line(err)}"
            ) from err


def _file_version(cur: Cursor, path: Path) -> int:
    """The schema version a file records; 0 for an empty file."""
    tables = {
        r[0]
        for r in cur.execute(
            "SELECT table_name FROM duckdb_tables() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
    }
    if "meta" not in tables:
        if tables:
            raise ResultsDBError(
                f"{path} is a DuckDB file but not a modeldiff results database (it has tables "
                f"{', '.join(sorted(tables)[:5])} and no meta table); choose another path"
            )
        return 0
    row = cur.execute("SELECT value FROM meta WHERE key = ?", ["schema_version"]).fetchone()
    if row is None:
        raise ResultsDBError(f"{path} has no schema version in its meta table; it is damaged")
    return int(row[0])
