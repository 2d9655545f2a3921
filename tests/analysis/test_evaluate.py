"""CE loss recovered (`modeldiff evaluate`) on a tiny analysed run: the splice mechanics,
the held-out windows it uses, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.analysis.evaluate import (
    EVALUATION_FILE,
    EvaluationError,
    evaluate,
    read_evaluation,
    spliced_ce,
)
from engine.cli import main
from engine.models.loading import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_run import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny"), train_steps=10)


@pytest.fixture(scope="module")
def models(tiny):
    return {side: load_model(d) for side, d in zip("ab", tiny.model_dirs, strict=True)}


def test_splicing_the_clean_activations_gives_the_clean_loss(models):
    model = models["a"].model
    ids = torch.arange(5, 45)
    positions = torch.arange(3, 30)
    clean, live = spliced_ce(model, 1, ids, positions, None)
    # Writing the block's own output back changes nothing; erasing it changes the loss.
    same, _ = spliced_ce(model, 1, ids, positions, live)
    assert same == pytest.approx(clean, rel=1e-6)
    erased, _ = spliced_ce(model, 1, ids, positions, torch.zeros_like(live))
    assert erased != pytest.approx(clean, rel=1e-3)
    # The loss is the summed next-token cross-entropy of the predictions at `positions`.
    with torch.inference_mode():
        logits = model(input_ids=ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(
        logits[positions], ids[positions + 1], reduction="sum"
    )
    assert clean == pytest.approx(float(expected), rel=1e-5)


def test_evaluate_measures_both_models_on_the_held_out_windows(tiny, models, tmp_path):
    header = json.loads((tiny.run_dir / "crosscoder.json").read_text())
    held = header["validation"]["windows"]
    out = tmp_path / "evaluation.json"
    result = evaluate(tiny.run_dir, tiny.store, max_windows=2, out=out, models=models)
    assert json.loads(out.read_text()) == result
    assert result["held_out"] and result["windows"] == held[:2]
    for side in ("a", "b"):
        m = result["models"][side]
        assert m["tokens"] > 0
        for key in ("ce_clean", "ce_spliced", "ce_ablated", "fve"):
            assert math.isfinite(m[key]), key
        gap = m["ce_ablated"] - m["ce_clean"]  # random tiny models: ablating may not hurt
        expected = (m["ce_ablated"] - m["ce_spliced"]) / gap if gap > 0 else None
        assert m["ce_loss_recovered"] == pytest.approx(expected)
        # The live activations are the stored ones (a float32 store: rounding only).
        assert m["store_drift"] < 1e-3
    assert read_evaluation(tmp_path) == result


def test_a_run_that_held_nothing_out_needs_allow_trained(tiny, models, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny.run_dir, run)
    header = json.loads((run / "crosscoder.json").read_text())
    del header["validation"]
    (run / "crosscoder.json").write_text(json.dumps(header))
    with pytest.raises(EvaluationError, match="--allow-trained"):
        evaluate(run, tiny.store, models=models)
    result = evaluate(run, tiny.store, max_windows=1, allow_trained=True, models=models)
    assert result["held_out"] is False and result["windows"] == [0]
    assert (run / EVALUATION_FILE).is_file()


def test_cli_evaluate_writes_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["evaluate", "--run", str(tiny.run_dir), "--store", str(tiny.store)]
    assert main([*args, "--windows", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CE loss recovered on 1 held-out windows" in printed and "model B" in printed
    assert out.is_file()
    with pytest.raises(SystemExit):  # argparse refuses it
        main([*args, "--windows", "0"])
