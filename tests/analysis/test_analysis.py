"""Analysis on a hand-built crosscoder with planted features, run matching, and the CLI chain
analyze -> explain -> score into a real DuckDB file."""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import torch

from engine.activations import ActivationStore, StoreWriter
from engine.activations.shards import WindowRecord
from engine.analysis.analyze import analyze
from engine.analysis.examples import ExampleConfig, choose, read_examples
from engine.analysis.geometry import match_runs, neighbors
from engine.analysis.scan import EntryCache, ScanConfig, scan
from engine.crosscoder.checkpoint import save_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.partition import Partition
from engine.results import Database

D_A, D_B = 8, 6
WORDS = ["tea", "coffee", "bomb", "river", "stone", "cloud", "paper", "lamp", "door", "bird"]
PLANTED = {"tea": 1, "coffee": 1, "bomb": 4}  # word -> feature it drives


def planted_crosscoder() -> Crosscoder:
    """DFC with 2 A-exclusive, 1 B-exclusive and 3 shared features reading one-hot inputs.

    Feature f reads coordinate f of model A (when it owns A rows) and of B; its activation is
    the value planted there. Decoders are one-hot too, with distinct directions.
    """
    cc = Crosscoder(D_A, D_B, Partition(n_a_exclusive=2, n_b_exclusive=1, n_shared=3))
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        # A rows: [A-excl 0, 1 | shared 3, 4, 5]; B rows: [B-excl 2 | shared 3, 4, 5].
        for row, feature in enumerate([0, 1, 3, 4, 5]):
            cc.w_enc_a[row, feature] = 1.0
            cc.w_dec_a[row, feature] = 1.0
        for row, feature in enumerate([2, 3, 4, 5]):
            cc.w_enc_b[row, feature] = 1.0
            cc.w_dec_b[row, feature] = 1.0
        cc.threshold.fill_(1e-6)
    return cc


def make_store(
    path, n_windows: int = 60, pairs: int = 40, seed: int = 0, models=None, noise: float = 0.0
):
    """Windows of words; a planted word puts its activation on its feature's coordinates.
    `models` replaces the header's model records (which name no models); `noise` adds
    Gaussian noise of that scale to every activation of both models.

    Returns {(feature, window, pair): activation} of every planted activation.
    """
    rng = np.random.default_rng(seed)
    models = models or {"a": {"d_model": D_A}, "b": {"d_model": D_B}}
    header = {"models": models, "data": {}}
    writer = StoreWriter(path, header, dtype="float32", shard_pairs=500)
    truth = {}
    for w in range(n_windows):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), pairs)]
        text = " ".join(words)
        ends = np.cumsum([len(x) + (i > 0) for i, x in enumerate(words)])
        spans = np.stack([np.r_[0, ends[:-1]], ends], 1)
        x_a, x_b = torch.zeros(pairs, D_A), torch.zeros(pairs, D_B)
        for p, word in enumerate(words):
            if word in PLANTED:
                f = PLANTED[word]
                act = float(rng.uniform(0.5, 5.0))
                # Model A carries it (a shared feature sums both models' contributions).
                x_a[p, f] = act
                truth[(f, w, p)] = act
        if noise:
            x_a += noise * torch.from_numpy(rng.standard_normal((pairs, D_A))).float()
            x_b += noise * torch.from_numpy(rng.standard_normal((pairs, D_B))).float()
        ids = np.arange(pairs + 1)
        offsets = np.concatenate([[[0, 0]], spans])
        rec = WindowRecord(
            w,
            f"doc{w}",
            "unit",
            0,
            text,
            ids,
            offsets,
            ids,
            offsets,
            np.arange(1, pairs + 1),
            np.arange(1, pairs + 1),
            spans,
        )
        writer.add(rec, x_a, x_b)
    writer.close(complete=True)
    return truth


