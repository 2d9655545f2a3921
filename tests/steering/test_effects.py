"""The judge-free effect measure on the tiny real models: matched KL, a planted direction
that transfers scores above random directions, the same numbers twice, and the null
measured once and reused from the results DB."""

from __future__ import annotations

import json

import pytest
import torch

from engine.steering.effects.measure import EffectsConfig, rank_correlation
from engine.steering.effects.null import random_directions, standing
from engine.steering.effects.session import EffectSession
from engine.steering.stitching import Stitch

# Small settings: two prompts, a short search; the tiny random models move little.
CFG = EffectsConfig(
    budget=0.004, prompts=("I think that", "It was a"), panel=4, candidates=50, nulls=6,
)  # fmt: skip


@pytest.fixture(scope="module")
def planted(tiny_pair):
    """The tiny Llama as both "models", and a stitch that carries one planted direction
    over unchanged and maps everything orthogonal to it at random: the planted direction
    transfers, random directions mostly do not."""
    a, _ = tiny_pair
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(32, generator=gen)
    unit = d / d.norm()
    rotate = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    w = torch.outer(unit, unit) + rotate @ (torch.eye(32) - torch.outer(unit, unit))
    stitch = Stitch(w, torch.zeros(32), w.T, torch.zeros(32), 1.0, 1.0)
    assert torch.allclose(stitch.map(d, "a"), d, atol=1e-4)
    sample = {m: torch.randn(400, 32, generator=gen) for m in ("a", "b")}
    return {"a": a, "b": a}, stitch, sample, d


def session(planted, cfg=CFG) -> EffectSession:
    models, stitch, sample, _ = planted
    return EffectSession(models, {"a": 1, "b": 1}, stitch, cfg, sample)


def test_iso_kl_reaches_the_budget_in_both_models(planted):
    s = session(planted)
    probe = s.probes["a"]
    found = probe.iso_kl(planted[3], CFG.budget, CFG.grid, CFG.rounds)
    assert found.reached and found.kl == pytest.approx(CFG.budget, rel=0.05)
    assert probe.kl(planted[3], found.coef) == pytest.approx(found.kl, rel=1e-5)
    assert probe.kl(planted[3], 2 * found.coef) > CFG.budget > probe.kl(planted[3], found.coef / 2)


def test_a_planted_direction_that_transfers_scores_above_random_directions(planted):
    s = session(planted)
    effect = s.measure(planted[3], "a", targets=(" river stone",))
    null = s.null("a")
    assert effect.strings[0] == " river stone" and effect.origins[0] == "target"
    # Both sides react alike to the planted direction: the same coefficient, the same
    # changes; random directions, rotated by the stitch, do not.
    assert effect.coefficients["a"] == pytest.approx(effect.coefficients["b"], rel=1e-4)
    assert effect.similarity > 0.99 > max(e.similarity for e in null)
    assert effect.percentile == 0.0 and effect.z < -1.5  # less exclusive than every one
    assert effect.null_n == CFG.nulls and set(effect.changes) == {"a", "b"}


def test_two_measurements_give_identical_numbers(planted):
    first = session(planted).measure(planted[3], "a")
    second = session(planted).measure(planted[3], "a")
    assert json.dumps(first.to_json(), sort_keys=True) == json.dumps(
        second.to_json(), sort_keys=True
    )


def test_null_directions_follow_the_activation_covariance():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 1.0, 0.1])
    sample = torch.randn(5000, 3, generator=gen) * scales
    directions = random_directions(sample, 2000, seed=3)
    assert torch.allclose(directions.std(0), scales, rtol=0.1)
    assert torch.equal(directions, random_directions(sample, 2000, seed=3))
    # A lower power flattens the spread: 0.5 gives the square root of the scales, 0 none.
    flatter = random_directions(sample, 2000, seed=3, power=0.5)
    assert torch.allclose(flatter.std(0), scales.sqrt(), rtol=0.1)
    assert torch.allclose(random_directions(sample, 2000, seed=3, power=0.0).std(0),
                          torch.ones(3), rtol=0.1)  # fmt: skip


def test_standing_and_rank_correlation():
    z, pct = standing(3.0, [1.0, 2.0, 3.0, 4.0])
    assert pct == pytest.approx(62.5) and z == pytest.approx((3.0 - 2.5) / 1.2909944, rel=1e-5)
    assert standing(1.0, []) == (None, None)
    assert rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) == 0.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from engine import stages
    from tests.tiny_run import build_tiny_run

    tmp = tmp_path_factory.mktemp("effects")
    run = build_tiny_run(tmp)
    _, path = stages.fit_stitch(run.store, tmp / "stitch.safetensors", steps=0, seed=0)
    return run, path


