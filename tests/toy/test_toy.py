"""Behaviour of the synthetic toy model, its recovery evaluation and the sweep."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import torch

from engine.toy.evaluate import evaluate_recovery, label_features
from engine.toy.model import ToyConfig, ToyModel, bernoulli_events
from engine.toy.sweep import SweepConfig, format_table, main, run_sweep, summarize

SMALL = ToyConfig(n_concepts=256, d=32, exclusive_ratio=0.1, seed=3)


@pytest.fixture(scope="module")
def toy() -> ToyModel:
    return ToyModel(SMALL)


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_concepts": 0}, "n_concepts must be a positive integer"),
        ({"d": -4}, "d must be a positive integer"),
        ({"correlation_rank": 0}, "correlation_rank"),
        ({"n_concepts": 20, "exclusive_ratio": 0.01}, "0 exclusive concepts per model"),
        ({"exclusive_ratio": 1.0}, "exclusive_ratio must be in"),
        ({"n_concepts": 4, "exclusive_ratio": 0.99}, "no shared concepts"),
        ({"target_sparsity": 0.0}, "target_sparsity"),
        ({"n_concepts": 100, "target_sparsity": 100.0}, "target_sparsity"),
        ({"noise": -0.1}, "noise must be >= 0"),
        ({"min_probability": 1.0}, "min_probability"),
        ({"linear_std": 0.0}, "linear_std"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_raises_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToyConfig(**kwargs)


def test_defaults_follow_the_paper() -> None:
    cfg = ToyConfig()
    assert (cfg.n_concepts, cfg.d, cfg.correlation_rank) == (2048, 256, 10)
    assert cfg.n_exclusive_per_model == 51  # 2.5% of 2048 per model, 102 in total
    assert cfg.sparsity == pytest.approx(20.48)


# -- the model -----------------------------------------------------------------------


def test_partition_is_disjoint_and_complete(toy: ToyModel) -> None:
    idx = torch.cat([toy.shared_idx, toy.a_exclusive_idx, toy.b_exclusive_idx])
    assert torch.equal(idx.sort().values, torch.arange(SMALL.n_concepts))
    assert toy.a_exclusive_idx.numel() == toy.b_exclusive_idx.numel() == 13
    assert not toy.visible_b[toy.a_exclusive_idx].any()
    assert not toy.visible_a[toy.b_exclusive_idx].any()


def test_sample_shapes_and_dtypes(toy: ToyModel) -> None:
    x_a, x_b, z = toy.sample(64, torch.Generator().manual_seed(0))
    assert x_a.shape == x_b.shape == (64, SMALL.d)
    assert x_a.dtype == x_b.dtype == torch.float32
    assert z.shape == (64, SMALL.n_concepts) and z.dtype == torch.bool
    assert x_a.is_contiguous() and x_b.is_contiguous()
    assert toy.concepts_a.shape == toy.concepts_b.shape == (SMALL.n_concepts, SMALL.d)


def test_concepts_are_unit_and_b_keeps_median_norm(toy: ToyModel) -> None:
    assert torch.allclose(toy.concepts_a.norm(dim=1), torch.ones(SMALL.n_concepts), atol=1e-5)
    norms_b = toy.concepts_b[toy.visible_b].norm(dim=1)
    assert norms_b.median().item() == pytest.approx(1.0, abs=1e-5)
    assert norms_b.std() > 0.01  # an affine map, not a renormalisation of every vector


def test_b_concepts_are_an_affine_image_of_a(toy: ToyModel) -> None:
    ones = torch.ones(SMALL.n_concepts, 1)
    design = torch.cat([toy.concepts_a, ones], dim=1).double()
    fit = torch.linalg.lstsq(design, toy.concepts_b.double()).solution
    assert torch.allclose(design @ fit, toy.concepts_b.double(), atol=1e-5)


def _assert_built_from(x: torch.Tensor, z: torch.Tensor, concepts: torch.Tensor) -> None:
    """Each row of x is a [0, 1]-weighted sum of its active rows of `concepts`, nothing else."""
    for row, active in zip(x, z, strict=True):
        seen = concepts[active].T.double()
        if seen.shape[1] == 0:
            assert torch.all(row == 0)  # only the other model's exclusive concepts fired
            continue
        coef = torch.linalg.lstsq(seen, row.double()).solution
        assert torch.allclose(seen @ coef, row.double(), atol=1e-5)
        assert coef.min() > -1e-4 and coef.max() < 1 + 1e-4


def test_exclusive_concepts_are_invisible_to_the_other_model() -> None:
    toy = ToyModel(ToyConfig(n_concepts=64, d=48, exclusive_ratio=0.5, noise=0.0, seed=1))
    x_a, x_b, z = toy.sample(400, torch.Generator().manual_seed(2))
    _assert_built_from(x_a, z & toy.visible_a, toy.concepts_a)
    _assert_built_from(x_b, z & toy.visible_b, toy.concepts_b)
    only_a = (z & toy.visible_b).sum(1) == 0
    assert only_a.any()  # the case "B sees nothing" does occur at this exclusive ratio


def test_probabilities_sum_to_target_sparsity(toy: ToyModel) -> None:
    p = toy.probabilities
    assert p.min() >= SMALL.min_probability and p.max() <= 1
    slack = SMALL.n_concepts * SMALL.min_probability  # the floor can only add this much
    assert SMALL.sparsity - 1e-4 <= p.sum().item() <= SMALL.sparsity + slack + 1e-4
    _, _, z = toy.sample(20_000, torch.Generator().manual_seed(0))
    assert z.sum(1).float().mean().item() == pytest.approx(SMALL.sparsity, rel=0.03)


def test_every_sample_has_an_active_concept() -> None:
    toy = ToyModel(ToyConfig(n_concepts=128, d=16, exclusive_ratio=0.1, target_sparsity=0.1))
    _, _, z = toy.sample(5000, torch.Generator().manual_seed(0))
    assert z.any(dim=1).all()
    # Many samples are empty at this sparsity; they all get the most probable concept.
    only = z.sum(1) == 1
    assert z[only].float().argmax(1).eq(int(toy.probabilities.argmax())).float().mean() > 0.85


def test_bernoulli_events_match_probabilities() -> None:
    p = torch.tensor([1.0, 0.5, 0.05, 1e-3, 1e-9])
    rows, cols = bernoulli_events(p, 200_000, torch.Generator().manual_seed(0))
    z = torch.zeros(200_000, 5, dtype=torch.bool)
    z[rows, cols] = True
    assert z.sum().item() == rows.numel()  # no duplicate (sample, concept) pairs
    freq = z.double().mean(0)
    se = (p.double() * (1 - p.double()) / 200_000).sqrt().clamp(min=1e-6)
    assert ((freq - p.double()).abs() / se).max() < 5
    # Independence across samples: adjacent samples are uncorrelated for concept 1.
    a, b = z[:-1, 1].double(), z[1:, 1].double()
    assert abs(((a - a.mean()) * (b - b.mean())).mean().item()) < 0.01


def test_bernoulli_events_top_up_when_first_draws_fall_short(monkeypatch) -> None:
    import engine.toy.model as toy_model

    # With no margin about half the concepts run out of gaps and need a second round.
    monkeypatch.setattr(toy_model, "_GAP_SDS", 0.0)
    monkeypatch.setattr(toy_model, "_GAP_EXTRA", 1)
    p = torch.full((200,), 0.02)
    rows, cols = bernoulli_events(p, 50_000, torch.Generator().manual_seed(1))
    counts = torch.bincount(cols, minlength=200).double()
    assert torch.unique(rows * 200 + cols).numel() == rows.numel()
    assert counts.mean().item() == pytest.approx(1000, rel=0.01)
    assert counts.std().item() == pytest.approx((50_000 * 0.02 * 0.98) ** 0.5, rel=0.2)


def test_sampling_is_deterministic_given_a_generator(toy: ToyModel) -> None:
    first = toy.sample(32, torch.Generator().manual_seed(7))
    second = toy.sample(32, torch.Generator().manual_seed(7))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_batches_are_deterministic_and_resumable(toy: ToyModel) -> None:
    from_zero = list(itertools.islice(toy.batches(16, 0, seed=5), 6))
    resumed = list(itertools.islice(toy.batches(16, start_step=4, seed=5), 2))
    rebuilt = list(itertools.islice(ToyModel(SMALL).batches(16, 0, seed=5), 6))
    for (a0, b0), (a1, b1) in zip(from_zero[4:], resumed, strict=True):
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
    for (a0, b0), (a1, b1) in zip(from_zero, rebuilt, strict=True):
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
    other_seed = next(toy.batches(16, 0, seed=6))[0]
    assert not torch.equal(other_seed, from_zero[0][0])
    assert not torch.equal(from_zero[0][0], from_zero[1][0])


def test_models_with_different_seeds_differ() -> None:
    a = ToyModel(ToyConfig(n_concepts=64, d=8, exclusive_ratio=0.1, seed=0))
    b = ToyModel(ToyConfig(n_concepts=64, d=8, exclusive_ratio=0.1, seed=1))
    assert not torch.equal(a.concepts_a, b.concepts_a)


def test_sampling_throughput_smoke() -> None:
    import time

    toy = ToyModel(ToyConfig(n_concepts=512, d=64))
    gen = torch.Generator().manual_seed(0)
    toy.sample(4096, gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: its CPU time is the work, whatever the load
    try:
        times = []
        for _ in range(5):
            start = time.process_time()
            toy.sample(4096, gen)
            times.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    rate = 4096 / max(min(times), 1e-9)
    assert rate > 20_000  # a loose floor: the target (>= 200k/s) is checked in benchmarks


# -- evaluation ----------------------------------------------------------------------


def _perfect_dfc(toy: ToyModel) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One feature per concept, in the concept's own model(s), with DFC roles."""
    dec_a = toy.concepts_a * toy.visible_a[:, None]
    dec_b = toy.concepts_b * toy.visible_b[:, None] * 3.0  # a scale must not matter
    roles = ["shared"] * SMALL.n_concepts
    for i in toy.a_exclusive_idx.tolist():
        roles[i] = "a_exclusive"
    for i in toy.b_exclusive_idx.tolist():
        roles[i] = "b_exclusive"
    return dec_a, dec_b, roles


