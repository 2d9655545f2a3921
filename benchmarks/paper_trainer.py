"""The paper's own DFC trainer, timed by `benchmarks/train_step.py` (impl `paper`).

The published code (`superkaiba/dfc_learning`, a fork of `dictionary_learning`) trains a
DFC with `BatchTopKCrossCoderTrainer` and `DedicatedFeatureBatchTopKCrossCoder`. Its
package `__init__` imports modules the trainer never uses: `nnsight` (buffer.py),
`datasets` and `zstandard` (utils.py). Those are replaced by empty stub modules in
`sys.modules`, only inside the benchmark's child process that runs this impl; `einops`
and `huggingface_hub`, which the dictionary classes do use, must be installed
(`pip install einops`).

Its crosscoder has one hidden size for both models, so it runs at d = max(d_a, d_b) for
both, the narrower model's activations padded with zeros: slightly more encoder and
decoder work than the engine does at d_a + d_b. Otherwise it runs as published (its own
Adam, BatchTopK, AuxK and clipping) with the benchmark's dictionary size, k, and k_aux
(`top_k_aux`, which it otherwise sets to d / 2), the threshold EMA from the first step,
and the same features held dead (`num_tokens_since_fired`) as the engine's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

MIRROR = Path("/work/.mirror/superkaiba+dfc_learning/repo")
_STUBS = {
    "nnsight": ("LanguageModel",),
    "datasets": ("load_dataset", "Dataset"),
    "zstandard": (),
}


def default_location() -> str | None:
    """$MODELDIFF_PAPER_CODE, else the local mirror of the paper's repository if present."""
    return os.environ.get("MODELDIFF_PAPER_CODE") or (str(MIRROR) if MIRROR.exists() else None)


def work_tree(location: str) -> Path:
    """A directory holding `dictionary_learning/`: `location` itself, or an extraction of
    the HEAD of the git repository at `location` into the temporary directory (kept, and
    reused while HEAD stays the same)."""
    path = Path(location)
    if (path / "dictionary_learning").is_dir():
        return path
    git = ["git", "-C", str(path)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    out = Path(tempfile.gettempdir()) / f"dfc_learning_{head.stdout.strip()[:12]}"
    if not (out / "dictionary_learning").is_dir():
        staging = Path(tempfile.mkdtemp(prefix="dfc_learning_"))
        archive = subprocess.run([*git, "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive.stdout, check=True)
        if not (staging / "dictionary_learning").is_dir():
            raise FileNotFoundError(f"no dictionary_learning/ in {location}")
        try:
            staging.replace(out)  # atomic: a concurrent run sees all of it or none
        except OSError:  # another run got there first
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _import_trainer(root: Path):
    """The paper's trainer and DFC classes, with stubs for the imports they never use."""
    for name, attrs in _STUBS.items():
        if name not in sys.modules:
            stub = types.ModuleType(name)
            for attr in attrs:
                setattr(stub, attr, None)
            sys.modules[name] = stub
    sys.path.insert(0, str(root))
    from dictionary_learning.dictionary import DedicatedFeatureBatchTopKCrossCoder
    from dictionary_learning.trainers.crosscoder import BatchTopKCrossCoderTrainer

    return BatchTopKCrossCoderTrainer, DedicatedFeatureBatchTopKCrossCoder


def paper_trainer(root: Path, cfg: dict, device: torch.device, dead_fraction: float):
    """The paper's trainer at `cfg`'s dictionary size, k and k_aux, DFC 5% / 5% / 90%."""
    trainer_cls, dfc_cls = _import_trainer(root)
    trainer = trainer_cls(
        steps=10**9,
        activation_dim=max(cfg["d_a"], cfg["d_b"]),
        dict_size=cfg["n_features"],
        k=cfg["k"],
        layer=0,
        lm_name="benchmark",
        dict_class=dfc_cls,
        dict_class_kwargs={"model_a_exclusive_pct": 0.05, "model_b_exclusive_pct": 0.05},
        lr=1e-4,
        warmup_steps=0,
        threshold_start_step=0,  # the threshold EMA every step, as the engine does
        seed=0,
        device=str(device),
    )
    trainer.top_k_aux = cfg["k_aux"]  # its default is activation_dim // 2
    n_dead = int(dead_fraction * cfg["n_features"])
    dead = torch.randperm(cfg["n_features"], generator=torch.Generator().manual_seed(1))[:n_dead]
    return trainer, dead.to(device)


def padded_batch(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """[n, 2, d] input of the paper's crosscoder, the narrower model zero-padded to d."""
    d = max(x_a.shape[1], x_b.shape[1])
    x = x_a.new_zeros(x_a.shape[0], 2, d)
    x[:, 0, : x_a.shape[1]] = x_a
    x[:, 1, : x_b.shape[1]] = x_b
    return x
