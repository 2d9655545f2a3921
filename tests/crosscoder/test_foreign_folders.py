"""Writing a run or an export never deletes or overwrites another tool's files: a folder
is cleared (train --fresh, import-paper) only when it holds modeldiff's own run, and
export-paper replaces only an earlier export's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.crosscoder.checkpoint import CheckpointError, clear_run, save_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.paper_format import export_paper, import_paper
from engine.partition import Partition


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def square_run(folder: Path) -> Path:
    cc = Crosscoder(16, 16, Partition(2, 3, 27))
    save_crosscoder(folder, cc, Normalizer.identity(), train_config={"k": 8})
    return folder


@pytest.mark.parametrize(
    "files",
    [
        {"crosscoder.json": json.dumps({"format": "another-tool"})},
        {"checkpoints/step-00000007/weights.bin": "theirs", "checkpoints/latest": "step-7"},
        {"crosscoder.safetensors": "not ours"},
    ],
)
def test_a_folder_of_run_like_names_from_another_tool_is_not_cleared(tmp_path, files):
    folder = tmp_path / "theirs"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="not a training run directory"):
        clear_run(folder)
    paper = export_paper(square_run(tmp_path / "run"), tmp_path / "paper").out
    with pytest.raises(CheckpointError, match="not a training run directory"):
        import_paper(paper, folder)
    assert snapshot(folder) == before


def test_our_own_run_is_still_cleared(tmp_path):
    run = square_run(tmp_path / "run")
    clear_run(run)
    assert list(run.iterdir()) == []


def test_export_paper_never_overwrites_another_tools_files(tmp_path):
    run = square_run(tmp_path / "run")
    theirs = tmp_path / "hf-model"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"someone else's model")
    (theirs / "config.json").write_text('{"model_type": "llama"}')
    before = snapshot(theirs)
    with pytest.raises(CheckpointError, match="not written by `modeldiff export-paper`"):
        export_paper(run, theirs)
    assert snapshot(theirs) == before
    # An earlier export is replaced.
    export_paper(run, tmp_path / "paper")
    export_paper(run, tmp_path / "paper")