def test_perfect_decoder_recovers_everything(toy: ToyModel) -> None:
    dec_a, dec_b, roles = _perfect_dfc(toy)
    report = evaluate_recovery(toy, dec_a, dec_b, roles)
    assert report.labelling == "partition"
    assert report.exclusive_recall == report.shared_recall == report.recovery_rate == 1.0
    assert report.exclusive_recall_relnorm == 1.0
    assert report.fp_rate == report.fp_shared == report.fp_none == 0.0
    assert report.n_labelled_a == report.n_labelled_b == 13
    assert report.to_dict()["n_true_exclusive"] == 26


def test_perfect_standard_crosscoder_labels_by_relative_norm(toy: ToyModel) -> None:
    dec_a, dec_b, _ = _perfect_dfc(toy)
    report = evaluate_recovery(toy, dec_a, dec_b / 3.0, ["shared"] * SMALL.n_concepts)
    assert report.labelling == "relative_norm"
    assert report.exclusive_recall == 1.0 and report.fp_rate == 0.0
    assert (report.n_labelled_a, report.n_labelled_b) == (13, 13)


def test_random_decoder_recovers_nothing(toy: ToyModel) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    dec_a, dec_b = torch.randn(n, SMALL.d, generator=gen), torch.randn(n, SMALL.d, generator=gen)
    roles = ["a_exclusive"] * 10 + ["b_exclusive"] * 10 + ["shared"] * 20
    dec_b[:10] = 0
    dec_a[10:20] = 0
    report = evaluate_recovery(toy, dec_a, dec_b, roles)
    assert report.exclusive_recall == report.shared_recall == 0.0
    assert report.fp_none == report.fp_rate == 1.0 and report.fp_shared == 0.0
    assert report.n_labelled_exclusive == 20


