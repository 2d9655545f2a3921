"""Pickled .pt files from elsewhere (the paper-format import, reachable from hf://, and
steering vectors for transfer) are read only on a torch whose weights_only guard holds,
and a file it refuses is one error line naming the fix, with no code from it run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.crosscoder.paper_format import PaperFormatError, read_paper
from engine.errors import ConfigError
from engine.steering.transfer import load_vector

RAN: list[str] = []


class Payload:
    """Runs `RAN.append` when unpickled, if a loader let it."""

    def __reduce__(self):
        return (RAN.append, ("code ran",))


def hostile(path):
    torch.save({"W_enc": torch.zeros(2, 2), "x": Payload()}, path)
    return path


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "paper"
    folder.mkdir()
    hostile(folder / "model_final.pt")
    with pytest.raises(PaperFormatError, match=r"refused to read .*safetensors") as err:
        read_paper(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="refused to read") as err:
        load_vector(hostile(tmp_path / "vector.pt"))
    assert "\n" not in str(err.value)
    assert RAN == []


def test_garbage_pt_files_are_one_line_errors(tmp_path):
    for name, data in {"empty.pt": b"", "random.pt": bytes(range(256))}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as err:
            load_vector(tmp_path / name)
        assert "\n" not in str(err.value)


def test_a_torch_whose_guard_can_be_bypassed_reads_no_pickle(tmp_path, monkeypatch):
    torch.save({"vector": torch.ones(4)}, tmp_path / "vector.pt")
    assert load_vector(tmp_path / "vector.pt").shape == (4,)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.6.*2\.5\.1"):
        load_vector(tmp_path / "vector.pt")
    folder = tmp_path / "paper"
    folder.mkdir()
    (folder / "model_final.pt").write_bytes((tmp_path / "vector.pt").read_bytes())
    with pytest.raises(PaperFormatError, match=r"needs torch >= 2\.6"):
        read_paper(folder)


def test_the_package_requires_a_safe_torch():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "torch>=2.6" in project["project"]["dependencies"]


def test_import_paper_of_a_hostile_file_is_one_error_line(tmp_path):
    folder = tmp_path / "paper"
    folder.mkdir()
    hostile(folder / "model_final.pt")
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "import-paper", str(folder), "--out",
         str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: refused")
    assert not (tmp_path / "run").exists()


# -- tensors from elsewhere: shapes and values checked, sizes bounded ---------------------


@pytest.mark.parametrize(
    ("name", "bad", "needle"),
    [
        ("encoder.bias", lambda t: t[:1], r"encoder.bias has shape \[1\]"),
        ("decoder.bias", lambda t: t[0], "decoder.bias has shape"),
        ("activation_mean", lambda t: t[:, :1], "activation_mean has shape"),
        ("decoder.weight", lambda t: t.index_fill(1, torch.tensor([9]), float("nan")), "NaN"),
        ("encoder.bias", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NaN or"),
    ],
)
def test_paper_tensors_of_the_wrong_shape_or_not_finite_are_refused(tmp_path, name, bad, needle):
    from tests.interop.test_paper_format import F, paper_state, save_paper_run

    state = paper_state(4, 6, normaliser=True)
    state[name] = bad(state[name])
    folder = save_paper_run(tmp_path / "paper", state, (4 / F, 6 / F))
    with pytest.raises(PaperFormatError, match=needle):
        read_paper(folder)


def test_a_crosscoder_json_cannot_make_us_allocate_what_it_claims(tmp_path, monkeypatch):
    import json

    from engine.crosscoder import checkpoint
    from engine.crosscoder.checkpoint import CheckpointError, load_crosscoder, save_crosscoder
    from engine.crosscoder.model import Crosscoder
    from engine.crosscoder.normalize import Normalizer
    from engine.partition import Partition

    save_crosscoder(tmp_path, Crosscoder(8, 8, Partition(1, 1, 6)), Normalizer.identity())
    header = json.loads((tmp_path / "crosscoder.json").read_text())
    header.update(d_a=1_000_000, d_b=1_000_000)
    header["partition"]["n_shared"] = 10_000_000  # terabytes, if it were allocated
    (tmp_path / "crosscoder.json").write_text(json.dumps(header))
    built = []
    monkeypatch.setattr(checkpoint, "Crosscoder", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match="cannot hold"):
        load_crosscoder(tmp_path)
    assert built == []
    header["d_a"] = "wide"
    (tmp_path / "crosscoder.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="describes no usable crosscoder"):
        load_crosscoder(tmp_path)