@pytest.mark.slow
def test_run_measure_stores_features_and_computes_the_null_once(tiny_run, monkeypatch):
    from engine.results import Database
    from engine.steering.effects import run as effects_run
    from engine.steering.effects import session as effects_session
    from engine.steering.effects.run import measure_feature, measure_features
    from engine.steering.pair import SteeringPair

    run, stitch = tiny_run
    calls = []
    real = effects_session.measure_vectors

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(effects_session, "measure_vectors", counted)
    with Database(run.db) as db:
        table = db.features(run.run_id, dead=False)
        live = table[table["s_max"].fillna(0) > 0]["feature_id"].astype(int).tolist()[:2]
        pair = SteeringPair.open(db, run.run_id, stitch)
        got = measure_features(db, run.run_id, pair, live[:1], CFG)
        assert len(calls) == 2 * CFG.nulls + 1  # the null of both models, then the feature
        stored = db.effects(run.run_id)
        assert (stored["kind"] == "null").sum() == 2 * CFG.nulls
        assert stored.loc[stored["kind"] == "feature", "z"].notna().all()
        assert got[0][1].null_n == CFG.nulls
        # A second feature reuses the stored null; a stored feature is not measured again.
        calls.clear()
        measure_features(db, run.run_id, pair, live, CFG)
        assert len(calls) == 1
        # The one-call form for other code: a raw direction, read against the same null.
        calls.clear()
        effect = measure_feature(
            db, run.run_id, stitch, direction=torch.ones(32), source="a", cfg=CFG, pair=pair,
            targets=("the river",),
        )  # fmt: skip
        assert len(calls) == 1 and effect.z is not None and "the river" in effect.strings
        assert effects_run.latest(db.effects(run.run_id))["kind"].value_counts()["null"] == 12


def test_replayed_prefix_gives_what_steering_the_whole_model_gives(tiny_pair):
    """The probe runs only the blocks after the layer on a steered pass; the log-
    probabilities must equal a full forward pass with the steering hook (Gemma's sliding
    window included)."""
    from engine.models.tokenizers import load_tokenizer
    from engine.steering.effects.probe import Probe
    from engine.steering.steer import steering
    from tests.conftest import tiny_gemma, wrap

    tok = load_tokenizer("gemma3")
    models = (tiny_pair[0], wrap(tiny_gemma(tok, sliding_window=4), tok, "gemma-window-4"))
    for loaded in models:
        probe = Probe(loaded, 1, ("I think that it was", "One"))
        d = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(0))
        got = probe.next_tokens(d, [0.5, 2.0])
        ids, mask = probe._pad(probe._ids)
        last = torch.tensor([len(i) - 1 for i in probe._ids])
        for coef, mine in zip([0.5, 2.0], got, strict=True):
            delta = (coef * d / d.norm())[None].expand(len(probe._ids), -1)
            with torch.inference_mode(), steering(loaded.model, 1, delta):
                logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref = torch.log_softmax(logits.float()[torch.arange(len(last)), last], -1)
            assert torch.allclose(mine, ref, atol=1e-5)
        # A string of several tokens: the first from the next-token distribution, the rest
        # teacher-forced.
        text = " the river runs"
        tail = loaded.tokenizer.encode(text, add_special_tokens=False)
        want = []
        for p in probe._ids:
            row = torch.tensor([p + tail])
            with torch.inference_mode(), steering(loaded.model, 1, (2.0 * d / d.norm())[None]):
                lp = torch.log_softmax(loaded.model(input_ids=row, use_cache=False).logits[0], -1)
            want.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(tail)))
        assert len(tail) > 1
        assert float(probe.string_logprobs([text], d, 2.0)[0]) == pytest.approx(
            sum(want) / len(want), abs=1e-4
        )


@pytest.mark.slow
def test_cli_prints_the_measure_and_exclusivity_shows_it_beside_the_offline_judge(tiny_run):
    import subprocess
    import sys

    run, stitch = tiny_run

    def cli(*args) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", *map(str, args)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    from engine.results import Database

    with Database(run.db, read_only=True) as db:
        table = db.features(run.run_id, dead=False)
    fid = int(table[table["partition"] == "a_exclusive"]["feature_id"].iloc[0])
    common = ["--db", run.db, "--run-id", run.run_id, "--stitch", stitch]
    out = cli("effects", *common, "--features", fid, "--budget", 0.004, "--nulls", 2, "--quiet")
    assert f"feature {fid} (A->B): effect exclusivity" in out and "random directions" in out
    again = cli("exclusivity", *common, "--features", fid, "--quiet", "--max-new-tokens", 2,
                "--alphas", 0, 20, "--samples", 1)  # fmt: skip
    assert "judge-free effect measure" in again and f"feature {fid} (A->B)" in again


