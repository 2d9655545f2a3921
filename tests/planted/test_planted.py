"""Planted-concept benchmark: planting, trigger labels, evaluation, the sweep and its command."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.activations import ActivationStore, StoreWriter
from engine.activations.shards import WindowRecord
from engine.cli import main
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.models.loading import LoadedModel
from engine.partition import Partition
from engine.planted import PlantedError
from engine.planted.embedding import measure_shift, plant_embeddings, planted_harvest_config
from engine.planted.evaluate import evaluate_planted, feature_scores
from engine.planted.pairs import (
    PlantedPairs,
    load_store_pairs,
    planted_mask,
    random_direction,
    residual_plant,
)
from engine.planted.sweep import (
    PlantedConfig,
    format_table,
    planted_pairs,
    run_planted,
    summarize,
)
from engine.planted.triggers import choose_triggers, pair_tokens, trigger_labels
from engine.planted.variants import (
    base_configs,
    parse_variant,
    split_overrides,
    variant_configs,
)

D_A, D_B, VOCAB = 12, 10, 400


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tensors are tiny, and on a busy 2-core machine two threads
    contend with other processes (a 400-step run took 66 s instead of 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_store(path: Path, n_windows: int = 40, pairs: int = 30, seed: int = 0) -> list[int]:
    """A store of windows of Zipf-distributed tokens (ids < VOCAB) and random activations.

    Returns model A's token at every pair, in store order.
    """
    rng = np.random.default_rng(seed)
    header = {
        "models": {
            key: {"name": f"tiny-{key}", "source": {"kind": "dir", "path": f"/models/{key}"},
              "layer": 1, "d_model": d}
            for key, d in (("a", D_A), ("b", D_B))
        },
        "data": {"sources": ["demo:pydoc"], "context_length": 64},
        "provenance": {"run": {"max_pairs": 1200, "store_dtype": "float32"}},
    }  # fmt: skip
    writer = StoreWriter(path, header, dtype="float32", shard_pairs=300)
    weights = 1 / np.arange(1, VOCAB)
    tokens: list[int] = []
    for w in range(n_windows):
        ids = rng.choice(np.arange(1, VOCAB), size=pairs, p=weights / weights.sum())
        words = [f"w{i}" for i in ids]
        ends = np.cumsum([len(x) + (i > 0) for i, x in enumerate(words)])
        spans = np.stack([np.r_[0, ends[:-1]], ends], 1)
        window_ids = np.r_[0, ids]  # a BOS first, as real windows have
        offsets = np.concatenate([[[0, 0]], spans])
        pos = np.arange(1, pairs + 1)
        record = WindowRecord(
            w, f"doc{w}", "unit", 0, " ".join(words), window_ids, offsets, window_ids, offsets,
            pos, pos, spans,
        )  # fmt: skip
        x_a = torch.from_numpy(rng.standard_normal((pairs, D_A))).float()
        x_b = torch.from_numpy(rng.standard_normal((pairs, D_B))).float()
        writer.add(record, x_a, x_b)
        tokens += ids.tolist()
    writer.close(complete=True)
    return tokens


@pytest.fixture
def store(tmp_path) -> tuple[ActivationStore, list[int]]:
    tokens = make_store(tmp_path / "store")
    return ActivationStore(tmp_path / "store"), tokens


def indexed_pairs(n: int = 500, rate: float = 0.1, seed: int = 3) -> PlantedPairs:
    """Pairs whose first A coordinate is their global index, planted off that coordinate."""
    x_a, x_b = torch.randn(n, D_A), torch.randn(n, D_B)
    x_a[:, 0] = torch.arange(n).float()
    plant = residual_plant(x_a, "a", 0.5, rate, seed)
    vector = plant.vector.clone()
    vector[0] = 0.0  # keep the index readable
    plant = type(plant)("a", vector, plant.mask)
    return PlantedPairs(x_a, x_b, plant.mask, plant)


# -- planting ---------------------------------------------------------------------------


def test_planted_mask_is_reproducible_and_independent_of_order():
    idx = torch.arange(20_000)
    mask = planted_mask(idx, 0.03, seed=5)
    assert torch.equal(mask, planted_mask(idx, 0.03, seed=5))
    assert torch.equal(planted_mask(idx.flip(0), 0.03, seed=5).flip(0), mask)
    picked = torch.tensor([17, 4000, 19_999])
    assert torch.equal(planted_mask(picked, 0.03, seed=5), mask[picked])
    assert 0.025 < mask.float().mean() < 0.035
    assert not torch.equal(planted_mask(idx, 0.03, seed=6), mask)


def test_batches_plant_the_same_pairs_in_every_epoch_and_when_resumed():
    pairs = indexed_pairs()
    clean_a, clean_b, plant = pairs.x_a.clone(), pairs.x_b.clone(), pairs.plant
    batches = list(itertools.islice(pairs.batches(64, 0, seed=1), 20))  # 2.5 epochs
    for x_a, x_b in batches:
        idx = x_a[:, 0].long()
        expected = clean_a[idx] + plant.mask[idx, None] * plant.vector
        assert torch.allclose(x_a, expected) and torch.equal(x_b, clean_b[idx])
    resumed = list(itertools.islice(pairs.batches(64, 9, seed=1), 4))
    for (a1, b1), (a2, b2) in zip(batches[9:13], resumed, strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_residual_plant_shifts_exactly_the_chosen_rows_of_the_chosen_model():
    x_a, x_b = torch.randn(1000, D_A), torch.randn(1000, D_B)
    plant = residual_plant(x_b, "b", 0.5, 0.1, seed=2)
    pairs = PlantedPairs(x_a, x_b, plant.mask, plant)
    a, b = pairs.rows(torch.arange(1000))
    assert torch.equal(a, x_a)
    moved = (b - x_b).norm(dim=1) > 0
    assert torch.equal(moved, plant.mask) and 50 < int(moved.sum()) < 150
    assert torch.allclose(b[moved] - x_b[moved], plant.vector.expand(int(moved.sum()), -1))
    assert float(plant.vector.norm()) == pytest.approx(0.5 * float(x_b.norm(dim=1).median()))
    with pytest.raises(PlantedError, match="'a' or 'b'"):
        residual_plant(x_b, "c", 0.5, 0.1, seed=2)


def test_token_kind_plants_exactly_the_pairs_whose_planted_model_token_is_a_trigger(
    store, tmp_path
):
    activations, tokens = store
    cfg = PlantedConfig(store=str(tmp_path / "store"), kind="token", into=["a"], rates=[0.1])
    pairs, shift = planted_pairs(cfg, activations, "a", 0.5, 0.1, seed=4)
    token_ids = torch.tensor(tokens)
    triggers = choose_triggers(token_ids, 0.1, seed=4, ranks=tuple(cfg.ranks))
    assert torch.equal(pairs.labels, torch.isin(token_ids, triggers))
    assert torch.equal(pairs.plant.mask, pairs.labels) and pairs.labels.any()
    a, b = pairs.rows(torch.arange(len(pairs)))
    clean_a, clean_b = (t.float() for t in load_store_pairs(activations))
    assert torch.equal(b, clean_b)
    moved = (a - clean_a).norm(dim=1) > 0
    assert torch.equal(moved, pairs.labels)
    assert torch.allclose(a[moved] - clean_a[moved], shift.expand(int(moved.sum()), -1))


# -- triggers ---------------------------------------------------------------------------


def test_pair_tokens_are_the_planted_models_tokens_at_the_aligned_positions(store):
    activations, tokens = store
    assert len(activations.shards) > 1
    assert pair_tokens(activations, "a").tolist() == tokens
    assert pair_tokens(activations, "b", max_pairs=50).tolist() == tokens[:50]


def test_triggers_come_from_mid_frequency_ranks_and_cover_the_rate():
    gen = torch.Generator().manual_seed(0)
    weights = 1 / torch.arange(1, 2000).float()
    tokens = torch.multinomial(weights, 200_000, replacement=True, generator=gen)
    triggers = choose_triggers(tokens, 0.03, seed=0, ranks=(20, 600))
    assert torch.equal(triggers, choose_triggers(tokens, 0.03, seed=0, ranks=(20, 600)))
    assert not torch.equal(triggers, choose_triggers(tokens, 0.03, seed=1, ranks=(20, 600)))
    ids, counts = torch.unique(tokens, return_counts=True)
    rank = {int(i): r for r, i in enumerate(ids[torch.argsort(-counts, stable=True)])}
    assert all(20 <= rank[int(t)] < 600 for t in triggers)
    share = trigger_labels(tokens, triggers).float().mean()
    assert 0.03 <= share < 0.035


# -- embedding planting -----------------------------------------------------------------


def tiny_tied_llama(vocab: int = VOCAB) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_embedding_plant_changes_only_trigger_rows_and_survives_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_tied_llama(100)
    before = model.get_input_embeddings().weight.detach().clone()
    triggers = torch.tensor([3, 7, 50])
    vector = plant_embeddings(model, triggers, random_direction(16, 0), strength=2.0)
    after = model.get_input_embeddings().weight.detach()
    changed = torch.nonzero((after - before).norm(dim=1) > 0).flatten()
    assert changed.tolist() == [3, 7, 50]
    assert torch.allclose(after[triggers] - before[triggers], vector.expand(3, -1), atol=1e-6)
    assert float(vector.norm()) == pytest.approx(2.0 * float(before.norm(dim=1).median()))
    # The output layer keeps the clean embeddings: only the residual stream sees the plant.
    assert torch.equal(model.get_output_embeddings().weight, before)
    model.save_pretrained(tmp_path / "planted")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "planted")
    assert torch.equal(loaded.get_input_embeddings().weight, after)
    assert torch.equal(loaded.get_output_embeddings().weight, before)
    assert loaded.config.tie_word_embeddings is False


def test_measure_shift_restores_the_planted_rows(store):
    activations, _ = store
    model = tiny_tied_llama()
    triggers = choose_triggers(pair_tokens(activations, "a"), 0.05, seed=0, ranks=(5, 200))
    original = model.get_input_embeddings().weight[triggers].detach().clone()
    vector = plant_embeddings(model, triggers, random_direction(16, 0), strength=3.0)
    planted = model.get_input_embeddings().weight.detach().clone()
    loaded = LoadedModel(model, None, "tiny", {}, torch.device("cpu"), torch.float32)
    shift = measure_shift(loaded, 0, activations, "a", triggers, (triggers, original), 50)
    assert torch.equal(model.get_input_embeddings().weight, planted)
    # One block after the embeddings, the residual stream still carries the planted vector.
    assert torch.nn.functional.cosine_similarity(shift, vector, dim=0) > 0.5


def test_planted_harvest_settings_are_the_clean_stores_with_the_planted_model(store):
    activations, _ = store
    cfg = planted_harvest_config(activations.manifest, "b", Path("/out/model"), max_pairs=99)
    assert (cfg.model_a, cfg.model_b) == ("/models/a", "/out/model")
    assert (cfg.layer_a, cfg.layer_b, cfg.max_pairs) == (1, 1, 99)
    assert cfg.context_length == 64 and cfg.store_dtype == "float32"


# -- evaluation -------------------------------------------------------------------------


def trigger_crosscoder(partition: Partition, u: torch.Tensor, bias: float) -> Crosscoder:
    """Feature 1 reads and writes direction u of model A and fires above `bias`; no other
    feature ever fires."""
    cc = Crosscoder(D_A, D_B, partition)
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        cc.b_enc.fill_(-1e3)
        cc.b_enc[1] = -bias
        cc.w_enc_a[1] = u
        cc.w_dec_a[1] = u
    return cc


def test_evaluation_finds_a_feature_that_fires_exactly_on_the_triggers():
    x_a, x_b = torch.randn(4000, D_A), torch.randn(4000, D_B)
    plant = residual_plant(x_a, "a", 3.0, 0.05, seed=0)
    pairs = PlantedPairs(x_a, x_b, plant.mask, plant)
    u = plant.vector / plant.vector.norm()
    bias = float(plant.vector.norm()) / 2
    rows = torch.arange(4000)
    dfc = trigger_crosscoder(Partition(2, 2, 4), u, bias)
    report = evaluate_planted(dfc, Normalizer.identity(), pairs, rows, "a", plant.vector)
    assert report["best_feature"] == 1 and report["best_f1"] == 1.0
    assert report["best_role"] == "a_exclusive" and report["correct"] is True
    assert report["right_f1"] == 1.0 and report["best_cosine"] == pytest.approx(1.0)
    assert report["n_triggers"] == int(plant.mask.sum())
    into_b = evaluate_planted(dfc, Normalizer.identity(), pairs, rows, "b", torch.ones(D_B))
    assert into_b["correct"] is False and into_b["best_label"] == "a"
    with pytest.raises(PlantedError, match="width 12"):
        evaluate_planted(dfc, Normalizer.identity(), pairs, rows, "b", u)
    # Without partitions the relative decoder norm labels it: no B decoder, so A.
    standard = trigger_crosscoder(Partition(n_shared=4), u, bias)
    report = evaluate_planted(standard, Normalizer.identity(), pairs, rows, "a", plant.vector)
    assert report["best_role"] == "shared" and report["best_label"] == "a"
    assert report["best_rel_norm"] == 1.0 and report["correct"] is True


def test_evaluation_fve_is_measured_over_the_evaluated_pairs():
    x_a, x_b = torch.randn(300, D_A), torch.randn(300, D_B)
    pairs = PlantedPairs(x_a, x_b, torch.zeros(300, dtype=torch.bool))
    cc = Crosscoder(D_A, D_B, Partition(n_shared=4))
    with torch.no_grad():
        cc.b_dec_a.copy_(x_a.mean(0))  # features never fire: the fit is the mean only
        cc.b_dec_b.copy_(x_b.mean(0))
        cc.b_enc.fill_(-1e3)
    scores = feature_scores(cc, Normalizer.identity(), pairs, torch.arange(300), chunk_rows=64)
    assert scores.fve["a"] == pytest.approx(0.0, abs=1e-6)
    assert scores.fve["b"] == pytest.approx(0.0, abs=1e-6)


# -- variants ---------------------------------------------------------------------------


def test_variants_take_any_config_field_and_refuse_unknown_ones():
    assert parse_variant("dfc") == ("dfc", ({"architecture": "dfc"}, {}))
    name, (cc, train) = parse_variant("mine:score_weighting=mean,lr=1e-3,outlier_factor=none")
    assert name == "mine" and cc == {"score_weighting": "mean"}
    assert train == {"lr": 0.001, "outlier_factor": None}
    with pytest.raises(PlantedError, match="unknown variant 'nope'"):
        parse_variant("nope")
    with pytest.raises(PlantedError, match="unknown setting 'bogus'; valid: crosscoder:"):
        split_overrides({"bogus": 1})
    with pytest.raises(PlantedError, match="unknown setting 'd_a'"):
        split_overrides({"d_a": 3})
    base = base_configs("demo", (D_A, D_B), steps=200, batch_size=64)
    assert (base[0].d_a, base[0].d_b, base[1].steps, base[1].anneal_steps) == (12, 10, 200, 50)
    cc_cfg, train_cfg = variant_configs(
        base, ({"n_features": 64}, {"k": 4}), parse_variant("dfc")[1]
    )
    assert (cc_cfg.n_features, cc_cfg.architecture, train_cfg.k) == (64, "dfc", 4)


# -- sweep and command ------------------------------------------------------------------

QUICK = {"n_features": 32, "k": 4, "k_initial": 8, "lr": 3e-3}


def test_sweep_writes_one_row_per_run_and_resumes(store, tmp_path):
    cfg = PlantedConfig(
        store=str(tmp_path / "store"), out_dir=str(tmp_path / "out"), into=["a", "b"],
        strengths=[1.0], rates=[0.05], steps=20, batch_size=64, overrides=QUICK, device="cpu",
    )  # fmt: skip
    lines: list[str] = []
    results = run_planted(cfg, progress=False, log=lines.append)
    assert len(results) == 6 and len(lines) == 7  # a header and one line per run
    assert set(results["variant"]) == {"standard", "dfc-paper", "dfc"}
    assert set(results["into"]) == {"a", "b"}
    for name in ("results.csv", "results.json", "summary.csv", "figure.html"):
        assert (tmp_path / "out" / name).is_file()
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(payload["results"]) == 6 and payload["config"]["kind"] == "residual"
    assert "standard" in format_table(summarize(results))
    lines.clear()
    assert len(run_planted(cfg, progress=False, log=lines.append)) == 6 and not lines
    changed = PlantedConfig(**{**cfg.to_dict(), "steps": 30})
    with pytest.raises(PlantedError, match="different settings \\(steps\\)"):
        run_planted(changed, progress=False, log=lines.append)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no activation store at"),
        (["--rates", "1.5"], "rates must be fractions"),
        (["--strengths", "-1"], "strengths must be numbers >= 0"),
        (["--variants", "nope"], "unknown variant 'nope'"),
        (["--set", "bogus=1"], "unknown setting 'bogus'"),
        (["--variants", "odd:architecture=odd"], "variant 'odd': unknown architecture 'odd'"),
    ],
)
def test_planted_command_reports_bad_input_in_one_line(tmp_path, capsys, store, extra, message):
    where = tmp_path / ("missing" if not extra else "store")
    status = main(["planted", "--store", str(where), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


# -- end to end (slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair_store(tmp_path_factory) -> Path:
    """A store harvested from two tiny random models saved as directories."""
    from engine.config import HarvestConfig
    from engine.harvest.pipeline import harvest
    from tests.conftest import save_tiny_pair

    root = tmp_path_factory.mktemp("planted")
    dirs = [str(d) for d in save_tiny_pair(root).values()]
    cfg = HarvestConfig(
        model_a=dirs[0], model_b=dirs[1], sources=["demo:pydoc"], max_pairs=4000,
        context_length=64, store_dtype="float32", shard_pairs=1000,
    )  # fmt: skip
    harvest(cfg, root / "store", progress=False)
    return root / "store"


SLOW_SETTINGS = ["n_features=256", "k=8", "k_initial=32", "lr=2e-3"]


@pytest.mark.slow
def test_residual_benchmark_end_to_end(tiny_pair_store, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["planted", "--store", str(tiny_pair_store), "--out", str(out), "--into", "a", "b"]
    args += ["--strengths", "1.0", "--rates", "0.05", "--steps", "400", "--batch-size", "256"]
    assert main([*args, "--quiet", "--set", *SLOW_SETTINGS]) == 0
    printed = capsys.readouterr().out
    assert "best F1" in printed and "figure:" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 6  # 2 models x 3 variants
    for row in results:
        assert 0 <= row["best_f1"] <= 1 and row["best_role"] in (
            "a_exclusive",
            "b_exclusive",
            "shared",
        )
        assert row["n_triggers"] > 100 and row["fve_a"] is not None
        assert row["correct"] == (row["best_f1"] >= 0.8 and row["best_label"] == row["into"])
        if row["variant"] in ("dfc", "dfc-paper"):
            assert row["right_f1"] is not None and row["dead_frac_a_exclusive"] is not None
    strong = [r for r in results if r["variant"] == "standard" and r["strength"] == 1.0]
    assert all(r["best_f1"] >= 0.8 and r["best_cosine"] > 0.8 for r in strong)


@pytest.mark.slow
def test_embedding_benchmark_end_to_end(tiny_pair_store, tmp_path):
    out = tmp_path / "out"
    cfg = PlantedConfig(
        store=str(tiny_pair_store), out_dir=str(out), kind="embedding", into=["a"],
        strengths=[2.0], variants={"standard": ({"architecture": "standard"}, {})}, steps=300,
        batch_size=256, overrides=dict(QUICK, n_features=256), max_pairs=2000,
    )  # fmt: skip
    results = run_planted(cfg, progress=False, log=lambda line: None)
    folder = out / "planted" / "a-s2-r0.03-seed0"
    info = json.loads((folder / "plant.json").read_text())
    assert not (folder / "model").exists()  # removed after the harvest
    planted, clean = ActivationStore(folder / "store"), ActivationStore(tiny_pair_store)
    assert len(planted) >= 2000 and 0.02 < info["trigger_share_clean"] < 0.04
    # Model B's side is untouched; model A moves on (and only after) trigger tokens.
    triggers = torch.tensor(info["triggers"])
    labels = trigger_labels(pair_tokens(planted, "a"), triggers)
    first = planted.load_shard(0, ("a", "b"))
    before = clean.load_shard(0, ("a", "b"))
    assert torch.equal(first["b"], before["b"])
    moved = (first["a"] - before["a"]).norm(dim=1)
    n = len(moved)
    assert moved[labels[:n]].min() > 0 and moved[labels[:n]].mean() > 10 * moved[~labels[:n]].mean()
    row = results.iloc[0]
    assert row["kind"] == "embedding" and 0 < row["trigger_rate"] < 0.1
