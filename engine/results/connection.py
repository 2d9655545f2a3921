"""Opening the DuckDB file: clear errors for the usual mistakes (a directory, a SQLite file,
a missing or damaged file), and waiting with back-off while another process holds its lock.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import duckdb

from engine.results.errors import ResultsDBError, _first_line

Cursor = duckdb.DuckDBPyConnection

# Seconds to wait for another process (the dashboard, a `modeldiff` command) to release the
# file before giving up: its writes are short, so this is only exceeded by a stuck process.
LOCK_WAIT_S = 60.0


# DuckDB installs and loads extensions on demand: opening a SQLite file as a database
# would download the sqlite extension from the network. A results file needs none.
_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _connect(
    path: str, read_only: bool, create: bool = True, wait: float = 0.0, check: bool = True
) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, with clear errors for the usual mistakes; wait up to `wait`
    seconds while another connection holds the file; `check` reads the catalog."""
    if path == ":memory:":
        if read_only:
            raise ResultsDBError("an in-memory database cannot be read-only")
        return duckdb.connect(path, config=_NO_EXTENSIONS)
    file = Path(path)
    _check_file(file, read_only or not create)
    if not read_only:
        file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(wait, 0.0)
    delay = 0.02
    while True:
        try:
            conn = duckdb.connect(path, read_only=read_only, config=_NO_EXTENSIONS)
            break
        except (duckdb.IOException, duckdb.ConnectionException) as err:
            if not _is_lock_conflict(err) or time.monotonic() + delay > deadline:
                raise ResultsDBError(_open_error(file, err, wait)) from None
            # Jitter, so that two waiting processes do not retry in step.
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)
        except duckdb.Error as err:
            raise ResultsDBError(_unreadable(file, err)) from None
    if check:
        try:
            # Reading the catalog reads its blocks: a damaged file fails here, not half-way
            # through a command.
            conn.execute("SELECT count(*) FROM duckdb_columns()").fetchall()
        except duckdb.Error as err:
            conn.close()
            raise ResultsDBError(_unreadable(file, err)) from None
    return conn


# How DuckDB reports a file held by another process (a file lock), or by this process with
# other settings (a read-only connection while this one writes, or the reverse).
_LOCK_CONFLICT = ("Could not set lock", "Conflicting lock", "different configuration")


def _is_lock_conflict(err: BaseException) -> bool:
    return any(sign in str(err) for sign in _LOCK_CONFLICT)


def _open_error(file: Path, err: BaseException, wait: float) -> str:
    """The message for a file DuckDB could not open."""
    if _is_damage(err):
        return _damaged(file, err)
    if isinstance(err, duckdb.ConnectionException):
        return (
            f"cannot open {file}: {_first_line(err)}. This process still had it open with "
            f"read_only set differently after {wait:g} s; share one Database per file"
        )
    waited = f" after waiting {wait:g} s" if wait > 0 and _is_lock_conflict(err) else ""
    return (
        f"cannot open {file}{waited}: {_first_line(err)}. DuckDB lets one process write a "
        "file, or several only read it: stop the other process (an analysis or a stuck "
        "command) or open both read-only"
    )


def _check_file(file: Path, must_exist: bool) -> None:
    """Refuse, saying what it is, a path that is not a DuckDB file (a directory, a SQLite
    file), and a missing one unless it may be created."""
    if file.is_dir():
        raise ResultsDBError(
            f"{file} is a directory, not a results database; give the path of a .duckdb file "
            "(`modeldiff analyze --db FILE` creates one)"
        )
    if not file.exists():
        if must_exist:
            raise ResultsDBError(
                f"no results database at {file}; run `modeldiff analyze` to create one, "
                "or check the path"
            )
        return
    try:
        with file.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as err:
        raise ResultsDBError(f"cannot open {file}: {err.strerror or err}") from None
    if head == _SQLITE_MAGIC:
        raise ResultsDBError(
            f"{file} is a SQLite database, not a DuckDB results database; give the .duckdb "
            "file `modeldiff analyze` wrote"
        )


# How DuckDB reports a damaged file (a truncated one, a block failing its checksum).
_DAMAGE = ("Could not read enough bytes", "Corrupt database file", "not a valid DuckDB database")


def _is_damage(err: BaseException) -> bool:
    return any(sign in str(err) for sign in _DAMAGE)


def _unreadable(file: Path, err: BaseException) -> str:
    """The message for a file DuckDB opened but could not read."""
    return _damaged(file, err) if _is_damage(err) else f"cannot open {file}: {_first_line(err)}"


def _damaged(file: Path, err: BaseException) -> str:
    """The message for a results file DuckDB cannot read."""
    return (
        f"cannot open {file}: {_first_line(err)}. The file is damaged or not a DuckDB "
        "database: restore it from a backup, or move it aside and run `modeldiff analyze` "
        "again to rebuild the results (explanations, scores and triage saved in it are lost)"
    )