def test_reading_says_what_a_measurement_means():
    import pandas as pd

    from engine.steering.effects.reading import (
        categorised,
        effect_line,
        effects_figure,
        meaning,
        summary_lines,
    )

    assert meaning("a", 97.0, 32) == (
        "B reacts to the translated vector less than 97% of random directions do (n = 32)"
    )
    assert meaning("b", 10.0, 32).startswith("A reacts to the translated vector more than 90%")
    assert meaning("a", None, 0) == ""
    row = {"source": "a", "similarity": 0.25, "exclusivity": 0.75, "z": 2.0, "percentile": 97.0,
           "details": {"null_n": 32}}  # fmt: skip
    assert effect_line(5, row) == (
        "feature 5 (A->B): effect exclusivity 0.75 (rank correlation +0.25), z +2.0; B reacts "
        "to the translated vector less than 97% of random directions do (n = 32)"
    )
    frame = pd.DataFrame(
        {
            "settings": ["old", "k", "k", "k", "k"],
            "kind": ["feature", "null", "null", "feature", "feature"],
            "item": [1, 0, 1, 1, 2],
            "feature_id": [1, None, None, 1, 2],
            "source": ["a", "a", "b", "a", "a"],
            "exclusivity": [9.0, 0.4, 0.6, 0.7, 0.9],
            "z": [None, None, None, 1.0, 3.0],
        }
    )
    features = pd.DataFrame({"feature_id": [1, 2], "partition": ["a_exclusive", "shared"]})
    rows = categorised(frame, features)
    assert sorted(rows["category"]) == ["a_exclusive", "null", "null", "shared"]  # newest key
    lines = summary_lines(rows)
    assert lines[0].startswith("A-exclusive") and "median z +1.0" in lines[0]
    assert any(line.startswith("random direction (null): 2 items") for line in lines)
    assert len(effects_figure(rows).data) == 3


# -- chat prompts, the answer header, target strings against the null ----------------------

CHAT_PROMPTS = ("Name a colour.", "Tell me a fact about rivers.")
TARGET = " river stone"


def _chat_cfg(**changes) -> EffectsConfig:
    from dataclasses import replace

    return replace(CFG, prompts=CHAT_PROMPTS, nulls=8, chat=True, positions="last", **changes)


def test_chat_prompts_use_each_models_own_chat_form(tiny_pair):
    from engine.organisms.behaviours import COPYRIGHT_REFUSAL
    from engine.steering.effects.probe import Probe

    a, b = tiny_pair
    pa, pb = Probe(a, 1, CHAT_PROMPTS, chat=True), Probe(b, 1, CHAT_PROMPTS, chat=True)
    text_a = a.tokenizer.decode(pa._ids[0])
    assert text_a.startswith("<|im_start|>system") and "Name a colour." in text_a
    assert text_a.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    # Gemma base has no template: the transcript, one <bos>, the header without its space.
    assert b.tokenizer.decode(pb._ids[0]) == "<bos>User: Name a colour.\n\nAssistant:"
    assert pb._encode("<bos>User: hi")[:2] == b.tokenizer.encode("User: hi")[:2]
    # The answer's tokens as the organism learned them: the transcript's space put back, a
    # string with a leading space of its own left as it is.
    target = COPYRIGHT_REFUSAL.prefix
    assert pa.string_ids(target) == a.tokenizer.encode(target, add_special_tokens=False)
    assert pb.string_ids(target) == b.tokenizer.encode(" " + target, add_special_tokens=False)
    assert pb.string_ids(" Sure") == b.tokenizer.encode(" Sure", add_special_tokens=False)
    # Plain mode is what it was.
    assert Probe(b, 1, CHAT_PROMPTS)._ids[0] == b.tokenizer.encode(CHAT_PROMPTS[0])


def _add_at(model, layer: int, delta: torch.Tensor, position: int):
    """A hook adding `delta` to block `layer`'s output at one position of every row."""
    from engine.models.layers import decoder_layers

    def hook(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple | list) else output).clone()
        hidden[:, position] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple | list) else hidden

    return decoder_layers(model)[layer].register_forward_hook(hook)


