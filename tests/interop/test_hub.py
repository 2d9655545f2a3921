"""Runs on the Hugging Face Hub: `modeldiff push`, and every run argument taking
hf://OWNER/NAME, against the real huggingface_hub with only its HTTP transport faked
(tests/interop/fake_hub.py) and its real cache layout on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.crosscoder.checkpoint import (
    RUN_FILES,
    CheckpointError,
    load_crosscoder,
    save_crosscoder,
)
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.hub import HubError, HubRef, parse_ref, resolve_run, run_name
from engine.partition import Partition
from tests.interop.fake_hub import FakeHub

pytest.importorskip("huggingface_hub")

REPO = "analyst/tiny-dfc"


MODELS = {
    "a": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": {"kind": "hub"},
          "class": "LlamaForCausalLM", "layer": 15, "n_layers": 30, "d_model": 24},
    "b": {"name": "google/gemma-3-270m", "source": {"kind": "hub"},
          "class": "Gemma3ForCausalLM", "layer": 9, "n_layers": 18, "d_model": 16},
}  # fmt: skip


@pytest.fixture
def saved(tmp_path) -> Path:
    """A run directory as training leaves it (final files and a checkpoints/ folder)."""
    cc = Crosscoder(24, 16, Partition(4, 2, 26))
    save_crosscoder(
        tmp_path / "run", cc, Normalizer(0.5, 2.0),
        train_config={"k": 8, "steps": 100, "reassign_every": 0},
        metrics={"fve": 0.71, "fve_a": 0.75, "fve_b": 0.66, "l0": 8.0, "dead_frac": 0.05},
        models=MODELS,
    )  # fmt: skip
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000100\n")
    return tmp_path / "run"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    fake.install(monkeypatch, tmp_path / "hf-cache")
    monkeypatch.setenv("HF_TOKEN", fake.token)  # logged in (pushed repositories are private)
    yield fake
    FakeHub.uninstall()


def push(run: Path, hub: FakeHub, *extra: str, repo: str = REPO, token: str | None = None) -> int:
    """`modeldiff push RUN --repo REPO EXTRA` with the token in HF_TOKEN (as after a login)."""
    before = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token or hub.token
    try:
        return main(["push", str(run), "--repo", repo, *extra])
    finally:
        os.environ.pop("HF_TOKEN")
        if before is not None:
            os.environ["HF_TOKEN"] = before


def test_location_rule_never_takes_a_local_path_for_the_hub():
    assert parse_ref("hf://owner/name") == HubRef("owner/name")
    assert parse_ref("hf://owner/name@v1/runs/a") == HubRef("owner/name", "v1", "runs/a")
    for local in ("owner/name", "runs/demo", "./hf/x", "/abs/path", Path("hf://owner/name")):
        assert parse_ref(local) is None
    for bad in ("hf://owner", "hf://owner/", "hf://owner/name@", "hf://o/n/../x", "hf://-o/n"):
        with pytest.raises(HubError, match="hf://OWNER/NAME"):
            parse_ref(bad)
    assert run_name("hf://owner/name") == "name"
    assert run_name("hf://owner/name/runs/a") == "a"


def test_push_uploads_the_run_and_a_model_card_that_loads_back(saved, hub, capsys):
    assert push(saved, hub) == 0
    assert f"hf://{REPO}" in capsys.readouterr().out
    files = hub.files(REPO)
    # The final files, byte for byte; training checkpoints stay at home.
    assert set(files) == {
        "crosscoder.json", "crosscoder.safetensors", "feature_stats.safetensors", "README.md"
    }  # fmt: skip
    for name in ("crosscoder.json", "crosscoder.safetensors", "feature_stats.safetensors"):
        assert files[name] == (saved / name).read_bytes()

    # The card's metadata passed the Hub's check and names the models, layers, partition
    # sizes, method and metrics.
    (meta,) = hub.validated
    assert meta["library_name"] == "modeldiff"
    assert meta["base_model"] == [MODELS["a"]["name"], MODELS["b"]["name"]]
    assert "dedicated-feature-crosscoder" in meta["tags"]
    card = meta["modeldiff"]
    assert card["architecture"] == "dfc" and card["method"] == "paper mode"
    assert card["partition"] == {"n_a_exclusive": 4, "n_b_exclusive": 2, "n_shared": 26,
                                 "n_designated": 0}  # fmt: skip
    assert card["models"]["a"]["layer"] == 15 and card["models"]["b"]["layer"] == 9
    assert card["k"] == 8
    readme = files["README.md"].decode()
    assert "| A | HuggingFaceTB/SmolLM2-135M-Instruct | 15 | 24 |" in readme
    assert "| FVE model B | 0.66 |" in readme
    assert "| A-exclusive | 4 (12.5%) |" in readme
    assert "data sources were not given" in readme

    # Loaded back through the Hub location, it is the same crosscoder.
    local, local_norm, _ = load_crosscoder(saved)
    remote, remote_norm, header = load_crosscoder(f"hf://{REPO}")
    assert remote_norm == local_norm and header["models"] == MODELS
    for name, tensor in local.state_dict().items():
        assert torch.equal(remote.state_dict()[name], tensor), name


@pytest.mark.slow
def test_a_pushed_tiny_run_is_analysed_from_the_hub(tmp_path, hub):
    """harvest -> train on tiny models, push with the store's data sources, then
    `modeldiff analyze --run hf://OWNER/NAME` analyses the run's own weights."""
    from engine.activations import ActivationStore
    from engine.config import CrosscoderConfig, HarvestConfig, TrainConfig
    from engine.crosscoder.training import train
    from engine.harvest.pipeline import harvest
    from engine.models.loading import load_model
    from engine.results import Database
    from tests.conftest import save_tiny_pair

    dirs = [str(d) for d in save_tiny_pair(tmp_path).values()]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river {i} runs past the stone." for i in range(40)))
    store = tmp_path / "store"
    cfg = HarvestConfig(sources=[str(text)], max_pairs=800, context_length=64,
                        store_dtype="float32")  # fmt: skip
    harvest(cfg, store, models=(load_model(dirs[0]), load_model(dirs[1])), progress=False)
    train(
        CrosscoderConfig(d_a=32, d_b=24, n_features=64, a_exclusive=8, b_exclusive=8),
        TrainConfig(steps=10, batch_size=64, k=4, k_initial=None, warmup_steps=2,
                    checkpoint_every=100, log_every=10, device="cpu"),
        ActivationStore(store), out_dir=tmp_path / "run", progress=False,
    )  # fmt: skip

    assert push(tmp_path / "run", hub, "--store", str(store)) == 0
    (meta,) = hub.validated
    assert meta["modeldiff"]["data_sources"] == [text.name]  # no local folder published
    assert f"- `{text.name}`" in hub.files(REPO)["README.md"].decode()

    db = tmp_path / "from-hub.duckdb"
    assert main(["analyze", "--run", f"hf://{REPO}", "--store", str(store), "--db", str(db),
                 "--quiet"]) == 0  # fmt: skip
    local, _, _ = load_crosscoder(tmp_path / "run")
    with Database(db, read_only=True, hold=False) as results:
        run = results.run("tiny-dfc")  # named after the repository
        assert Path(run["checkpoint_path"]).is_relative_to(hub.cache_dir)
        features = results.features("tiny-dfc")
    assert len(features) == 64
    expected = local.relative_decoder_norm().tolist()
    assert features["rel_norm"].tolist() == pytest.approx(expected, abs=1e-6)


