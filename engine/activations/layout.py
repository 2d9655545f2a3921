"""Where a harvest may write its store: a folder it can create, laid out for this number of
processes, and what `--fresh` clears (only the files a store writes, and only in a store or
a folder holding nothing else).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from engine.activations.manifest import (
    FORMAT,
    MANIFEST,
    RANKS,
    StoreError,
    load_manifest,
    manifest_name,
    rank_files,
)

# The files a store writes in each of its folders ("" is the store itself), with the
# temporary files of an atomic write (a leading dot and a random tail) and shards set aside
# as .bad; `--fresh` removes these and nothing else.
_OWN_FILES = {
    "": re.compile(r"\.?manifest\.json(\..+)?"),
    RANKS: re.compile(r"\.?manifest-\d{3,}-of-\d{3,}\.json(\..+)?"),
    "shards": re.compile(r"\.?(rank-\d{3,}-)?shard-\d{6,}\.safetensors(\..+)?"),
    "documents": re.compile(r"\.?(rank-\d{3,}-)?part-\d{6,}\.jsonl(\..+)?"),
}


def resumed_manifest(
    path: str | Path, fresh: bool = False, rank: int = 0, world_size: int = 1
) -> dict[str, Any] | None:
    """Check, before a harvest loads its models, that it can write the store at `path` (a
    directory it can create, one `fresh` may clear, laid out for this many processes); the
    manifest it would resume, or None for a new or fresh store."""
    path = Path(path)
    _check_writable(path)
    if fresh:
        _check_clearable(path)
        return None
    check_layout(path, world_size)
    file = path / manifest_name(rank, world_size)
    return load_manifest(file, path) if file.is_file() else None


def _check_writable(path: Path) -> None:
    """Refuse an output path that is a file, or whose nearest existing folder is a file or
    cannot be written to."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out {path} is a file; give a directory for the activation store")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to {parent}; choose an --out directory you can write")


def check_layout(path: Path, world_size: int) -> None:
    """Refuse to continue a store harvested by a different number of processes."""
    worlds = {w for (_, w), _ in rank_files(path)}
    single = (path / MANIFEST).is_file()
    if world_size == 1 and worlds:
        raise StoreError(
            f"the store at {path} was harvested by {max(worlds)} processes; continue it with "
            f"--world-size {max(worlds)} (one process per rank), or pass --fresh to start over"
        )
    if world_size > 1 and single:
        raise StoreError(
            f"the store at {path} was harvested by one process; continue it without --rank/"
            "--world-size, or pass --fresh to start over"
        )
    if world_size > 1 and worlds - {world_size}:
        raise StoreError(
            f"the store at {path} was harvested with --world-size "
            f"{', '.join(map(str, sorted(worlds)))}; continue it with that world size, or "
            "pass --fresh to start over"
        )


def clear_store(path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Remove what a fresh harvest by this rank replaces: its manifest, shards and document
    logs; rank 0 also removes what no rank of this world size owns. Only a store (or a
    folder holding nothing else) is cleared, and only of the files a store writes."""
    _check_clearable(path)
    (path / manifest_name(rank, world_size)).unlink(missing_ok=True)
    if rank == 0:
        # Leftovers of a harvest with another number of processes.
        (path / MANIFEST).unlink(missing_ok=True)
        for (_, world), file in rank_files(path):
            if world != world_size:
                file.unlink(missing_ok=True)  # (another rank may be clearing it too)
    for sub in ("shards", "documents"):
        for file in (path / sub).glob("*"):
            if _owned(sub, file) and _cleared_by(file.name, rank, world_size):
                file.unlink(missing_ok=True)


def _owned(folder: str, file: Path) -> bool:
    """Whether `file`, in the store's `folder`, is one a store writes."""
    return file.is_file() and _OWN_FILES[folder].fullmatch(file.name) is not None


def _check_clearable(path: Path) -> None:
    """Refuse to clear anything but an activation store, or a folder holding only what a
    store writes (a new or emptied one)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"--fresh refuses to clear {path}: it is a file, not a store directory")
    manifests = [path / MANIFEST] if (path / MANIFEST).exists() else []
    manifests += [file for _, file in rank_files(path)]
    foreign = [m for m in manifests if not _is_store_manifest(m)]
    if foreign:
        raise StoreError(
            f"--fresh refuses to clear {path}: {foreign[0].relative_to(path)} is not an "
            "activation-store manifest, so the folder is not a modeldiff store; choose a new "
            "or empty --out directory"
        )
    if manifests:
        return  # a store: its own files go, anything else put in it stays
    others = _foreign_entries(path)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise StoreError(
            f"--fresh refuses to clear {path}: it is not an activation store (it holds "
            f"{shown}); choose a new or empty --out directory"
        )


def _foreign_entries(path: Path) -> list[str]:
    """What a folder holds that a store does not write, relative to it."""
    found = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and entry.name in _OWN_FILES:
            found += [
                f"{entry.name}/{f.name}"
                for f in sorted(entry.iterdir())
                if not _owned(entry.name, f)
            ]
        elif not _owned("", entry):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def _is_store_manifest(file: Path) -> bool:
    """Whether `file` is a store manifest, whole or damaged (its start names the format)."""
    try:
        data = file.read_bytes()
    except OSError:
        return False
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A damaged manifest (a crash in the middle of a copy) is still the store's: the
        # writer puts the format first.
        return f'"format": "{FORMAT}"'.encode() in data[:200]
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _cleared_by(name: str, rank: int, world_size: int) -> bool:
    """Whether a fresh harvest by `rank` removes this shard or document-log file."""
    if world_size == 1:
        return True
    match = re.match(r"\.?rank-(\d+)-", name)
    owner = None if match is None else int(match[1])
    # Rank 0 also removes the files no rank of this world size will replace.
    return owner == rank or (rank == 0 and (owner is None or owner >= world_size))
