"""An analysed run on tiny models saved to disk: harvest -> train -> analyze, end to end.

The models are random (the tiny Llama and Gemma 3 of tests/conftest.py) but use the real
demo tokenizers, and they are saved as Hugging Face directories, so every command that loads
models by name works on them as it would on real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN = "tiny"


@dataclass(frozen=True)
class TinyRun:
    """Paths of a tiny analysed run."""

    db: Path
    store: Path
    run_dir: Path
    model_dirs: tuple[str, str]
    run_id: str = RUN


def build_tiny_run(tmp_path: Path, train_steps: int = 30) -> TinyRun:
    """Harvest, train and analyse a DFC on two tiny saved models; return the paths."""
    from engine.activations import ActivationStore
    from engine.analysis.analyze import analyze
    from engine.config import CrosscoderConfig, HarvestConfig, TrainConfig
    from engine.crosscoder.training import train
    from engine.harvest.pipeline import harvest
    from engine.models.loading import load_model
    from tests.conftest import save_tiny_pair

    dirs = [str(d) for d in save_tiny_pair(tmp_path).values()]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river {i} runs past the stone and the bird." for i in range(60)))
    cfg = HarvestConfig(
        sources=[str(text)], max_pairs=2000, context_length=64, store_dtype="float32"
    )
    models = (load_model(dirs[0]), load_model(dirs[1]))
    harvest(cfg, tmp_path / "store", models=models, progress=False)
    train(
        CrosscoderConfig(
            d_a=32, d_b=24, n_features=64, a_exclusive=16, b_exclusive=8, score_weighting="mean"
        ),
        TrainConfig(
            steps=train_steps,
            batch_size=64,
            k=4,
            k_initial=None,
            warmup_steps=2,
            checkpoint_every=100,
            log_every=10,
        ),
        ActivationStore(tmp_path / "store"),
        out_dir=tmp_path / "run",
        progress=False,
    )
    db = tmp_path / "r.duckdb"
    analyze(tmp_path / "run", tmp_path / "store", db, run_id=RUN, progress=False)
    return TinyRun(db, tmp_path / "store", tmp_path / "run", (dirs[0], dirs[1]))
