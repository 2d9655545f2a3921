"""Crash-safe file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.errors import UserError

# From torch 2.6 on, torch.load(weights_only=True) cannot be made to run code (earlier
# versions can: CVE-2025-32434), so a pickled .pt file is read only on such a torch.
SAFE_TORCH_LOAD = (2, 6)


def torch_version() -> tuple[int, int]:
    """The installed torch's (major, minor)."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def load_pickled_tensors(path: Path, error: type[UserError]) -> Any:
    """A .pt file's tensors and plain values, read with torch.load(weights_only=True) so no
    code from the file runs; `error` (one line) on a torch where that guard can be bypassed
    and on a file it refuses or cannot read."""
    if torch_version() < SAFE_TORCH_LOAD:
        raise error(
            f"reading {path} (a pickled .pt file) needs torch >= 2.6, where loading it cannot "
            f"run code; this is torch {torch.__version__}: upgrade torch, or give the "
            ".safetensors form"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an untrusted file: any failure is the file's, said in a line
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        raise error(
            f"refused to read {path} ({reason}); give a .safetensors file, or a .pt file of "
            "tensors and plain values only"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, fsync it, and rename it into place."""
    atomic_write_bytes(path, text.encode())


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk: a rename made after it then
    survives a power loss with the content, not an empty file."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a folder cannot be opened on some systems (Windows): nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync for folders
    finally:
        os.close(fd)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors `save_file` to a temporary name, fsync it, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_folder(tmp: Path, target: Path, complete: str) -> None:
    """Rename a finished folder `tmp` to `target`, replacing an incomplete one there.

    A cache may be filled by several processes at once (parallel test workers, two dashboard
    sessions): whoever renames first wins, and a later writer that finds `target/complete`
    already there drops its own copy instead of failing or deleting the winner's.
    """
    tmp, target = Path(tmp), Path(target)
    if (target / complete).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.replace(target)
    except OSError:
        if not (target / complete).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