def brute_force_segments(truth, feature: int, size: int):
    """(value, window, segment start) of every segment where `feature` is active, best first."""
    best: dict[tuple[int, int], float] = {}
    for (f, w, p), act in truth.items():
        if f == feature:
            key = (w, (p // size) * size)
            best[key] = max(best.get(key, 0.0), act)
    return sorted(((v, w, s) for (w, s), v in best.items()), reverse=True)


@pytest.fixture
def planted(tmp_path):
    truth = make_store(tmp_path / "store")
    cc = planted_crosscoder()
    save_crosscoder(
        tmp_path / "run",
        cc,
        Normalizer.identity(),
        crosscoder_config={},
        train_config={},
        metrics={},
    )
    return tmp_path, truth, cc


def test_scan_counts_and_top_contexts_are_the_true_ones(planted):
    tmp_path, truth, cc = planted
    store = ActivationStore(tmp_path / "store")
    cfg = ScanConfig(top_k=5, segment_pairs=8, sample_active=256)
    result = scan(cc, Normalizer.identity(), store, cfg, progress=False)
    assert result.n_pairs == 60 * 40
    for feature in (1, 4):
        acts = [a for (f, _, _), a in truth.items() if f == feature]
        assert result.n_active[feature] == len(acts)
        assert result.max_act[feature] == pytest.approx(max(acts))
        assert result.sum_act[feature] == pytest.approx(sum(acts), rel=1e-5)
        assert result.hist[feature].sum() == len(acts)
        expected = brute_force_segments(truth, feature, 8)[:5]
        got = [
            (float(v), result.segments.window[s], result.segments.start[s])
            for v, s in zip(result.top_val[feature], result.top_seg[feature], strict=True)
        ]
        assert [(w, s) for _, w, s in got] == [(w, s) for _, w, s in expected]
        assert [v for v, _, _ in got] == pytest.approx([v for v, _, _ in expected])
    # Features no word drives never fire.
    assert result.n_active[0] == 0 and result.n_active[5] == 0


def test_examples_quantiles_and_random_contexts(planted):
    tmp_path, truth, cc = planted
    store = ActivationStore(tmp_path / "store")
    result = scan(
        cc,
        Normalizer.identity(),
        store,
        ScanConfig(top_k=3, segment_pairs=8, sample_active=1000),
        progress=False,
    )
    choices = choose(result, ExampleConfig(n_quantiles=4, per_quantile=2, n_random=5))
    contexts, windows = read_examples(
        cc, Normalizer.identity(), store, result, choices, progress=False
    )
    four = contexts[contexts.feature_id == 4]
    segs = brute_force_segments(truth, 4, 8)
    # Top contexts carry the feature's true activation on every span of their segment.
    for row in four[four.kind == "top"].itertuples():
        for i, act in enumerate(row.acts):
            assert act == pytest.approx(truth.get((4, row.window_id, row.span_start + i), 0.0))
    # Quantile bins partition the active segments (all of them sampled here) by rank.
    ranked = sorted(segs)  # ascending
    rest = [
        x
        for x in ranked
        if (x[1], x[2])
        not in {(r.window_id, r.span_start) for r in four[four.kind == "top"].itertuples()}
    ]
    bins = np.array_split(np.arange(len(rest)), 4)
    for row in four[four.kind == "quantile"].itertuples():
        lo, hi = rest[bins[int(row.quantile)][0]][0], rest[bins[int(row.quantile)][-1]][0]
        assert lo - 1e-5 <= row.max_act <= hi + 1e-5
    assert set(four["quantile"].dropna().astype(int)) == {0, 1, 2, 3}
    # Random contexts are segments where the feature is silent.
    random = four[four.kind == "random"]
    assert len(random) == 5 and (random.max_act == 0).all()
    for row in random.itertuples():
        assert not any(
            w == row.window_id and row.span_start <= p < row.span_end
            for (f, w, p) in truth
            if f == 4
        )
    assert set(contexts.window_id) <= set(windows.window_id)
    # Reading the examples from the scan's on-disk entries gives the same table.
    cache = EntryCache(tmp_path / "cache")
    again = scan(
        cc,
        Normalizer.identity(),
        store,
        ScanConfig(top_k=3, segment_pairs=8, sample_active=1000),
        progress=False,
        cache=cache,
    )
    assert cache.shards == set(range(len(store.shards)))
    cached, _ = read_examples(
        cc,
        Normalizer.identity(),
        store,
        again,
        choose(again, ExampleConfig(n_quantiles=4, per_quantile=2, n_random=5)),
        progress=False,
        cache=cache,
    )
    assert cached.drop(columns="acts").equals(contexts.drop(columns="acts"))
    assert all(np.allclose(x, y) for x, y in zip(cached.acts, contexts.acts, strict=True))


def test_analyze_writes_everything_to_duckdb(planted):
    tmp_path, _, _ = planted
    db_path = tmp_path / "results.duckdb"
    result = analyze(
        tmp_path / "run",
        tmp_path / "store",
        db_path,
        run_id="planted",
        scan_cfg=ScanConfig(top_k=5, segment_pairs=8),
        progress=False,
    )
    assert result.n_pairs == 2400 and result.n_features == 6
    with Database(db_path, read_only=True) as db:
        features = db.features("planted")
        assert list(features.partition) == ["a_exclusive"] * 2 + ["b_exclusive"] + ["shared"] * 3
        assert features.dead.tolist() == [True, False, True, True, False, True]
        assert np.isnan(features.dec_norm_b[0]) and np.isnan(features.dec_norm_a[2])
        contexts = db.contexts("planted", 1, "top")
        assert len(contexts) == 5
        best = contexts[0].segment()
        hot = [piece for piece, act in best.pieces() if act > 0]
        assert hot and all(p.strip() in ("tea", "coffee") for p in hot)
    con = duckdb.connect(str(db_path), read_only=True)
    assert con.execute("SELECT count(*) FROM features WHERE run_id = 'planted'").fetchone() == (6,)


def test_neighbors_and_run_matching_find_a_permuted_copy():
    torch.manual_seed(0)
    cc = Crosscoder(12, 10, Partition(n_a_exclusive=5, n_b_exclusive=5, n_shared=30))
    near = neighbors(cc, k=3)
    assert set(near.space) == {"a", "b"} and (near.feature_id != near.neighbor_id).all()
    # A copy with the features of each partition shuffled.
    perm = torch.cat([torch.randperm(5), 5 + torch.randperm(5), 10 + torch.randperm(30)])
    other = Crosscoder(12, 10, cc.partition)
    state = cc.state_dict()
    inv = torch.argsort(perm)
    rows_a = torch.nonzero(cc.rows_in_a >= 0).flatten()
    rows_b = torch.nonzero(cc.rows_in_b >= 0).flatten()
    new = dict(state)
    for name, rows, key in (("w_dec_a", rows_a, "rows_in_a"), ("w_dec_b", rows_b, "rows_in_b")):
        table = state[name]
        mapped = getattr(cc, key)
        new[name] = torch.stack([table[mapped[perm[f]]] for f in rows.tolist()])
    other.load_state_dict(new)
    table = match_runs(cc, other)
    assert (table.other_feature_id.to_numpy() == inv.numpy()).all()
    assert np.allclose(table.cosine, 1.0, atol=1e-5)
    assert (table.partition == table.other_partition).all()


def test_cli_analyze_explain_score_chain(planted):
    tmp_path, _, _ = planted
    db = tmp_path / "r.duckdb"

    def run(*args):
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", *args, "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "6 features" in run(
        "analyze",
        "--run",
        str(tmp_path / "run"),
        "--store",
        str(tmp_path / "store"),
        "--db",
        str(db),
        "--run-id",
        "p",
        "--context-pairs",
        "8",
    )
    assert "2 explained" in run("explain", "--db", str(db), "--run-id", "p")
    assert "2 already done" in run("explain", "--db", str(db), "--run-id", "p")
    assert "2 scored" in run("score", "--db", str(db), "--run-id", "p")
    with Database(db, read_only=True) as store:
        table = store.feature_table("p")
        tea = table[table.feature_id == 1].iloc[0]
        assert "tea" in tea.explanation or "coffee" in tea.explanation
        bomb = table[table.feature_id == 4].iloc[0]
        assert bool(bomb.harmful) and bomb.score >= 0.8
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    keyless = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "explain",
            "--db",
            str(db),
            "--run-id",
            "p",
            "--explainer",
            "anthropic",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert keyless.returncode == 2 and "ANTHROPIC_API_KEY" in keyless.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "engine.cli", "explain", "--db", str(db), "--run-id", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
