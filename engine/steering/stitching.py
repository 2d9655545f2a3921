"""Model stitching (paper B.5): affine maps between two models' activation spaces.

A->B (``W_ab x + b_ab``) and B->A are trained jointly on paired activations with MSE in
both directions plus an inversion penalty (A->B->A and B->A->B should return the input).
Each model is first divided by its median activation norm (times sqrt(d), so coordinates
are O(1)) so that neither direction's loss dominates; the scales are kept in the
``Stitch`` and every public method takes and returns raw model units. Training starts
from the closed-form least-squares maps, so a few hundred steps are enough.

A stitch is independent of any crosscoder: it is the crosscoder-free baseline against
which feature exclusivity is judged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from engine.crosscoder.data import (
    DataError,
    PairedSource,
    TensorPairs,
    as_source,
    check_pair_shapes,
    finite_rows,
)
from engine.errors import ConfigError
from engine.files import atomic_write_bytes
from engine.specs import SIDES, PairSpec
from engine.steering.transfer import other_model

FORMAT = "modeldiff-stitch"
VERSION = 1
TENSORS = ("w_ab", "b_ab", "w_ba", "b_ba")
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Stitch:
    """Affine maps A->B and B->A; parameters live in median-norm-scaled units."""

    w_ab: torch.Tensor  # [d_b, d_a]
    b_ab: torch.Tensor  # [d_b]
    w_ba: torch.Tensor  # [d_a, d_b]
    b_ba: torch.Tensor  # [d_a]
    scale_a: float  # raw A activations x scale_a = the units the maps were fitted in
    scale_b: float
    fve: dict[str, float] = field(default_factory=dict)  # held-out, per direction
    info: dict[str, Any] = field(default_factory=dict)  # training settings (provenance)
    # The models and layers fitted for: {"a": {"name", "layer", "d_model"}, "b": ...};
    # empty when unknown (fitted on tensors rather than an activation store).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def d_a(self) -> int:
        return self.w_ab.shape[1]

    @property
    def d_b(self) -> int:
        return self.w_ab.shape[0]

    def a_to_b(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-A activations [..., d_a] to model-B activations [..., d_b]."""
        return self._apply(x, "a", bias=True)

    def b_to_a(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-B activations [..., d_b] to model-A activations [..., d_a]."""
        return self._apply(x, "b", bias=True)

    def map(self, vector: torch.Tensor, source: str) -> torch.Tensor:
        """Translate a steering vector (or rows of them) from `source` to the other model.

        Only the linear part is used: a steering vector is a displacement added to
        activations, and T(x + v) - T(x) = W v for an affine T, so the bias cancels.
        Adding it would treat the vector as a point (an activation) rather than a direction.
        """
        other_model(source)
        return self._apply(vector, source, bias=False)

    def _apply(self, x: torch.Tensor, source: str, bias: bool) -> torch.Tensor:
        w, b = (self.w_ab, self.b_ab) if source == "a" else (self.w_ba, self.b_ba)
        s_in, s_out = (
            (self.scale_a, self.scale_b) if source == "a" else (self.scale_b, self.scale_a)
        )
        if x.ndim == 0 or x.shape[-1] != w.shape[1]:
            raise ConfigError(
                f"model {source.upper()} input has shape {tuple(x.shape)}; its last dimension "
                f"must be {w.shape[1]} (the width this stitch was trained on)"
            )
        w = w.to(x.device)
        out = (x.float() * s_in) @ w.T
        if bias:
            out = out + b.to(x.device)
        return out / s_out

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file; settings and FVE go in its JSON metadata header."""
        path = Path(path)
        check_stitch_target(path)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "scale_a": self.scale_a,
            "scale_b": self.scale_b,
            "fve": self.fve,
            "info": self.info,
            "models": self.models,
        }
        tensors = {
            name: getattr(self, name).detach().float().cpu().contiguous() for name in TENSORS
        }
        atomic_write_bytes(path, save(tensors, metadata={FORMAT: json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Stitch:
        """Read a stitch written by `save` (safetensors + JSON header, no pickle)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no stitch file at {path}; train one with train_stitch first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{path} is corrupt or not a safetensors file ({err})") from None
        header = _check_header(meta, tensors, path)
        return cls(
            **{k: tensors[k] for k in TENSORS},
            scale_a=float(header["scale_a"]),
            scale_b=float(header["scale_b"]),
            fve=header.get("fve", {}),
            info=header.get("info", {}),
            models=header.get("models") or {},
        )

    def check_run(self, run: dict[str, Any], run_id: str) -> None:
        """A ConfigError unless the stitch was fitted for the run's models at its layers
        (a stitch that records none is checked only by width, when the models load)."""
        fitted, used = PairSpec.from_dict(self.models), PairSpec.from_run(run)
        for m in SIDES:
            ours, theirs = fitted[m], used[m]  # an unrecorded model conflicts with none
            if ours.conflicts_with(theirs):
                raise ConfigError(
                    f"the stitch was fitted for model {m.upper()} {ours.where}, but run "
                    f"{run_id!r} uses {theirs.where}; fit one on this run's store with "
                    "`modeldiff stitch --store STORE --out FILE`"
                )


def check_stitch_target(path: Path) -> None:
    """Refuse a path a stitch cannot be saved to: not .safetensors, a directory, or an
    existing file that is not a stitch (only an earlier stitch is replaced)."""
    if path.suffix != ".safetensors":
        raise ConfigError(f"stitch files are .safetensors; got {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name like stitch.safetensors")
    if not path.exists():
        return
    try:
        with safe_open(str(path), framework="pt") as fh:
            ours = FORMAT in (fh.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        ours = False
    if not ours:
        raise ConfigError(
            f"refusing to replace {path}: it is not a stitch file; remove it yourself or "
            "choose another --out"
        )


def _check_header(meta: dict[str, str], tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Parsed JSON header, after checking the file really is a complete stitch."""
    if FORMAT not in meta:
        raise ConfigError(f"{path} is a safetensors file but not a stitch (no {FORMAT} header)")
    try:
        header = json.loads(meta[FORMAT])
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} has a corrupt stitch header ({err}); retrain it") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise ConfigError(f"{path} has an unknown stitch format; expected version {VERSION}")
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise ConfigError(f"{path} lacks tensors {missing}; it is incomplete, retrain it")
    d_b, d_a = tensors["w_ab"].shape
    shapes = {"b_ab": (d_b,), "w_ba": (d_a, d_b), "b_ba": (d_a,)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, not {shape}")
    return header


# -- training ----------------------------------------------------------------------------


def train_stitch(
    source: Any,
    d_a: int,
    d_b: int,
    steps: int = 500,
    batch_size: int = 1024,
    lr: float = 1e-4,
    inversion_weight: float = 1.0,
    holdout: float | Any = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    samples: int = 32768,
) -> Stitch:
    """Fit A<->B affine maps on paired activations and report held-out FVE.

    `source` is anything with ``batches(batch_size, start_step, seed)`` (an
    ActivationStore) or an (x_a, x_b) pair. `holdout` is either a fraction: `samples`
    pairs are drawn once and that fraction of them is never trained on; or a separate
    paired source: training then streams `source` and `samples` held-out pairs are drawn
    from `holdout`. `samples` also bounds the least-squares initialisation.
    """
    _check_settings(d_a, d_b, steps, batch_size, lr, inversion_weight, samples)
    train_src, init, held = _split(as_source(source), holdout, d_a, d_b, batch_size, samples, seed)
    scale_a, scale_b = _scale(init[0]), _scale(init[1])
    params = _least_squares(init[0] * scale_a, init[1] * scale_b, device)
    if isinstance(train_src, TensorPairs):
        batch_size = min(batch_size, len(train_src))  # a small sample is still trainable
    stream = (
        _to(batch, d_a, d_b, device, scale_a, scale_b)
        for batch in train_src.batches(batch_size, 0, seed)
    )
    _optimise(params, stream, steps, lr, inversion_weight)
    w_ab, b_ab, w_ba, b_ba = (p.detach().cpu() for p in params)
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "inversion_weight": inversion_weight,
        "seed": seed,
        "heldout_pairs": held[0].shape[0],
    }
    stitch = Stitch(w_ab, b_ab, w_ba, b_ba, scale_a, scale_b, info=info)
    stitch.models = fitted_models(source)
    stitch.fve = evaluate(stitch, *held)
    return stitch


def fitted_models(source: Any) -> dict[str, dict[str, Any]]:
    """The models and layers an activation store was harvested from, to record in a stitch
    fitted on it (empty for other sources)."""
    manifest = getattr(source, "manifest", None)
    models = manifest.get("models") if isinstance(manifest, dict) else None
    return PairSpec.from_dict(models).brief().to_dict()


def evaluate(stitch: Stitch, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained per direction and for each round trip."""
    x_a, x_b = x_a.float(), x_b.float()
    to_b, to_a = stitch.a_to_b(x_a), stitch.b_to_a(x_b)
    return {
        "a_to_b": fve(to_b, x_b),
        "b_to_a": fve(to_a, x_a),
        "a_to_b_to_a": fve(stitch.b_to_a(to_b), x_a),
        "b_to_a_to_b": fve(stitch.a_to_b(to_a), x_b),
    }


def fve(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """1 - squared error / total variance (around the per-dimension mean)."""
    error = (prediction - target).pow(2).sum()
    variance = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-30)
    return float(1 - error / variance)


def _check_settings(
    d_a: int, d_b: int, steps: int, batch_size: int, lr: float, inv: float, samples: int
) -> None:
    """Reject impossible training settings with the value to change."""
    checks = [
        (d_a >= 1 and d_b >= 1, f"model widths must be positive, got d_a={d_a}, d_b={d_b}"),
        (steps >= 0, f"steps must be >= 0 (0 = least squares only), got {steps}"),
        (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
        (lr > 0, f"lr must be > 0, got {lr}"),
        (inv >= 0, f"inversion_weight must be >= 0, got {inv}"),
        (samples >= 2, f"samples must be >= 2, got {samples}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _split(
    source: PairedSource,
    holdout: float | Any,
    d_a: int,
    d_b: int,
    batch_size: int,
    samples: int,
    seed: int,
) -> tuple[PairedSource, Pair, Pair]:
    """(training source, least-squares sample, held-out pairs), never overlapping."""
    if isinstance(holdout, float | int) and not isinstance(holdout, bool):
        if not 0 < holdout < 1:
            raise ConfigError(f"holdout as a fraction must be in (0, 1), got {holdout}")
        x_a, x_b = _draw(source, samples, batch_size, seed, d_a, d_b)
        n_held = max(1, round(holdout * x_a.shape[0]))
        if x_a.shape[0] - n_held < 2:
            raise DataError(f"only {x_a.shape[0]} usable pairs: too few to hold some out")
        train = (x_a[n_held:], x_b[n_held:])
        return TensorPairs(*train), train, (x_a[:n_held], x_b[:n_held])
    held = _draw(as_source(holdout), samples, batch_size, seed + 1, d_a, d_b)
    return source, _draw(source, samples, batch_size, seed, d_a, d_b), held


def _draw(source: PairedSource, n: int, batch_size: int, seed: int, d_a: int, d_b: int) -> Pair:
    """Up to n finite pairs from a source, in float32 on the CPU, in shuffled order."""
    if isinstance(source, TensorPairs):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(source), generator=g)[:n]
        batches: Iterator = iter([(source.x_a[idx], source.x_b[idx])])
    else:
        batches = source.batches(batch_size, 0, seed)
    parts_a, parts_b, total = [], [], 0
    for x_a, x_b in batches:
        check_pair_shapes(x_a, x_b, d_a, d_b)
        keep = finite_rows(x_a, x_b)
        parts_a.append(x_a[keep].float().cpu())
        parts_b.append(x_b[keep].float().cpu())
        total += int(keep.sum())
        if total >= n:
            break
    if total == 0:
        raise DataError("the paired source yielded no finite activation pairs")
    return torch.cat(parts_a)[:n], torch.cat(parts_b)[:n]


def _scale(x: torch.Tensor) -> float:
    """Factor that brings the median row norm to sqrt(d), i.e. coordinates of size ~1."""
    median = x.norm(dim=1).median().item()
    if not median > 0:
        raise DataError("cannot fit a stitch: the median activation norm is 0")
    return math.sqrt(x.shape[1]) / median


def _least_squares(x_a: torch.Tensor, x_b: torch.Tensor, device) -> list[torch.Tensor]:
    """Closed-form affine fits in both directions, as trainable [w_ab, b_ab, w_ba, b_ba]."""
    w_ab, b_ab = _affine_fit(x_a, x_b)
    w_ba, b_ba = _affine_fit(x_b, x_a)
    return [p.to(device).requires_grad_() for p in (w_ab, b_ab, w_ba, b_ba)]


def _affine_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares W, b with y ≈ x W^T + b (on the CPU: its solver handles rank deficiency)."""
    ones = torch.ones(x.shape[0], 1)
    solution = torch.linalg.lstsq(torch.cat([x, ones], dim=1), y).solution  # [d_x + 1, d_y]
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def _to(batch: Pair, d_a: int, d_b: int, device, scale_a: float, scale_b: float) -> Pair:
    """A training batch on the device, scaled, without non-finite rows."""
    x_a, x_b = batch
    check_pair_shapes(x_a, x_b, d_a, d_b)
    x_a, x_b = x_a.to(device).float(), x_b.to(device).float()
    keep = finite_rows(x_a, x_b)
    return x_a[keep] * scale_a, x_b[keep] * scale_b


def _optimise(
    params: list[torch.Tensor], stream: Iterator[Pair], steps: int, lr: float, inv: float
) -> None:
    """Adam on MSE both ways plus `inv` x the round-trip MSE both ways."""
    if steps == 0:
        return
    w_ab, b_ab, w_ba, b_ba = params
    opt = torch.optim.Adam(params, lr=lr)
    for _, (x_a, x_b) in zip(range(steps), stream, strict=False):
        if x_a.shape[0] == 0:
            continue
        to_b = x_a @ w_ab.T + b_ab
        to_a = x_b @ w_ba.T + b_ba
        loss = _mse(to_b, x_b) + _mse(to_a, x_a)
        if inv > 0:
            back_a = to_b @ w_ba.T + b_ba
            back_b = to_a @ w_ab.T + b_ab
            loss = loss + inv * (_mse(back_a, x_a) + _mse(back_b, x_b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).pow(2).mean()