def test_shared_concept_on_an_exclusive_feature_is_a_false_positive(toy: ToyModel) -> None:
    shared = toy.shared_idx[:2]
    dec_a = toy.concepts_a[shared].clone()
    dec_b = torch.zeros_like(dec_a)
    dec_b[1] = toy.concepts_b[shared[1]]
    report = evaluate_recovery(toy, dec_a, dec_b, ["a_exclusive", "shared"])
    assert report.n_labelled_a == 1 and report.n_fp_shared == 1
    assert report.fp_shared == 1.0 and report.fp_none == 0.0
    assert report.shared_recall_a == pytest.approx(2 / toy.shared_idx.numel())


def test_dfc_shared_feature_on_exclusive_concept_counts_only_for_relnorm(toy: ToyModel) -> None:
    concept = int(toy.a_exclusive_idx[0])
    dec_a = torch.zeros(2, SMALL.d)
    dec_b = torch.zeros(2, SMALL.d)
    dec_b[0] = toy.concepts_b[toy.shared_idx[0]]  # a B-exclusive feature (no A decoder)
    dec_a[1] = toy.concepts_a[concept]  # a shared feature that is A-only in all but name
    dec_b[1] = 0.01 * toy.concepts_b[toy.shared_idx[1]]
    report = evaluate_recovery(toy, dec_a, dec_b, ["b_exclusive", "shared"])
    assert report.exclusive_recall == 0.0  # the DFC's own partition never found it
    assert report.exclusive_recall_relnorm == pytest.approx(1 / 26)
    assert report.a_exclusive_recovered_any == pytest.approx(1 / 13)
    assert report.n_fp_shared == 1  # the B-exclusive feature holds a shared concept


