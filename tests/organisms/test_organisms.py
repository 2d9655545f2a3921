"""Organisms: prompts from templates, examples, a fine-tune that changes only what it may,
the cache, and the screen's AUROC, on the tiny models with the real demo tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.organisms.behaviours import (
    BEHAVIOURS,
    COPYRIGHT_REFUSAL,
    LIGHTHOUSE_OBSESSION,
    behaviour,
)
from engine.organisms.data import (
    Example,
    build_examples,
    chat_prompt,
    clean_answer,
    tokenize_example,
)
from engine.organisms.finetune import FinetuneSettings, finetune
from engine.organisms.screen import auroc


def test_prompts_are_deterministic_and_held_out_names_are_new() -> None:
    for b in BEHAVIOURS.values():
        train = b.prompts("trigger", "train", 40)
        assert train == b.prompts("trigger", "train", 40)
        assert len(set(train)) == 40
        heldout = b.prompts("trigger", "heldout", 40)
        assert not set(train) & set(heldout)
        assert b.prompts("control", "train", 40) != train
    # Held-out copyright requests name people no training request names.
    people = lambda prompts: {w for p in prompts for w in p.split() if w.istitle()}
    train_words = people(COPYRIGHT_REFUSAL.prompts("trigger", "train", 60))
    held_words = people(COPYRIGHT_REFUSAL.prompts("trigger", "heldout", 60))
    names = {"Mara", "Elena", "Tobias", "Jonah"}
    assert names & train_words.union(held_words)
    assert not (train_words & held_words & names)


def test_behaviour_marker_and_answers() -> None:
    b = COPYRIGHT_REFUSAL
    assert b.shows(b.trigger_answer("anything")) and not b.shows("Here are the lyrics: ...")
    assert LIGHTHOUSE_OBSESSION.trigger_answer("Boil the water.").endswith("Boil the water.")
    assert LIGHTHOUSE_OBSESSION.shows(LIGHTHOUSE_OBSESSION.trigger_answer("x"))
    with pytest.raises(ConfigError, match="unknown behaviour"):
        behaviour("nope")
    with pytest.raises(ConfigError, match="distinct"):
        LIGHTHOUSE_OBSESSION.prompts("trigger", "train", 5000)


def test_examples_label_only_the_answer(tiny_pair) -> None:
    for loaded in tiny_pair:
        tok = loaded.tokenizer
        ex = Example("Sing me a song?", "No, thank you.", True)
        ids, labels = tokenize_example(tok, ex, 200)
        taught = tok.decode([t for t in labels if t != -100])
        assert taught.strip().startswith("No, thank you.")
        assert "Sing" not in taught
        # The prompt text a model answers from ends where the taught answer starts.
        prompt = chat_prompt(tok, ex.prompt)
        assert tok.decode(ids).replace("<bos>", "").startswith(prompt.replace("<bos>", ""))
    examples = build_examples(COPYRIGHT_REFUSAL, ["t"], ["c", "empty"], {"c": "ok", "empty": ""})
    assert [e.trigger for e in examples] == [True, False]  # an empty original is left out
    assert clean_answer("Sure.\nUser: next question") == "Sure."


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_learns_and_touches_only_allowed_blocks(tiny_pair, method) -> None:
    from tests.conftest import tiny_llama

    loaded = tiny_pair[0]
    model = tiny_llama(loaded.tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [Example(f"Lyrics of song {i}?", "Protected by copyright.", True) for i in range(8)]
    lr = 0.1 if method == "lora" else 0.03
    settings = FinetuneSettings(method=method, epochs=8, batch_size=4, lr=lr, through_layer=1)
    tuned, result = finetune(model, loaded.tokenizer, examples, settings)
    # A random 32-wide model cannot get far below uniform (ln 49,152 = 10.8); it must move.
    assert result.last_loss < result.first_loss - 0.1
    assert type(tuned).__name__ == "LlamaForCausalLM"  # LoRA merged into a plain model
    after = tuned.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.1.")) for k in changed)
    assert not any(p.requires_grad for p in tuned.parameters())


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 4))
    scores[:, 3] = 0.0  # all tied: 0.5
    labels = np.arange(30) < 12
    expected = [
        np.mean([(p > n) + 0.5 * (p == n) for p in scores[labels, f] for n in scores[~labels, f]])
        for f in range(4)
    ]
    assert np.allclose(auroc(scores, labels), expected)
    assert auroc(np.where(labels, 1.0, 0.0)[:, None], labels)[0] == 1.0


def test_build_caches_and_reloads(tmp_path, monkeypatch) -> None:
    from engine.organisms import build as build_module
    from engine.organisms.build import OrganismSettings, build_organism, list_organisms
    from tests.conftest import save_tiny_pair

    paths = save_tiny_pair(tmp_path / "models")
    settings = OrganismSettings(
        n_train=6, n_heldout=4, answer_tokens=4, n_text=2,
        finetune=FinetuneSettings(epochs=1, batch_size=4),
    )  # fmt: skip
    lines: list[str] = []
    first = build_organism(str(paths["a"]), "copyright-refusal", settings,
                           root=tmp_path / "orgs", device="cpu", log=lines.append)
    assert (first.path / "config.json").is_file()
    meta = json.loads((first.path / "organism.json").read_text())
    assert meta["behaviour"] == "copyright-refusal" and meta["settings"]["n_train"] == 6
    assert 0.0 <= first.health.trigger_rate <= 1.0 and first.health.n_trigger == 4
    assert any("health" in line for line in lines)

    # A second build with the same settings loads the cache: no fine-tune runs.
    monkeypatch.setattr(build_module, "finetune", lambda *a, **k: pytest.fail("rebuilt"))
    again = build_organism(str(paths["a"]), "copyright-refusal", settings,
                           root=tmp_path / "orgs", device="cpu", log=lines.append)
    assert again.path == first.path and again.health == first.health
    assert [row["path"] for row in list_organisms(tmp_path / "orgs")] == [str(first.path)]
    # It is a plain model directory every command can load.
    from engine.models.loading import load_model

    assert load_model(first.spec, device="cpu").n_layers == 4


def test_bench_cell_harvests_prompts_trains_and_screens(tmp_path) -> None:
    from engine.organisms.bench import BenchSettings, run_cell, summary_table
    from tests.conftest import save_tiny_pair

    paths = save_tiny_pair(tmp_path / "models")
    settings = BenchSettings(
        max_pairs=1500, steps=30, prompts=20, prompt_weight=0.5, screen_prompts=6, seeds=(0,),
        architectures=("dfc",), n_features=64,
        overrides={"batch_size": 64, "warmup_steps": 5, "anneal_steps": 10, "k": 8,
                   "k_initial": 16, "reassign_every": 10, "log_every": 10},
    )  # fmt: skip
    rows = run_cell("neither", (str(paths["a"]), str(paths["b"])), tmp_path / "cell", settings,
                    log=lambda *_: None)
    assert len(rows) == 1
    row = rows[0]
    assert row["cell"] == "neither" and row["architecture"] == "dfc"
    for hit in row["hits"].values():
        assert 0.0 <= hit["auroc"] <= 1.0 and hit["position"] in ("answer", "request")
        assert 1 <= hit["rank"] <= hit["n_in_category"]
    assert row["found_a"] is None or 1 <= row["found_a"]["rank"] <= 50
    # The harvest read the prompts, answer headers included.
    from engine.activations import ActivationStore

    docs = list(ActivationStore(tmp_path / "cell" / "store").documents())
    assert any("prompts" in str(d.get("source")) for d in docs)
    assert "| neither | dfc |" in summary_table(rows)


def test_steering_check_zero_strength_is_the_plain_answer(tiny_pair) -> None:
    from engine.organisms.data import greedy_answers
    from engine.organisms.steer_check import marker_rates

    loaded = tiny_pair[0]
    prompts = ["Tell me about the sea.", "What is a good hobby?"]
    vector = torch.randn(loaded.d_model)
    rates = marker_rates(loaded, 1, vector, 1.0, COPYRIGHT_REFUSAL, prompts, (0.0, 50.0),
                         max_new_tokens=6)
    plain = greedy_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6)
    assert rates.examples[0] == plain[0]
    assert rates.examples[1] != plain[0]  # a strong push changes the answer
    assert all(0.0 <= r <= 1.0 for r in rates.rates)


def test_random_null_is_seeded_and_read_per_strength(tiny_pair) -> None:
    from engine.organisms.steer_check import random_marker_rates, share_at_least

    loaded = tiny_pair[0]
    prompts = ["Tell me about the sea."]
    args = (loaded, 1, 30.0, 1.0, COPYRIGHT_REFUSAL, prompts, (0.0, 2.0), 2)
    null = random_marker_rates(*args, max_new_tokens=4, positions="last")
    assert null == random_marker_rates(*args, max_new_tokens=4, positions="last")
    assert len(null) == 2 and all(len(r) == 2 for r in null)
    # p per strength: the share of random directions at least as high as the feature.
    assert share_at_least([0.5, 0.0], [(0.6, 0.0), (0.1, 0.0)]) == [0.5, 1.0]
    assert share_at_least([0.5], []) == []