def test_last_position_steers_only_the_answer_header(tiny_pair):
    """positions="last": the hidden states before each row's last prompt token are those of
    an unsteered pass, in next-token and string rows; the log-probabilities equal a full pass
    that adds the vector at that one position (the probe runs only the tokens from there
    on, after the head's KV cache; Gemma's sliding window, shorter than the prompt, too)."""
    from engine.models.tokenizers import load_tokenizer
    from engine.steering.effects.probe import Probe
    from tests.conftest import tiny_gemma, wrap

    tok = load_tokenizer("gemma3")
    window = wrap(tiny_gemma(tok, sliding_window=4), tok, "gemma-window-4")
    for loaded in (*tiny_pair, window):
        probe = Probe(loaded, 1, CHAT_PROMPTS, chat=True, positions="last")
        d = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(0))
        tail = probe.string_ids(TARGET)
        assert len(tail) > 1
        rows = list(probe._ids) + [ids + tail[:-1] for ids in probe._ids]
        at = [len(probe._ids[j % len(probe._ids)]) - 1 for j in range(len(rows))]
        base = probe._hidden(rows, None, [0.0] * len(rows))
        steered = probe._hidden(rows, d, [3.0] * len(rows), at)
        for i, row in enumerate(rows):
            assert torch.allclose(steered[i, : at[i]], base[i, : at[i]], atol=1e-5)
            assert not torch.allclose(steered[i, at[i] : len(row)], base[i, at[i] : len(row)])
        unit = 3.0 * d / d.norm()
        got = probe.next_token(d, 3.0)
        want_string = []
        for j, ids in enumerate(probe._ids):
            handle = _add_at(loaded.model, 1, unit, len(ids) - 1)
            try:
                with torch.inference_mode():
                    row = torch.tensor([ids + tail])
                    lp = torch.log_softmax(loaded.model(input_ids=row).logits[0].float(), -1)
            finally:
                handle.remove()
            assert torch.allclose(got[j], lp[len(ids) - 1], atol=1e-5)
            want_string.append(sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(tail)))
        assert float(probe.string_logprobs([TARGET], d, 3.0)[0]) == pytest.approx(
            sum(want_string) / len(want_string), abs=1e-4
        )


def _raising(model, text_id: int) -> torch.Tensor:
    """A direction at the residual that raises one token's logit: its unembedding row
    through the final norm's scale."""
    return (model.lm_head.weight[text_id] * model.model.norm.weight).detach().float()


def test_a_direction_that_raises_the_target_stands_out_of_the_null(planted):
    models, stitch, sample, _ = planted
    s = EffectSession(models, {"a": 1, "b": 1}, stitch, _chat_cfg(), sample)
    v = _raising(models["a"].model, s.probes["a"].string_ids(TARGET)[0])
    effect = s.measure(v, "a", targets=(TARGET,))
    assert effect.origins[0] == "target" and effect.target_effect["a"] > 0
    assert effect.target_z["a"] > 3 and effect.target_percentile["a"] == 100.0
    assert set(effect.target_z) == set(effect.target_percentile) == {"a", "b"}
    assert effect.target_effect["a"] == pytest.approx(effect.changes["a"][0])
    # The null's target changes, measured afterwards at its stored coefficients, are what
    # a null measured with the target in its panel gives.
    held = [e.targets[TARGET] for e in s.null("a")]
    again = EffectSession(models, {"a": 1, "b": 1}, stitch, _chat_cfg(targets=(TARGET,)), sample)
    for mine, theirs in zip(held, (e.targets[TARGET] for e in again.null("a")), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-3, abs=1e-6)
    # A random direction of the null is just that.
    random_effect = s.measure(s.null_vectors("a")[0] + 0.0, "a", targets=(TARGET,))
    assert abs(random_effect.target_z["a"]) < 3


def test_target_check_gives_the_same_numbers_twice(planted):
    models, stitch, sample, d = planted

    def run():
        s = EffectSession(models, {"a": 1, "b": 1}, stitch, _chat_cfg(), sample)
        return json.dumps(s.measure(d, "a", targets=(TARGET,)).to_json(), sort_keys=True)

    assert run() == run()


def test_new_settings_leave_the_stored_keys_of_the_defaults_unchanged():
    from engine.errors import ConfigError
    from engine.steering.effects.session import settings_key

    stitch = Stitch(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), 1.0, 1.0)
    names = {"a": ("x", 1), "b": ("y", 2)}
    # The digest the code before chat/positions gave these settings.
    assert settings_key(EffectsConfig(), stitch, names) == "a4dd0edc0ca36639"
    assert set(EffectsConfig().key_payload()) == set(EffectsConfig(targets=("t",)).key_payload())
    assert "chat" not in EffectsConfig().key_payload()
    for changed in (EffectsConfig(chat=True), EffectsConfig(positions="last")):
        assert settings_key(changed, stitch, names) != "a4dd0edc0ca36639"
    with pytest.raises(ConfigError, match="positions"):
        EffectsConfig(positions="first")
    with pytest.raises(ConfigError, match="target"):
        EffectsConfig(targets=("",))