def test_relative_norm_labelling_thresholds() -> None:
    d = 4
    unit = torch.eye(d)[:1].repeat(6, 1)
    dec_a = unit * torch.tensor([9.0, 1.0, 1.0, 9.0, 0.0, 4.1])[:, None]
    dec_b = unit * torch.tensor([1.0, 9.0, 1.0, 1.0, 0.0, 1.0])[:, None]
    roles = ["shared", "shared", "shared", "designated_shared", "shared", "shared"]
    is_a, is_b, rule = label_features(dec_a, dec_b, roles)
    assert rule == "relative_norm"
    # R = 0.9, 0.1, 0.5, 0.9 (designated: never exclusive), dead, 0.804
    assert is_a.tolist() == [True, False, False, False, False, True]
    assert is_b.tolist() == [False, True, False, False, False, False]


def test_dfc_roles_decide_labels_whatever_the_norms() -> None:
    dec = torch.ones(3, 2)
    is_a, is_b, rule = label_features(dec, dec, ["a_exclusive", "b_exclusive", "shared"])
    assert rule == "partition"
    assert is_a.tolist() == [True, False, False] and is_b.tolist() == [False, True, False]


def test_evaluation_rejects_mismatched_shapes(toy: ToyModel) -> None:
    dec = torch.zeros(3, SMALL.d)
    with pytest.raises(ValueError, match="decoder_b must have shape"):
        evaluate_recovery(toy, dec, torch.zeros(3, SMALL.d + 1), ["shared"] * 3)
    with pytest.raises(ValueError, match="n_features=2"):
        evaluate_recovery(toy, dec, dec, ["shared"] * 2)