def test_a_downloaded_run_loads_offline_and_revisions_pin_a_commit(saved, hub):
    assert push(saved, hub) == 0
    sha = hub.repos[REPO].branches["main"]
    folder = resolve_run(f"hf://{REPO}")
    assert folder.name == sha  # huggingface_hub's snapshots/<commit>/ layout
    assert resolve_run(f"hf://{REPO}@{sha}") == folder
    # --revision commits to a branch (created), which hf://OWNER/NAME@BRANCH reads.
    assert push(saved, hub, "--revision", "seed-1") == 0
    assert set(hub.files(REPO, "seed-1")) == set(hub.files(REPO))
    assert (resolve_run(f"hf://{REPO}@seed-1") / "crosscoder.json").is_file()

    hub.offline = True  # no network: the cached copy serves
    served = len(hub.requests)
    load_crosscoder(f"hf://{REPO}")
    assert len(hub.requests) > served  # it did try the network first
    with pytest.raises(HubError, match="not in the local cache"):
        resolve_run("hf://analyst/never-downloaded")


def test_hub_errors_name_the_fix_and_local_paths_never_reach_the_network(saved, hub, capsys):
    with pytest.raises(HubError, match="no model repository analyst/missing"):
        load_crosscoder("hf://analyst/missing")
    assert push(saved, hub) == 0
    with pytest.raises(HubError, match="has no revision 'v9'"):
        resolve_run(f"hf://{REPO}@v9")
    with pytest.raises(HubError, match="is not a modeldiff run"):
        resolve_run(f"hf://{REPO}/runs/a")

    # No network: a push says so on one line.
    hub.offline = True
    assert push(saved, hub) == 2
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err
    hub.offline = False
    # A wrong token cannot write.
    assert push(saved, hub, repo="analyst/other", token="bad") == 2
    assert "log in" in capsys.readouterr().err
    # A folder that is not a run is refused before anything is uploaded.
    hub.requests.clear()
    assert push(saved / "checkpoints", hub) == 2
    assert "no trained crosscoder" in capsys.readouterr().err
    # OWNER/NAME without hf:// is a local path, even when no such folder exists.
    with pytest.raises(CheckpointError, match="hf://OWNER/NAME"):
        load_crosscoder(REPO)
    assert hub.requests == []


