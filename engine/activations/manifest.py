"""The manifest of an activation store: its format, the file of each rank's, and the checks
made on loading one (format, version, and the only files it may name) or resuming one.

A manifest is JSON: the models, data settings and dtype of the harvest, its shards (file,
pairs, windows consumed, bytes, SHA256), its document logs, its progress (the windows done)
and running statistics. It is the only record of what a harvest has done.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from engine.dtypes import DTYPES
from engine.errors import UserError

FORMAT = "modeldiff-activations"
VERSION = 1
MANIFEST = "manifest.json"
RANKS = "ranks"
_RANK_MANIFEST = re.compile(r"manifest-(\d+)-of-(\d+)\.json")
# The files a manifest may name, relative to the store: only these are ever read, so a
# manifest cannot point a reader outside its store ("../victim.txt").
_SHARD_FILE = re.compile(r"shards/(rank-\d{3,}-)?shard-\d{6,}\.safetensors")
_DOCUMENT_FILE = re.compile(r"documents/(rank-\d{3,}-)?part-\d{6,}\.jsonl")


class StoreError(UserError, ValueError):
    """An activation store is missing, incompatible or damaged."""


def store_dtype(name: str) -> torch.dtype:
    """The torch dtype for a store dtype name, with a clear error for unknown names."""
    if name not in DTYPES:
        raise StoreError(f"unknown store dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def manifest_name(rank: int = 0, world_size: int = 1) -> str:
    """The manifest of one rank of a harvest, relative to the store (one process: the store's)."""
    return MANIFEST if world_size == 1 else f"{RANKS}/manifest-{rank:03d}-of-{world_size:03d}.json"


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside 0..world_size-1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(
            f"rank {rank} of world size {world_size} is impossible; give a world size of at "
            "least 1 and a rank from 0 to world size - 1"
        )


def rank_files(path: Path) -> list[tuple[tuple[int, int], Path]]:
    """((rank, world size), file) of every rank manifest in a store, by rank."""
    found = []
    for file in (path / RANKS).glob("manifest-*-of-*.json"):
        match = _RANK_MANIFEST.fullmatch(file.name)
        if match:
            found.append(((int(match[1]), int(match[2])), file))
    return sorted(found)


def new_manifest(header: dict[str, Any], dtype: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "dtype": dtype,
        "created": now,
        "updated": now,
        "next_shard": 0,
        "shards": [],
        "progress": {"done_windows": [], "complete": False},
        "alignment": {},
        "stats": {"count": 0},
    }


def load_manifest(file: Path, store: Path) -> dict[str, Any]:
    """One manifest file, format- and version-checked."""
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(
            f"{file} is damaged ({err}); the store's record of its shards is lost: harvest it "
            f"again with `modeldiff harvest --out {store} --fresh`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a modeldiff activation-store manifest")
    if manifest.get("version", 0) > VERSION:
        raise StoreError(
            f"{store} was written by a newer modeldiff (store version {manifest['version']}, "
            f"this one reads {VERSION}); upgrade modeldiff"
        )
    _check_file_names(manifest, file)
    return manifest


def _check_file_names(manifest: dict[str, Any], file: Path) -> None:
    """Refuse a manifest that names files other than the store's own shards and logs."""
    shard = (_SHARD_FILE, "shard", "shards/shard-000000.safetensors")
    names = [
        (r.get("file") if isinstance(r, dict) else r, *shard) for r in manifest.get("shards", [])
    ]
    log_file = (_DOCUMENT_FILE, "document log", "documents/part-000000.jsonl")
    names += [(n, *log_file) for n in manifest.get("document_logs", [])]
    for name, pattern, what, example in names:
        if not isinstance(name, str) or pattern.fullmatch(name) is None:
            raise StoreError(
                f"{file} names {name!r} as a {what}, which is not a file of the store (like "
                f"{example}); the manifest was edited by hand or is not from modeldiff: "
                "harvest the store again with --fresh"
            )


def check_compatible(manifest: dict, header: dict, dtype: str, path: Path) -> None:
    """Refuse to resume a store harvested with other models, layers or data settings."""
    for key, value in {**header, "dtype": dtype}.items():
        if key == "provenance":
            continue
        stored = manifest.get(key)
        if json.loads(json.dumps(value)) != stored:
            raise StoreError(
                f"the store at {path} was harvested with a different {key!r} "
                f"({json.dumps(stored)[:200]} vs now {json.dumps(value)[:200]}); "
                "pass --fresh to start it over, or choose another output directory"
            )
