"""Moving lopsided shared features into the exclusive partitions during DFC training."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, CrosscoderConfig, TrainConfig
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.reassign import adapt, leaning, reassign
from engine.crosscoder.relayout import resize
from engine.crosscoder.trainer import Trainer
from engine.crosscoder.training import train
from engine.partition import Partition

D_A, D_B = 12, 10
WINDOW = 100


def _lopsided_dfc() -> tuple[Crosscoder, torch.optim.Optimizer]:
    """A DFC [A-excl 0-1 | B-excl 2-3 | shared 4-9] with shared feature 6 almost A-only
    and shared feature 8 almost B-only; Adam moments filled with recognisable values."""
    torch.manual_seed(0)
    cc = Crosscoder(D_A, D_B, Partition(2, 2, 6))
    with torch.no_grad():
        cc.w_dec_b[2 + 2] *= 0.05  # shared feature 6 is B row 4
        cc.w_dec_a[2 + 4] *= 0.05  # shared feature 8 is A row 6
        cc.b_enc.copy_(torch.arange(10.0))
        cc.b_dec_b.fill_(1.0)
    opt = torch.optim.Adam(cc.parameters())
    for p in cc.parameters():
        opt.state[p] = {
            "exp_avg": torch.rand_like(p),
            "exp_avg_sq": torch.rand_like(p),
            "step": torch.tensor(3.0),
        }
    return cc, opt


def test_leaning_labels_only_shared_features_beyond_the_bounds():
    cc, _ = _lopsided_dfc()
    labels = leaning(cc, 0.2, 0.8)
    assert labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 2, 0]


def test_a_lopsided_feature_moves_to_a_dead_a_exclusive_slot_after_two_checks():
    cc, opt = _lopsided_dfc()
    since = torch.zeros(10, dtype=torch.long)
    since[1] = WINDOW  # A-exclusive feature 1 is dead
    since[6] = 7
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in cc.named_parameters()}
    adam_enc_a = opt.state[cc.w_enc_a]["exp_avg"].clone()
    args = (since, WINDOW, 0.2, 0.8, gen, 0.4)

    moves, labels = reassign(cc, opt, since, torch.zeros(10, dtype=torch.int8), *args[1:])
    assert (moves.to_a, moves.to_b) == (0, 0)  # lopsided once is not enough
    moves, labels = reassign(cc, opt, since, labels, *args[1:])
    assert (moves.to_a, moves.to_b) == (1, 0)  # no B-exclusive slot is dead

    # Slot 1 now holds feature 6's A encoder/decoder rows (A row 4) and their moments.
    assert torch.equal(cc.w_dec_a[1], before["w_dec_a"][4])
    assert torch.equal(cc.w_enc_a[1], before["w_enc_a"][4])
    assert torch.equal(opt.state[cc.w_enc_a]["exp_avg"][1], adam_enc_a[4])
    # Its B encoder's contribution at B's mean (b_dec_b = 1) is folded into the bias.
    fold = before["w_enc_b"][4].sum()
    assert cc.b_enc[1].item() == pytest.approx(6.0 + fold.item(), rel=1e-6)
    assert since[1] == 7
    # The shared slot starts over: fresh decoders at the init norm, zero bias and moments,
    # dead so that AuxK trains it.
    assert cc.w_dec_a[4].norm().item() == pytest.approx(0.4, rel=1e-5)
    assert cc.w_dec_b[4].norm().item() == pytest.approx(0.4, rel=1e-5)
    assert torch.equal(cc.w_enc_b[4], cc.w_dec_b[4])
    assert cc.b_enc[6] == 0 and since[6] == WINDOW
    assert torch.count_nonzero(opt.state[cc.w_dec_a]["exp_avg"][4]) == 0
    assert labels[6] == 0
    # Features that were not involved are untouched.
    for name in ("w_dec_a", "w_enc_a"):
        keep = [0, 2, 3, 5, 6, 7]
        assert torch.equal(getattr(cc, name)[keep], before[name][keep])


def test_dead_shared_features_and_full_partitions_stay_put():
    cc, opt = _lopsided_dfc()
    gen = torch.Generator().manual_seed(0)
    since = torch.full((10,), WINDOW, dtype=torch.long)  # everything dead, 6 and 8 too
    labels = leaning(cc, 0.2, 0.8)
    moves, _ = reassign(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4)
    assert (moves.to_a, moves.to_b) == (0, 0)
    since.zero_()  # everything live: no free exclusive slot
    moves, _ = reassign(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4)
    assert (moves.to_a, moves.to_b) == (0, 0)


def test_b_lopsided_feature_moves_to_b_exclusive():
    cc, opt = _lopsided_dfc()
    gen = torch.Generator().manual_seed(0)
    since = torch.zeros(10, dtype=torch.long)
    since[2] = WINDOW  # B-exclusive feature 2 (B row 0) is dead
    before = cc.w_dec_b[6].detach().clone()  # feature 8 is B row 2 + 4
    labels = leaning(cc, 0.2, 0.8)
    moves, _ = reassign(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4)
    assert (moves.to_a, moves.to_b) == (0, 1)
    assert torch.equal(cc.w_dec_b[0], before)


def _pre(cc: Crosscoder, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cc.pre_activations(x_a, x_b)


def test_min_lean_holds_back_features_whose_other_decoder_is_not_negligible():
    cc, opt = _lopsided_dfc()
    with torch.no_grad():
        cc.w_dec_a[6] *= 0.2  # feature 8 (A row 6) leans to B even more than 6 to A
    since = torch.zeros(10, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    rel = cc.relative_decoder_norm()
    lean_6, lean_8 = float(rel[6]), float(1 - rel[8])
    assert 0.9 < lean_6 < lean_8 - 0.02
    labels = leaning(cc, 0.2, 0.8)
    args = (cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4, (3, 3))
    # A bar above both leans holds both back (the labels still carry over) ...
    moves, kept, order = adapt(*args, min_lean=max(lean_6, lean_8) + 1e-3)
    assert order is None and (moves.to_a, moves.to_b) == (0, 0) and torch.equal(kept, labels)
    # ... a bar between them lets only the more lopsided one move.
    moves, _, _ = adapt(*args, min_lean=(lean_6 + lean_8) / 2)
    assert (moves.to_a, moves.to_b) == (0, 1)


def test_adaptive_move_changes_the_role_in_place_and_keeps_every_other_feature():
    cc, opt = _lopsided_dfc()
    since = torch.zeros(10, dtype=torch.long)
    since[6] = 7
    gen = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(5, D_A), torch.randn(5, D_B)
    pre_before, dec_a_before = _pre(cc, x_a, x_b), cc.decoder_matrix("a")
    adam_before = opt.state[cc.w_enc_a]["exp_avg"].clone()
    enc_b_6 = cc.w_enc_b[4].detach().clone()

    labels = leaning(cc, 0.2, 0.8)
    full = adapt(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2))
    assert full[2] is None  # both exclusive partitions are at their configured size
    moves, labels, order = adapt(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4, (3, 3))
    # Below capacity no dead slot is needed: 6 becomes A-exclusive, 8 B-exclusive.
    assert (moves.to_a, moves.to_b, moves.recycled) == (1, 1, 0)
    assert cc.partition == Partition(3, 3, 4)
    assert order.tolist() == [0, 1, 6, 2, 3, 8, 4, 5, 7, 9]
    assert since[2] == 7 and labels[2] == 0 and labels[5] == 0
    assert cc.rows_in_b[2] == -1 and cc.rows_in_a[5] == -1
    assert cc.w_dec_a.shape == (7, D_A) and cc.w_dec_b.shape == (7, D_B)
    # The moved feature keeps its A decoder and Adam moments (A row 4 before, 2 now) ...
    assert torch.equal(cc.decoder_matrix("a")[2], dec_a_before[6])
    assert torch.equal(opt.state[cc.w_enc_a]["exp_avg"][2], adam_before[4])
    # ... and reads the same pre-activation at B's mean (b_dec_b = 1) as before.
    assert cc.b_enc[2].item() == pytest.approx(6.0 + enc_b_6.sum().item(), rel=1e-6)
    # Every feature that kept its role computes exactly what it did.
    pre_after = _pre(cc, x_a, x_b)
    kept = [i for i in range(10) if order[i] not in (6, 8)]
    assert torch.allclose(pre_after[:, kept], pre_before[:, order[kept]], atol=1e-6)
    assert torch.equal(cc.decoder_matrix("a")[kept], dec_a_before[order[kept]])


def test_adaptive_partitions_recycle_dead_exclusive_features_into_shared_but_keep_one():
    cc, opt = _lopsided_dfc()
    gen = torch.Generator().manual_seed(0)
    since = torch.zeros(10, dtype=torch.long)
    since[[0, 1, 3]] = WINDOW  # both A-exclusive features and one B-exclusive are dead
    nothing = torch.zeros(10, dtype=torch.int8)
    # With patience, features dead for one window only stay (AuxK may revive them).
    patient = adapt(cc, opt, since, nothing, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2), 2 * WINDOW)
    assert patient[2] is None and cc.partition == Partition(2, 2, 6)
    moves, labels, order = adapt(cc, opt, since, nothing, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2))
    assert (moves.to_a, moves.to_b, moves.recycled) == (0, 0, 2)
    assert cc.partition == Partition(1, 1, 8)  # one dead A-exclusive feature stays
    assert order.tolist()[:4] == [0, 2, 1, 3]  # shared block starts with the recycled
    # The recycled features start over as shared: both decoders at the init norm,
    # encoders their copies, zero bias and moments, dead (AuxK trains them).
    for new in (2, 3):
        assert cc.decoder_matrix("a")[new].norm().item() == pytest.approx(0.4, rel=1e-5)
        assert cc.decoder_matrix("b")[new].norm().item() == pytest.approx(0.4, rel=1e-5)
        assert cc.b_enc[new] == 0 and since[new] == WINDOW
        row = int(cc.rows_in_b[new])
        assert torch.equal(cc.w_enc_b[row], cc.w_dec_b[row])
        assert torch.count_nonzero(opt.state[cc.w_dec_b]["exp_avg"][row]) == 0
    # Nothing to do: no relayout.
    since.zero_()
    labels = torch.zeros(10, dtype=torch.int8)
    moves, _, order = adapt(cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2))
    assert order is None and (moves.to_a, moves.to_b, moves.recycled) == (0, 0, 0)


def test_recycled_features_can_start_from_the_worst_reconstructed_examples():
    cc, opt = _lopsided_dfc()
    gen = torch.Generator().manual_seed(0)
    since = torch.zeros(10, dtype=torch.long)
    since[[0, 3]] = WINDOW  # one dead feature in each exclusive partition
    nothing = torch.zeros(10, dtype=torch.int8)
    # Only example 2 is badly reconstructed: every recycled feature starts from its errors.
    err_a, err_b = torch.zeros(5, D_A), torch.zeros(5, D_B)
    err_a[2], err_b[2] = torch.randn(D_A), torch.randn(D_B)
    moves, _, _ = adapt(
        cc, opt, since, nothing, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2), None, (err_a, err_b)
    )
    assert moves.recycled == 2 and cc.partition == Partition(1, 1, 8)
    for new in (2, 3):  # the recycled features open the shared block
        for name, err in (("a", err_a[2]), ("b", err_b[2])):
            row = cc.decoder_matrix(name)[new]
            assert row.norm().item() == pytest.approx(0.4, rel=1e-5)
            cos = torch.nn.functional.cosine_similarity(row, err, dim=0)
            assert cos.item() == pytest.approx(1.0, abs=1e-5)
        assert cc.b_enc[new] == 0


def test_exclusive_start_shrinks_only_adaptive_exclusive_blocks_to_at_least_one():
    cfg = CrosscoderConfig(d_a=D_A, d_b=D_B, n_features=64, a_exclusive=8, b_exclusive=3)
    start = Trainer(
        cfg, TrainConfig(exclusive_start=0.25, k=4, k_initial=None, device="cpu")
    ).model.partition
    assert start == Partition(2, 1, 61)
    fixed = TrainConfig(
        exclusive_start=0.25, adapt_partitions=False, k=4, k_initial=None, device="cpu"
    )
    assert Trainer(cfg, fixed).model.partition == Partition(8, 3, 53)


def test_the_first_reassignment_check_waits_for_reassign_after():
    assert (
        TrainConfig(reassign_after="anneal", k=8, k_initial=64, anneal_steps=300).first_reassignment
        == 300
    )
    assert TrainConfig(reassign_after="anneal", k_initial=None).first_reassignment == 0
    assert TrainConfig(reassign_after=40).first_reassignment == 40
    with pytest.raises(ConfigError, match="reassign_after"):
        TrainConfig(reassign_after=-1)
    # No check before it: nothing moves in a run that ends first.
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(1024, D_A, generator=g), torch.randn(1024, D_B, generator=g))
    model = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_features=32, architecture="dfc", a_exclusive=4, b_exclusive=4
    )
    cfg = TrainConfig(
        steps=30, batch_size=64, k=4, k_initial=None, lr=1e-2, k_aux=8, dead_window_tokens=64,
        log_every=10, checkpoint_every=30, device="cpu", reassign_every=5, reassign_after=31,
    )  # fmt: skip
    run = train(model, cfg, data, progress=False)
    assert (
        run.final["moved_to_a"] == run.final["moved_to_b"] == run.final["recycled_to_shared"] == 0
    )
    assert run.crosscoder.partition == model.partition()


def test_partitions_settle_after_reassign_stop():
    cfg = TrainConfig(steps=2000, reassign_every=100, reassign_stop=0.9)
    assert cfg.reassigns_at(2000) and not cfg.reassigns_at(1950)
    assert not cfg.settling(1800) and cfg.settling(1900)
    assert not TrainConfig(reassign_every=0).reassigns_at(100)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="reassign_stop"):
            TrainConfig(reassign_stop=bad)
    for bad in (0.5, 1.1):
        with pytest.raises(ConfigError, match="late_lean"):
            TrainConfig(late_lean=bad)
    # A run that recycles and moves does neither once settling, when no feature can lean
    # enough (late_lean = 1: only a feature without any other decoder would move).
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(1024, D_A, generator=g), torch.randn(1024, D_B, generator=g))
    model = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_features=32, architecture="dfc", a_exclusive=4, b_exclusive=4
    )
    runs = {}
    for stop in (1.0, 0.1):
        cfg = TrainConfig(
            steps=30, batch_size=64, k=4, k_initial=None, lr=1e-2, k_aux=8,
            dead_window_tokens=64, log_every=10, checkpoint_every=30, device="cpu",
            reassign_every=5, reassign_stop=stop, late_lean=1.0,
        )  # fmt: skip
        runs[stop] = train(model, cfg, data, progress=False).final
    assert runs[1.0]["recycled_to_shared"] + runs[1.0]["moved_to_a"] + runs[1.0]["moved_to_b"] > 0
    assert runs[0.1]["recycled_to_shared"] == runs[0.1]["moved_to_a"] == 0
    assert runs[0.1]["moved_to_b"] == runs[0.1]["swapped_to_shared"] == 0


def test_recycle_init_and_exclusive_start_are_validated():
    with pytest.raises(ConfigError, match="recycle_init"):
        TrainConfig(recycle_init="zeros")
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="exclusive_start"):
            TrainConfig(exclusive_start=bad)
    for bad in (0, -0.5, "1"):
        with pytest.raises(ConfigError, match="recycle_after_windows"):
            TrainConfig(recycle_after_windows=bad)
    assert TrainConfig(recycle_after_windows=0.2).recycle_after_windows == 0.2


def test_resize_gives_the_block_sizes_of_a_checkpoint():
    cc, opt = _lopsided_dfc()
    resize(cc, opt, Partition(1, 4, 5))
    assert cc.w_dec_a.shape == (6, D_A) and cc.w_dec_b.shape == (9, D_B)
    assert cc.b_enc.shape == (10,) and cc.partition == Partition(1, 4, 5)
    with pytest.raises(ValueError, match="cannot resize"):
        resize(cc, opt, Partition(1, 1, 5))


@pytest.mark.parametrize(
    ("adapt_partitions", "recycle_init", "exclusive_start", "swap_margin"),
    [
        (True, "random", 1.0, 0.05),
        (False, "random", 1.0, 0.05),
        (True, "residual", 1.0, 0.5),
        (True, "random", 0.25, 0.5),
        (True, "random", 0.25, 0.0),
    ],
)
def test_training_with_reassignment_moves_an_a_only_concept_and_resumes_exactly(
    tmp_path, adapt_partitions, recycle_init, exclusive_start, swap_margin
):
    # Three strong concepts only A has, each on 5% of rows, among shared ones.
    g = torch.Generator().manual_seed(1)
    n, c = 4096, 40
    z = (torch.rand(n, c, generator=g) < 0.05).float() * torch.rand(n, c, generator=g)
    c_a, c_b = torch.randn(c, D_A, generator=g), torch.randn(c, D_B, generator=g)
    c_b[-3:] = 0
    c_a[-3:] *= 2
    data = (z @ c_a, z @ c_b)
    model = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_features=64, architecture="dfc", a_exclusive=4, b_exclusive=4
    )
    kw = dict(
        steps=150,
        batch_size=256,
        k=4,
        k_initial=12,
        anneal_steps=20,
        lr=1e-2,
        warmup_steps=5,
        k_aux=16,
        dead_window_tokens=256 * 10,
        log_every=10,
        checkpoint_every=20,
        device="cpu",
        reassign_every=10,
        adapt_partitions=adapt_partitions,
        recycle_init=recycle_init,
        exclusive_start=exclusive_start,
        swap_margin=swap_margin,
        # Checks to the end: with a share of `steps`, the cut run's checks would stop early.
        reassign_stop=1.0,
    )
    full = train(model, TrainConfig(**kw), data, out_dir=tmp_path / "full", progress=False)
    assert full.final["moved_to_a"] + full.final["moved_to_b"] > 0
    assert "moved_to_a" in full.history[-1]
    # Resuming from the step-100 checkpoint reproduces the uninterrupted run exactly.
    short = train(
        model, TrainConfig(**{**kw, "steps": 100}), data, tmp_path / "cut", progress=False
    )
    assert short.final["steps"] == 100
    resumed = train(model, TrainConfig(**kw), data, tmp_path / "cut", progress=False)
    assert resumed.crosscoder.partition == full.crosscoder.partition
    for name, tensor in full.crosscoder.state_dict().items():
        assert torch.equal(tensor, resumed.crosscoder.state_dict()[name]), name
    if adapt_partitions:  # the partitions adapted before the checkpoint it resumed from
        assert short.crosscoder.partition != model.partition()
    final = full.crosscoder.partition
    assert final.n_a_exclusive <= 4 and final.n_b_exclusive <= 4  # never beyond capacity
    if exclusive_start < 1:  # started with one feature each, grew by moves
        assert final.n_a_exclusive > 1 and full.final["moved_to_a"] >= final.n_a_exclusive - 1
    if adapt_partitions:
        assert "swapped_to_shared" in full.final


def test_reassignment_bounds_are_validated():
    with pytest.raises(ConfigError, match="reassign_low and reassign_high"):
        TrainConfig(reassign_low=0.6)
    with pytest.raises(ConfigError, match="reassign_every"):
        TrainConfig(reassign_every=-1)


def test_equal_score_steps_rank_by_the_mean_decoder_norm_then_by_the_crosscoders_own():
    cfg = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_features=32, architecture="dfc", a_exclusive=8, b_exclusive=8
    )
    train_cfg = TrainConfig(k=2, k_initial=None, device="cpu", equal_score_steps=3)
    trainer = Trainer(cfg, train_cfg)
    model = trainer.model
    pre = torch.ones(1, 32)
    # Equal decoder norms at initialisation: the mean weighting scores every feature alike,
    # the sum weighting gives an exclusive feature half a shared feature's score.
    averaged = model.selection_scores(pre, trainer._weighting())
    assert torch.allclose(averaged[0, :16], averaged[0, 16:].mean().expand(16), rtol=1e-4)
    trainer.counters.step = 3
    assert trainer._weighting() is None
    summed = model.selection_scores(pre, trainer._weighting())
    assert torch.allclose(summed[0, :16] * 2, summed[0, 16:].mean().expand(16), rtol=1e-4)
    with pytest.raises(ConfigError, match="equal_score_steps"):
        TrainConfig(equal_score_steps=-1)


def test_with_equal_score_steps_exclusive_features_fire_from_the_first_steps():
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(2048, D_A, generator=g), torch.randn(2048, D_B, generator=g))
    model = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_features=64, architecture="dfc", a_exclusive=8, b_exclusive=8,
        decoder_init_norm=0.4,
    )  # fmt: skip

    def exclusive_fired(equal_steps: int) -> int:
        cfg = TrainConfig(
            steps=10, batch_size=64, k=2, k_initial=None, lr=1e-3, k_aux=0, log_every=10,
            checkpoint_every=10, device="cpu", reassign_every=0, equal_score_steps=equal_steps,
            dead_window_tokens=10_000,
        )  # fmt: skip
        trainer = Trainer(model, cfg)
        for i in range(10):
            trainer.step(data[0][i * 64 : (i + 1) * 64], data[1][i * 64 : (i + 1) * 64])
        return int((trainer.since_fired[:16] < 640).sum())

    assert exclusive_fired(0) < exclusive_fired(10)


def test_a_full_partition_swaps_its_least_lopsided_member_for_a_more_lopsided_candidate():
    cc, opt = _lopsided_dfc()
    since = torch.zeros(10, dtype=torch.long)  # everything is live: A-exclusive is full
    gen = torch.Generator().manual_seed(0)
    dec_a_before = cc.decoder_matrix("a")
    # Feature 1 moved in leaning 0.7, feature 0 started exclusive (1.0, never swapped).
    lean = torch.ones(10)
    lean[1] = 0.7
    rel_6 = float(cc.relative_decoder_norm()[6])
    assert rel_6 > 0.9
    labels = leaning(cc, 0.2, 0.8)
    args = (cc, opt, since, labels, WINDOW, 0.2, 0.8, gen, 0.4, (2, 2))
    # Without swaps, or with a margin the candidate does not clear, nothing changes.
    assert adapt(*args)[2] is None
    high_bar = rel_6 - 0.7 + 0.01
    assert adapt(*args, lean_at_move=lean.clone(), swap_margin=high_bar)[2] is None
    moves, labels, order = adapt(*args, lean_at_move=lean, swap_margin=0.05)
    assert (moves.to_a, moves.to_b, moves.swapped) == (1, 0, 1)
    assert cc.partition == Partition(2, 2, 6)
    assert order.tolist()[:2] == [0, 6]  # 6 took 1's place; 1 is shared now
    assert lean[1].item() == pytest.approx(rel_6)  # new member 1 (was 6) leant rel_6
    old_1 = order.tolist().index(1)
    assert old_1 >= 4 and labels[old_1] == 0 and labels[1] == 0
    # The swapped-out feature keeps its A decoder and gains a fresh B decoder.
    assert torch.equal(cc.decoder_matrix("a")[old_1], dec_a_before[1])
    assert cc.decoder_matrix("b")[old_1].norm().item() == pytest.approx(0.4, rel=1e-5)
    for bad in (-0.1, 0.6, None):
        with pytest.raises(ConfigError, match="swap_margin"):
            TrainConfig(swap_margin=bad)