def test_export_paper_takes_a_hub_run_and_the_import_keeps_its_models(tmp_path, hub):
    models = {side: {**spec, "d_model": 16} for side, spec in MODELS.items()}
    cc = Crosscoder(16, 16, Partition(2, 3, 27))
    save_crosscoder(tmp_path / "square", cc, Normalizer(0.25, 3.0), train_config={"k": 8},
                    models=models)  # fmt: skip
    assert push(tmp_path / "square", hub) == 0
    out = tmp_path / "paper"
    assert main(["export-paper", f"hf://{REPO}", "--out", str(out)]) == 0
    provenance = json.loads((out / "modeldiff.json").read_text())
    assert provenance["exported_from"] == f"hf://{REPO}"
    assert main(["import-paper", str(out), "--out", str(tmp_path / "back")]) == 0
    back, normalizer, header = load_crosscoder(tmp_path / "back")
    assert header["models"] == models and normalizer == Normalizer(0.25, 3.0)
    assert back.partition == cc.partition


def test_import_paper_reads_a_hub_repository_of_the_papers_files(tmp_path, hub):
    """A repository holding model.safetensors + config.json, as the paper's code's Hub
    mixin uploads them, imports by its hf:// location."""
    from huggingface_hub import HfApi

    cc = Crosscoder(16, 16, Partition(2, 3, 27))
    save_crosscoder(tmp_path / "square", cc, Normalizer.identity(), train_config={"k": 8})
    assert main(["export-paper", str(tmp_path / "square"), "--out", str(tmp_path / "p")]) == 0
    (tmp_path / "p" / "modeldiff.json").unlink()  # only the paper's own files
    api = HfApi(token=hub.token)
    api.create_repo("lab/paper-dfc")
    api.upload_folder(repo_id="lab/paper-dfc", folder_path=str(tmp_path / "p"))

    assert main(["import-paper", "hf://lab/paper-dfc", "--out", str(tmp_path / "run")]) == 0
    back, _, header = load_crosscoder(tmp_path / "run")
    assert header["imported"]["source"] == "hf://lab/paper-dfc"
    for name, tensor in cc.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_run_in_a_folder_of_a_repository_loads_by_its_path(saved, hub):
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    api.create_repo("lab/sweep")
    for seed in ("seed0", "seed1"):
        api.upload_folder(
            repo_id="lab/sweep", folder_path=str(saved), path_in_repo=f"runs/{seed}",
            ignore_patterns=["checkpoints/*"],
        )  # fmt: skip
    folder = resolve_run("hf://lab/sweep/runs/seed1")
    assert folder.parts[-2:] == ("runs", "seed1")
    assert not (folder.parent / "seed0").exists()  # only the folder asked for is downloaded
    assert run_name("hf://lab/sweep/runs/seed1") == "seed1"
    loaded, _, _ = load_crosscoder("hf://lab/sweep/runs/seed1")
    local, _, _ = load_crosscoder(saved)
    assert torch.equal(loaded.w_dec_a, local.w_dec_a)


