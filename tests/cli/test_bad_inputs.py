"""Bad input to every `modeldiff` sub-command: one `error:` line, status 2, no traceback,
and nothing created or changed on disk.

The commands run as real processes on a small real results database (one run of 20
features, written through the engine's `Database`); typed export filters and the dashboard's
escaping are checked on the same database.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch

from engine.cli import is_loopback
from engine.crosscoder.pairs import save_pairs
from engine.results import Database, ResultsDBError
from engine.steering.stitching import Stitch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A valid training config for the fixture's 8-wide pairs.
TINY_TOML = """
[crosscoder]
n_features = 32
architecture = "dfc"

[train]
steps = 5
batch_size = 16
k = 2
k_initial = 4
device = "cpu"
"""
RUN = "r"
N_FEATURES = 20
DEAD = {3, 7}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with a results database, a pairs file, a SQLite file and a non-UTF-8 TOML."""
    root = tmp_path_factory.mktemp("bad")
    with Database(root / "r.duckdb") as db:
        db.add_run(
            RUN,
            model_a={"name": "a"},
            model_b={"name": "b"},
            architecture="dfc",
            n_features=N_FEATURES,
            partition={},
        )
        db.write_features(
            RUN,
            pd.DataFrame(
                {
                    "feature_id": range(N_FEATURES),
                    "partition": ["a_exclusive"] * 4 + ["shared"] * (N_FEATURES - 4),
                    "density": [0.01 * i for i in range(N_FEATURES)],
                    "dead": [i in DEAD for i in range(N_FEATURES)],
                }
            ),
        )
        for fid in range(4):  # explanations to score
            db.add_explanation(
                RUN, fid, explainer="offline:ngram-v1", prompt_version="v", explanation="tea"
            )
        db.add_explanation(  # corpus text that a spreadsheet would run as a formula
            RUN, 5, explainer="x", prompt_version="v", explanation='=HYPERLINK("http://x.example")'
        )
    save_pairs(root / "pairs.safetensors", torch.randn(64, 8), torch.randn(64, 8))
    eye, zero = torch.eye(8), torch.zeros(8)
    Stitch(eye, zero, eye.clone(), zero.clone(), 1.0, 1.0).save(root / "stitch.safetensors")
    con = sqlite3.connect(root / "other.sqlite")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    (root / "latin1.toml").write_bytes("[train]\n# Größe\nsteps = 10\n".encode("latin-1"))
    (root / "folder.duckdb").mkdir()
    # Damaged inputs: empty, random bytes, a safetensors file cut short, a folder for a file.
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.safetensors").write_bytes(bytes(range(256)) * 2)
    (root / "truncated.safetensors").write_bytes((root / "pairs.safetensors").read_bytes()[:200])
    (root / "dir.safetensors").mkdir()
    (root / "empty.toml").write_text("")
    (root / "binary.toml").write_bytes(bytes(range(128, 256)))
    (root / "tiny.toml").write_text(TINY_TOML)
    (root / "notes.txt").write_text("not a store, not a database")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n\n")
    (root / "blank.jsonl").write_text('{"text": ""}\n\n')
    (root / "no-text").mkdir()
    (root / "other-tool").mkdir()  # another tool's folder that happens to use a run's names
    (root / "other-tool" / "crosscoder.json").write_text('{"format": "another-tool"}')
    (root / "no-text" / "readme.md").write_text("not a .txt file")
    foreign = duckdb.connect(str(root / "foreign.duckdb"))
    foreign.execute("CREATE TABLE t (x INTEGER)")
    foreign.close()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def modeldiff(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`modeldiff ARGS` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env=ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


# (sub-command arguments, text the error line must contain); {root} is the fixture folder.
ANALYZE = ["analyze", "--run", "{root}/run", "--store", "{root}/store", "--db", "{root}/new.duckdb"]
EXPORT = ["export", "--db", "{root}/r.duckdb", "--what", "features", "--out", "{root}/f.csv"]
FT_EXPORT = [*EXPORT[:4], "feature_table", "--run-id", RUN, "--out", "{root}/ft.csv"]
TRAIN = ["train", "--pairs", "{root}/pairs.safetensors", "--out", "{root}/run-out"]
TINY = ["train", "--config", "{root}/tiny.toml", "--out", "{root}/run-out"]
DB = ["--db", "{root}/r.duckdb"]
STEER = ["steer", *DB, "--run-id", RUN, "--feature", "1", "--prompt", "x"]
EXCL = ["exclusivity", *DB, "--run-id", RUN, "--stitch", "{root}/stitch.safetensors"]
CASES = {
    "analyze --top-k -1": ([*ANALYZE, "--top-k", "-1"], "--top-k"),
    "analyze --top-k abc": ([*ANALYZE, "--top-k", "abc"], "--top-k"),
    "analyze --context-pairs 0": ([*ANALYZE, "--context-pairs", "0"], "--context-pairs"),
    "analyze --random -1": ([*ANALYZE, "--random", "-1"], "--random"),
    "analyze --run-id escaping": ([*ANALYZE, "--run-id", "x/../../escaped"], "run id"),
    "analyze --run-id ..": ([*ANALYZE, "--run-id", ".."], "run id"),
    "explain --run-id escaping": (
        ["explain", "--db", "{root}/r.duckdb", "--run-id", "x/../../escaped", "--batch"],
        "run id",
    ),
    "explain --limit 0": (
        ["explain", "--db", "{root}/r.duckdb", "--run-id", RUN, "--limit", "0"],
        "--limit",
    ),
    "harvest --max-pairs 0": (["harvest", "--out", "{root}/s", "--max-pairs", "0"], "--max-pairs"),
    "harvest --world-size 0": (["harvest", "--out", "{root}/s", "--world-size", "0"], "world"),
    "train --steps -5": ([*TRAIN, "--config", "demo", "--steps", "-5"], "--steps"),
    "train non-UTF-8 config": ([*TRAIN, "--config", "{root}/latin1.toml"], "UTF-8"),
    "steer --max-new-tokens 0": (
        [
            "steer",
            "--db",
            "{root}/r.duckdb",
            "--run-id",
            RUN,
            "--feature",
            "1",
            "--prompt",
            "x",
            "--max-new-tokens",
            "0",
        ],
        "--max-new-tokens",
    ),
    "steer, a 100,000-character prompt": (
        ["steer", *DB, "--run-id", RUN, "--feature", "1", "--prompt", "tea " * 25_000],
        "keep it under 20,000",
    ),
    "steer --max-new-tokens 100000": (
        [*STEER, "--max-new-tokens", "100000"],
        "max_new_tokens must be between 1 and 2,048",
    ),
    "exclusivity --max-new-tokens 100000": (
        [*EXCL, "--max-new-tokens", "100000"],
        "max_new_tokens must be between 1 and 2,048",
    ),
    "steer --alphas nan": (
        [
            "steer",
            "--db",
            "{root}/r.duckdb",
            "--run-id",
            RUN,
            "--feature",
            "1",
            "--prompt",
            "x",
            "--alphas",
            "nan",
        ],
        "--alphas",
    ),
    "stitch --holdout 1.5": (
        ["stitch", "--store", "{root}/store", "--out", "{root}/s.safetensors", "--holdout", "1.5"],
        "--holdout",
    ),
    "exclusivity --top 0": (
        ["exclusivity", "--db", "{root}/r.duckdb", "--run-id", RUN, "--stitch", "x", "--top", "0"],
        "--top",
    ),
    "dashboard --port 0": (["dashboard", "--db", "{root}/r.duckdb", "--port", "0"], "--port"),
    # A mistyped --db: only `analyze` creates a database file.
    "explain, no database": (
        ["explain", "--db", "{root}/typo.duckdb", "--run-id", RUN],
        "no results database",
    ),
    "score, no database": (
        ["score", "--db", "{root}/typo.duckdb", "--run-id", RUN],
        "no results database",
    ),
    "match, no database": (
        ["match", "--db", "{root}/typo.duckdb", "--run-id", RUN, "--other", "s"],
        "no results database",
    ),
    "steer, no database": (
        ["steer", "--db", "{root}/typo.duckdb", "--run-id", RUN, "--feature", "1", "--prompt", "x"],
        "no results database",
    ),
    "steer-eval, no database": (
        [
            "steer-eval",
            "--db",
            "{root}/typo.duckdb",
            "--run-id",
            RUN,
            "--stitch",
            "x",
            "--feature",
            "1",
            "--rubric",
            "china_alignment",
        ],
        "no results database",
    ),
    "export, no database": ([*EXPORT[:2], "{root}/typo.duckdb", *EXPORT[3:]], "no results"),
    # Files that are not a results database say what they are.
    "a SQLite file as --db": ([*EXPORT[:2], "{root}/other.sqlite", *EXPORT[3:]], "SQLite"),
    "a directory as --db": ([*EXPORT[:2], "{root}/folder.duckdb", *EXPORT[3:]], "directory"),
    "score, a directory as --db": (
        ["score", "--db", "{root}/folder.duckdb", "--run-id", RUN],
        "directory",
    ),
    # Export filters are typed, and an unknown run is not a header-only file.
    "export --where feature_id=abc": ([*EXPORT, "--where", "feature_id=abc"], "integer"),
    "export --where dead=maybe": ([*EXPORT, "--where", "dead=maybe"], "true or false"),
    "export feature_table --where limit=x": ([*FT_EXPORT, "--where", "limit=x"], "integer"),
    "export --where without =": ([*EXPORT, "--where", "dead"], "column=value"),
    "export --where run_id=nope": ([*EXPORT, "--where", "run_id=nope"], "unknown run 'nope'"),
    "export --where run_id and another --run-id": (
        [*EXPORT, "--run-id", RUN, "--where", "run_id=nope"],
        "differ",
    ),
    "export --where created_at=yesterday": (
        [*EXPORT[:4], "explanations", *EXPORT[5:], "--where", "created_at=yesterday"],
        "a date or time",
    ),
    "export --run-id no-such-run": ([*EXPORT, "--run-id", "no-such-run"], "unknown run"),
    "export feature_table --run-id no-such-run": (
        [*FT_EXPORT[:6], "no-such-run", *FT_EXPORT[7:]],
        "unknown run",
    ),
    # Training inputs: missing, empty, damaged or the wrong kind of file.
    "train --pairs missing": ([*TINY, "--pairs", "{root}/missing.safetensors"], "missing"),
    "train --pairs empty": ([*TINY, "--pairs", "{root}/empty.safetensors"], "empty"),
    "train --pairs random bytes": ([*TINY, "--pairs", "{root}/garbage.safetensors"], "garbage"),
    "train --pairs truncated": ([*TINY, "--pairs", "{root}/truncated.safetensors"], "truncated"),
    "train --pairs a directory": ([*TINY, "--pairs", "{root}/dir.safetensors"], "dir"),
    "train --config missing": ([*TRAIN, "--config", "{root}/missing.toml"], "not found"),
    "train --config binary": ([*TRAIN, "--config", "{root}/binary.toml"], "UTF-8"),
    "train --config empty (demo widths)": ([*TRAIN, "--config", "{root}/empty.toml"], "batch_size"),
    "train --preset unknown": ([*TRAIN, "--preset", "nope"], "unknown preset"),
    "train --batch-size 0": ([*TRAIN, "--config", "demo", "--batch-size", "0"], "--batch-size"),
    "train --steps abc": ([*TRAIN, "--config", "demo", "--steps", "abc"], "--steps"),
    "train --store missing": (
        ["train", "--store", "{root}/nostore", "--config", "demo", "--out", "{root}/o"],
        "not an activation store",
    ),
    "train --store a file": (
        ["train", "--store", "{root}/notes.txt", "--config", "demo", "--out", "{root}/o"],
        "not an activation store",
    ),
    "train pairs of other models than the preset's": ([*TRAIN, "--config", "demo"], "width 8"),
    "train --fresh into another tool's folder": (
        [*TINY[:3], *TRAIN[1:3], "--out", "{root}/other-tool", "--fresh"],
        "not a training run directory",
    ),
    "train --out a file": ([*TINY[:3], *TRAIN[1:3], "--out", "{root}/notes.txt"], "notes.txt"),
    # Unknown runs and features, runs without a crosscoder, foreign files as --db.
    "explain unknown run": (["explain", *DB, "--run-id", "nope"], "unknown run"),
    "score unknown run": (["score", *DB, "--run-id", "nope"], "unknown run"),
    "steer unknown run": (
        ["steer", *DB, "--run-id", "nope", "--feature", "1", "--prompt", "x"],
        "unknown run",
    ),
    "steer unknown feature": (
        ["steer", *DB, "--run-id", RUN, "--feature", "999", "--prompt", "x"],
        "no feature 999",
    ),
    "steer --feature -1": (
        ["steer", *DB, "--run-id", RUN, "--feature", "-1", "--prompt", "x"],
        "--feature",
    ),
    "match, a run without a crosscoder": (
        ["match", *DB, "--run-id", RUN, "--other", RUN],
        "no crosscoder directory",
    ),
    "match unknown other run": (["match", *DB, "--run-id", RUN, "--other", "nope"], "unknown run"),
    "export --what unknown": ([*EXPORT[:3], "--what", "nope", "--out", "{root}/f.csv"], "nope"),
    "export --where unknown column": ([*EXPORT, "--where", "nope=1"], "no column"),
    "export, a foreign DuckDB file": (
        [*EXPORT[:2], "{root}/foreign.duckdb", *EXPORT[3:]],
        "not a modeldiff results database",
    ),
    "score, a foreign DuckDB file": (
        ["score", "--db", "{root}/foreign.duckdb", "--run-id", RUN],
        "not a modeldiff results database",
    ),
    "export, a text file as --db": (
        [*EXPORT[:2], "{root}/notes.txt", *EXPORT[3:]],
        "not a valid DuckDB database",
    ),
    "dashboard, no database": (["dashboard", "--db", "{root}/typo.duckdb"], "no results database"),
    "exclusivity --stitch missing": (
        ["exclusivity", *DB, "--run-id", RUN, "--stitch", "{root}/missing.safetensors"],
        "no stitch file",
    ),
    "exclusivity --stitch random bytes": (
        ["exclusivity", *DB, "--run-id", RUN, "--stitch", "{root}/garbage.safetensors"],
        "not a safetensors file",
    ),
    # Harvest settings, checked before any model loads.
    "harvest --context-length 0": (
        ["harvest", "--out", "{root}/s", "--context-length", "0"],
        "--context-length",
    ),
    "harvest --batch-tokens -1": (
        ["harvest", "--out", "{root}/s", "--batch-tokens", "-1"],
        "--batch-tokens",
    ),
    "harvest --sources missing": (
        ["harvest", "--out", "{root}/s", "--sources", "{root}/missing.txt"],
        "does not exist",
    ),
    # Sources without text fail before a model loads or a store is written.
    "harvest --sources an empty file": (
        ["harvest", "--out", "{root}/s", "--sources", "{root}/empty.txt"],
        "holds no text",
    ),
    "harvest --sources blank lines": (
        ["harvest", "--out", "{root}/s", "--sources", "{root}/blank.txt"],
        "holds no text",
    ),
    "harvest --sources records without text": (
        ["harvest", "--out", "{root}/s", "--sources", "{root}/blank.jsonl"],
        "holds no text",
    ),
    "harvest --sources a folder without .txt files": (
        ["harvest", "--out", "{root}/s", "--sources", "{root}/no-text"],
        "no .txt files",
    ),
    "harvest --weights for other sources": (
        ["harvest", "--out", "{root}/s", "--sources", "demo:kjv", "--weights", "0.5", "0.5"],
        "2 weights for 1 sources",
    ),
    "harvest --out a file": (["harvest", "--out", "{root}/notes.txt"], "is a file"),
    "stitch --store missing": (
        ["stitch", "--store", "{root}/nostore", "--out", "{root}/s.safetensors"],
        "not an activation store",
    ),
    # Benchmarks: a bad setting fails before anything is written.
    "planted --strengths -1": (
        ["planted", "--store", "{root}/nostore", "--out", "{root}/p", "--strengths", "-1"],
        "strengths",
    ),
    "planted --rates 2": (
        ["planted", "--store", "{root}/nostore", "--out", "{root}/p", "--rates", "2"],
        "rates",
    ),
    "planted --store missing": (
        ["planted", "--store", "{root}/nostore", "--out", "{root}/p"],
        "no activation store",
    ),
    "planted unknown variant setting": (
        ["planted", "--store", "{root}/nostore", "--out", "{root}/p", "--variants", "x:nope=1"],
        "unknown setting",
    ),
    "toy --sizes 0": (["toy", "--out", "{root}/t", "--sizes", "0"], "sizes"),
    "toy --seeds abc": (["toy", "--out", "{root}/t", "--seeds", "abc"], "--seeds"),
    "toy --steps -1": (["toy", "--out", "{root}/t", "--steps", "-1"], "steps"),
    "toy --recycle-after 0": (
        ["toy", "--out", "{root}/t", "--recycle-after", "0"],
        "recycle_after_windows",
    ),
    "toy --late-lean 0.5": (
        ["toy", "--out", "{root}/t", "--late-lean", "0.5"],
        "late_lean",
    ),
}


# The pipeline's commands (they load models or data) and the rest: two classes, so that
# parallel test workers, which take a class as one unit, share the cases out.
PIPELINE = ("harvest", "train", "toy", "planted", "analyze")


def _cases(pipeline: bool) -> list[str]:
    return [n for n in CASES if (n.split()[0].rstrip(",") in PIPELINE) == pipeline]


class TestPipelineCommands:
    @pytest.mark.parametrize("name", _cases(pipeline=True))
    def test_bad_input_is_one_error_line_and_changes_nothing(self, root, name):
        check_bad_input(root, name)


class TestResultsCommands:
    @pytest.mark.parametrize("name", _cases(pipeline=False))
    def test_bad_input_is_one_error_line_and_changes_nothing(self, root, name):
        check_bad_input(root, name)


def check_bad_input(root: Path, name: str) -> None:
    """One `error:` line naming the problem, status 2, and nothing on disk changed."""
    args, needle = CASES[name]
    before = snapshot(root)
    result = modeldiff(*(a.format(root=root) for a in args), cwd=root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert snapshot(root) == before  # no file created (a database, a ledger) or changed
    assert not (root.parent / "escaped").exists()


# -- paid Claude requests without consent -----------------------------------------------

# A key is set but nothing answers the cost prompt (no terminal, stdin closed): each refuses
# before sending anything.
# The API address is a closed local port, so a request that slipped through fails there.
PAID = {
    "explain --explainer anthropic": ["explain", *DB, "--run-id", RUN, "--explainer", "anthropic"],
    "score --judge anthropic": ["score", *DB, "--run-id", RUN, "--judge", "anthropic"],
    "exclusivity --judge anthropic": [
        "exclusivity", *DB, "--run-id", RUN, "--stitch", "{root}/stitch.safetensors",
        "--judge", "anthropic",
    ],
    "exclusivity --protocol figure5 --judge anthropic": [
        "exclusivity", *DB, "--run-id", RUN, "--stitch", "{root}/stitch.safetensors",
        "--judge", "anthropic", "--protocol", "figure5", "--per-category", "1",
    ],
    "steer-eval --judge anthropic": [
        "steer-eval", *DB, "--run-id", RUN, "--stitch", "{root}/stitch.safetensors",
        "--feature", "1", "--rubric", "harmless_refusal", "--judge", "anthropic",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(PAID))
def test_paid_requests_without_consent_send_nothing(root, name):
    pytest.importorskip("anthropic")
    env = {**ENV, "ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    before = snapshot(root)
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", *(a.format(root=root) for a in PAID[name])],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "consent" in lines[0] and "--yes" in lines[0] and "--max-cost" in lines[0]
    assert "claude-" in result.stdout and "$" in result.stdout  # the estimate came first
    assert snapshot(root) == before


# -- typed export filters ----------------------------------------------------------------


def export(root: Path, tmp_path: Path, *args: str) -> pd.DataFrame:
    """`modeldiff export ARGS` in this process, read back."""
    from engine.cli import main

    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.csv"  # a new file each time
    assert main(["export", "--db", str(root / "r.duckdb"), "--out", str(out), *args]) == 0
    return pd.read_csv(out)


def test_export_filters_have_their_types(root, tmp_path):
    ft = ["--what", "feature_table", "--run-id", RUN]
    live = export(root, tmp_path, *ft, "--where", "dead=false")
    assert set(live["feature_id"]) == set(range(N_FEATURES)) - DEAD
    assert set(export(root, tmp_path, *ft, "--where", "dead=true")["feature_id"]) == DEAD
    assert list(export(root, tmp_path, *ft, "--where", "feature_ids=14")["feature_id"]) == [14]
    assert list(export(root, tmp_path, *ft, "--where", "feature_ids=1,4")["feature_id"]) == [1, 4]
    page = [*ft, "--where", "order_by=density", "limit=3"]
    assert list(export(root, tmp_path, *page, "descending=false")["feature_id"]) == [0, 1, 2]
    assert list(export(root, tmp_path, *page, "descending=true")["feature_id"]) == [19, 18, 17]
    # A table's columns take their database type.
    rows = export(root, tmp_path, "--what", "features", "--where", "dead=false", "feature_id=14")
    assert list(rows["feature_id"]) == [14]
    assert export(root, tmp_path, "--what", "features", "--where", "dead=0").shape[0] == 18


def test_csv_exports_write_formulas_as_text_and_filter_times_as_times(root, tmp_path):
    rows = export(root, tmp_path, "--what", "explanations")
    cells = dict(zip(rows["feature_id"], rows["explanation"], strict=True))
    assert cells[5] == '\'=HYPERLINK("http://x.example")' and cells[0] == "tea"
    assert export(root, tmp_path, "--what", "features", "--where", "feature_id=1")[
        "density"
    ].tolist() == [0.01]  # numbers are untouched
    assert len(export(root, tmp_path, "--what", "explanations", "--where", "run_id=r")) == 5
    old = export(root, tmp_path, "--what", "explanations", "--where", "created_at=2020-01-01")
    assert old.empty
    with Database(root / "r.duckdb", read_only=True) as db:
        assert isinstance(
            db.parse_filters("explanations", {"created_at": "2026-12-07"})["created_at"], datetime
        )


def test_export_replaces_only_an_earlier_export(root, tmp_path):
    from engine.cli import main

    theirs = tmp_path / "thesis.csv"
    theirs.write_text("chapter,words\n1,5000\n")
    args = ["export", "--db", str(root / "r.duckdb"), "--what", "features", "--out"]
    assert main([*args, str(theirs)]) == 2
    assert theirs.read_text() == "chapter,words\n1,5000\n"
    for name in ("f.csv", "f.parquet"):
        ours = tmp_path / name
        assert main([*args, str(ours)]) == 0
        assert main([*args, str(ours), "--where", "dead=true"]) == 0  # an export: replaced
        assert len(pd.read_csv(ours) if name.endswith("csv") else pd.read_parquet(ours)) == 2
    (tmp_path / "data.parquet").write_bytes(b"PAR1 not ours")
    assert main([*args, str(tmp_path / "data.parquet")]) == 2


def test_the_api_refuses_run_ids_that_are_not_file_name_safe(tmp_path):
    with Database(tmp_path / "x.duckdb") as db:
        for bad in ("x/../../escaped", "..", ".", "", "a b", "run\n"):
            with pytest.raises(ResultsDBError, match="run id"):
                db.add_run(bad, model_a={}, model_b={}, architecture="dfc", n_features=1,
                           partition={})  # fmt: skip
        db.add_run("seed-1.v2_ok", model_a={}, model_b={}, architecture="dfc", n_features=1,
                   partition={})  # fmt: skip


# -- the dashboard -----------------------------------------------------------------------


def test_dashboard_binds_this_machine_and_warns_about_other_hosts(root):
    import tomllib

    config = tomllib.loads((Path(__file__).parents[2] / ".streamlit/config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["fileWatcherType"] == "none"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_untrusted_names_are_escaped_for_markdown_and_spreadsheets():
    from dashboard.markdown import md, md_code
    from dashboard.views.common import report_csv, report_markdown

    image = "![x](https://attacker.example/t.png)"
    assert "![" not in md(image) and "](" not in md(image)  # no image or link syntax left
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``"
    rows = pd.DataFrame(
        {
            "feature_id": [1],
            "partition": ["a_exclusive"],
            "explanation": ['=HYPERLINK("https://attacker.example")'],
            "notes": [f"see {image}"],
            "reviewer": ["@admin"],
            "score": [-0.5],
        }
    )
    csv = report_csv(rows)
    assert "'=HYPERLINK" in csv and "'@admin" in csv and ",-0.5" in csv
    lines = report_markdown(f"run`{image}", rows, {}).splitlines()
    assert lines[0] == f"# modeldiff audit report: run ``run`{image}``"  # a code span
    notes = next(line for line in lines if line.startswith("- **Notes:**"))
    assert "![" not in notes and "](" not in notes