# -- sweep ---------------------------------------------------------------------------


def _fake_run(cfg, toy, architecture, n_features, seed):
    """A stand-in for training: deterministic numbers per run."""
    value = (n_features / 1000) + (0.1 if architecture == "dfc" else 0.0) + seed / 100
    return {
        "exclusive_recall": value,
        "exclusive_recall_relnorm": value,
        "shared_recall": 0.5,
        "fp_rate": 0.3,
        "fp_shared": 0.1,
        "fp_none": 0.2,
        "fve": 0.9,
    }


def test_sweep_writes_outputs_and_resumes(tmp_path) -> None:
    toy_cfg = ToyConfig(n_concepts=64, d=8, exclusive_ratio=0.1)
    cfg = SweepConfig(toy=toy_cfg, sizes=[16, 32], seeds=[0, 1], out_dir=str(tmp_path))
    calls = []

    def counting(*args):
        calls.append(args[2:])
        return _fake_run(*args)

    results = run_sweep(cfg, progress=False, run_fn=counting)
    assert len(results) == len(calls) == 2 * 2 * 3
    for name in ("results.csv", "results.json", "summary.csv", "figure.html"):
        assert (tmp_path / name).is_file()
    summary = pd.read_csv(tmp_path / "summary.csv")
    dfc16 = summary[(summary.architecture == "dfc") & (summary.n_features == 16)].iloc[0]
    assert dfc16["exclusive_recall_mean"] == pytest.approx(0.016 + 0.1 + 0.005)
    assert dfc16["exclusive_recall_se"] == pytest.approx(0.005)  # std 0.00707 / sqrt(2)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["sizes"] == [16, 32]
    assert "plotly" in (tmp_path / "figure.html").read_text()[:5_000_000].lower()

    calls.clear()
    bigger = SweepConfig(toy=toy_cfg, sizes=[16, 32, 48], seeds=[0, 1], out_dir=str(tmp_path))
    again = run_sweep(bigger, progress=False, run_fn=counting)
    assert sorted(c[1] for c in calls) == [48] * 6  # only the new size ran
    assert len(again) == 18
    assert "excl recall" in format_table(summarize(again))


def test_sweep_refuses_to_mix_settings(tmp_path) -> None:
    toy_cfg = ToyConfig(n_concepts=64, d=8, exclusive_ratio=0.1)
    cfg = SweepConfig(toy=toy_cfg, sizes=[16], seeds=[0], out_dir=str(tmp_path))
    run_sweep(cfg, progress=False, run_fn=_fake_run)
    changed = SweepConfig(toy=toy_cfg, sizes=[16], seeds=[0], lr=1.0, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"different settings.*lr"):
        run_sweep(changed, progress=False, run_fn=_fake_run)
    argv = ["--out", str(tmp_path), "--n-concepts", "64", "--d", "8", "--lr", "1.0"]
    assert main(argv) == 2


def test_sweep_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        SweepConfig(architectures=["dfc", "magic"])
    with pytest.raises(ValueError, match="exceeds the smallest dictionary size"):
        SweepConfig(sizes=[2, 64])
    with pytest.raises(SystemExit):
        main(["--architectures", "nope", "--out", "/nonexistent/x"])


def test_tiny_real_sweep(tmp_path, capsys) -> None:
    pytest.importorskip("engine.crosscoder.trainer")
    argv = ["--out", str(tmp_path), "--n-concepts", "64", "--d", "16", "--sizes", "32"]
    argv += ["--seeds", "0", "--steps", "30", "--batch-size", "128", "--no-progress"]
    assert main(argv) == 0
    results = pd.read_csv(tmp_path / "results.csv")
    assert sorted(results.architecture) == ["dfc", "dsf", "standard"]
    assert results[["exclusive_recall", "fp_rate", "fve"]].notna().all().all()
    assert "dfc" in capsys.readouterr().out