# -- downloads: only a run's files, only from a run ---------------------------------------

BIG = "weights-of-something-else.bin"


def downloads(hub) -> set[str]:
    """The file names the fake Hub served."""
    return {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}


def test_only_the_runs_files_are_downloaded(saved, hub):
    from huggingface_hub import HfApi

    assert push(saved, hub) == 0
    api = HfApi(token=hub.token)
    api.upload_file(repo_id=REPO, path_in_repo=BIG, path_or_fileobj=b"x" * 4096)
    api.upload_file(repo_id=REPO, path_in_repo="checkpoints/step-1/model.safetensors",
                    path_or_fileobj=b"y" * 4096)  # fmt: skip
    hub.requests.clear()
    folder = resolve_run(f"hf://{REPO}")
    assert {p.name for p in folder.iterdir()} <= set(RUN_FILES)
    assert BIG not in downloads(hub) and "model.safetensors" not in downloads(hub)
    load_crosscoder(f"hf://{REPO}")  # and it is a complete run


def test_a_repository_that_is_not_a_run_is_refused_after_one_small_file(hub):
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    api.create_repo("someone/llm")
    api.upload_file(repo_id="someone/llm", path_in_repo=BIG, path_or_fileobj=b"x" * 4096)
    api.upload_file(repo_id="someone/llm", path_in_repo="config.json", path_or_fileobj=b"{}")
    hub.requests.clear()
    with pytest.raises(HubError, match="hf://someone/llm is not a modeldiff run"):
        load_crosscoder("hf://someone/llm")
    assert downloads(hub) == set()


# -- publishing: private by default, no local paths, no token on the command line ---------


def test_push_is_private_by_default_and_publishes_no_local_paths(tmp_path, hub):
    from engine.crosscoder.paper_format import import_paper
    from engine.hub import push_run

    home = tmp_path / "home" / "alice" / "secret-project"
    models = json.loads(json.dumps(MODELS))
    models["a"].update(name=str(home / "my-model"), source={"kind": "dir", "path": str(home)})
    cc = Crosscoder(24, 16, Partition(4, 2, 26))
    save_crosscoder(home / "run", cc, Normalizer(0.5, 2.0), train_config={"k": 8},
                    models=models)  # fmt: skip
    data = {"sources": [str(home / "chats.txt"), "demo:kjv"]}  # a store's "data" entry
    push_run(home / "run", REPO, data=data)
    assert hub.repos[REPO].private  # nothing is published by accident
    files = hub.files(REPO)
    published = b"".join(files.values()).decode(errors="replace")
    assert "alice" not in published and str(tmp_path) not in published
    header = json.loads(files["crosscoder.json"])
    assert header["models"]["a"]["name"] == "my-model"
    assert header["models"]["b"]["name"] == MODELS["b"]["name"]  # Hub ids stay
    assert "- `chats.txt`" in files["README.md"].decode()
    load_crosscoder(f"hf://{REPO}")  # still a complete run
    assert push(home / "run", hub, "--private") == 0  # the old flag still works (a no-op)

    # An imported run's source path is stripped too; --public publishes.
    square = Crosscoder(16, 16, Partition(2, 3, 27))  # the paper's format: equal widths
    save_crosscoder(home / "square", square, Normalizer.identity(), train_config={"k": 8})
    assert main(["export-paper", str(home / "square"), "--out", str(home / "paper")]) == 0
    import_paper(home / "paper", home / "imported")
    assert push(home / "imported", hub, "--public", repo="analyst/imported") == 0
    assert not hub.repos["analyst/imported"].private
    assert "alice" not in hub.files("analyst/imported")["crosscoder.json"].decode()


def test_push_refuses_a_token_on_the_command_line(saved, hub, capsys):
    hub.requests.clear()
    assert main(["push", str(saved), "--repo", REPO, "--token", hub.token]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_TOKEN" in err and "hf auth login" in err
    assert hub.requests == []
