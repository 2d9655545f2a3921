"""Fitting a stitch: ridge least squares in closed form on centred, standardised pairs
(float64, outliers left out, the ridge chosen on a validation tenth), optionally followed
by the paper's joint Adam phase with the inversion penalty."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from engine.crosscoder.data import (
    DataError,
    PairedSource,
    TensorPairs,
    as_source,
    check_pair_shapes,
    finite_rows,
)
from engine.errors import ConfigError
from engine.specs import PairSpec
from engine.steering.stitching.maps import Stitch, check_translation
from engine.steering.stitching.quality import evaluate

OUTLIER_NORM = 3.0  # rows above this x the median norm (either model) are not fitted
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # ridge=None picks one
Pair = tuple[torch.Tensor, torch.Tensor]


def train_stitch(
    source: Any,
    d_a: int,
    d_b: int,
    steps: int = 0,
    batch_size: int = 1024,
    lr: float = 1e-4,
    inversion_weight: float = 1.0,
    holdout: float | Any = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    samples: int = 65536,
    ridge: float | None = None,
    outlier_norm: float | None = OUTLIER_NORM,
    translation: str = "linear",
) -> Stitch:
    """Fit A<->B affine maps on paired activations and report held-out FVE.

    `source` is anything with ``batches(batch_size, start_step, seed)`` (an
    ActivationStore) or an (x_a, x_b) pair. `holdout` is either a fraction: `samples`
    pairs are drawn once (at most one pass over a source that knows its length, so no
    pair is drawn twice) and that fraction of them is never fitted on; or a separate
    paired source: `samples` held-out pairs are drawn from it. The maps are the ridge
    least-squares fits on the rest (`ridge` x the mean eigenvalue of the standardised
    inputs' covariance; 0 = plain least squares; None = chosen per direction from
    RIDGE_GRID on a tenth of the training pairs); rows above `outlier_norm` x the median
    norm in either model (None: keep all) are left out of fit and score. `steps` > 0 adds
    that many Adam steps (`lr`, `batch_size`) on MSE plus `inversion_weight` x the
    round-trip MSE, streaming the training pairs. `translation` is what `Stitch.map` will
    do ("linear" or "affine", the module docstring says why linear is the default).
    """
    _check_settings(d_a, d_b, steps, batch_size, lr, inversion_weight, samples)
    check_translation(translation)
    if ridge is not None and not ridge >= 0:
        raise ConfigError(f"ridge must be >= 0 (0 = plain least squares), got {ridge}")
    if outlier_norm is not None and math.isinf(outlier_norm):
        outlier_norm = None  # keep every row
    if outlier_norm is not None and not outlier_norm > 1:
        raise ConfigError(f"outlier_norm must be > 1 (x the median norm), got {outlier_norm}")
    train_src, fit, held = _split(as_source(source), holdout, d_a, d_b, batch_size, samples, seed)
    limits = _norm_limits(fit, outlier_norm)
    n_drawn = fit[0].shape[0] + held[0].shape[0]
    fit, held = _inliers(fit, limits), _inliers(held, limits)
    if fit[0].shape[0] < 2 or held[0].shape[0] < 1:
        raise DataError(
            f"only {fit[0].shape[0]} training and {held[0].shape[0]} held-out pairs are left "
            "after dropping outlier rows; use more pairs or a larger --outlier-norm"
        )
    if isinstance(train_src, TensorPairs):
        train_src = TensorPairs(*fit)
    scale_a, scale_b = _scale(fit[0]), _scale(fit[1])
    params, ridges = _least_squares(fit, scale_a, scale_b, ridge, device)
    if steps > 0:
        if isinstance(train_src, TensorPairs):
            batch_size = min(batch_size, len(train_src))  # a small sample is still trainable
        stream = (
            _to(batch, d_a, d_b, device, scale_a, scale_b, limits)
            for batch in train_src.batches(batch_size, 0, seed)
        )
        _optimise(params, stream, steps, lr, inversion_weight)
    w_ab, b_ab, w_ba, b_ba = (p.detach().float().cpu() for p in params)
    info = {
        "fit": "least squares" + (f" + {steps} Adam steps" if steps else ""),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "inversion_weight": inversion_weight,
        "seed": seed,
        "ridge": ridges,
        "outlier_norm": outlier_norm,
        "outlier_rows": n_drawn - fit[0].shape[0] - held[0].shape[0],
        "train_pairs": fit[0].shape[0],
        "heldout_pairs": held[0].shape[0],
    }
    stitch = Stitch(w_ab, b_ab, w_ba, b_ba, scale_a, scale_b, info=info, translation=translation)
    stitch.models = fitted_models(source)
    stitch.fve = evaluate(stitch, *held)
    return stitch


def fitted_models(source: Any) -> dict[str, dict[str, Any]]:
    """The models and layers an activation store was harvested from, to record in a stitch
    fitted on it (empty for other sources)."""
    manifest = getattr(source, "manifest", None)
    models = manifest.get("models") if isinstance(manifest, dict) else None
    return PairSpec.from_dict(models).brief().to_dict()


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
    """(training source, training sample, held-out pairs), never overlapping."""
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
    """Up to n finite pairs from a source, in float32 on the CPU, in shuffled order; from a
    source that knows its length, at most one pass (a pair is never drawn twice)."""
    if isinstance(source, TensorPairs):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(source), generator=g)[:n]
        batches: Iterator = iter([(source.x_a[idx], source.x_b[idx])])
    else:
        if hasattr(source, "__len__"):
            batch_size = max(1, min(batch_size, len(source)))
            n = min(n, (len(source) // batch_size) * batch_size)  # one epoch
        batches = source.batches(batch_size, 0, seed)
    parts_a, parts_b, total = [], [], 0
    for x_a, x_b in batches:
        check_pair_shapes(x_a, x_b, d_a, d_b)
        keep = finite_rows(x_a, x_b)
        parts_a.append(x_a[keep].float().cpu())
        parts_b.append(x_b[keep].float().cpu())
        total += x_a.shape[0]
        if total >= n:
            break
    if not parts_a or sum(p.shape[0] for p in parts_a) == 0:
        raise DataError("the paired source yielded no finite activation pairs")
    return torch.cat(parts_a)[:n], torch.cat(parts_b)[:n]


def _norm_limits(sample: Pair, outlier_norm: float | None) -> tuple[float, float]:
    """Largest row norm kept per model: `outlier_norm` x the sample's median norm."""
    if outlier_norm is None:
        return math.inf, math.inf
    x_a, x_b = sample
    return (
        outlier_norm * x_a.norm(dim=1).median().item(),
        outlier_norm * x_b.norm(dim=1).median().item(),
    )


def _inliers(pair: Pair, limits: tuple[float, float]) -> Pair:
    """The rows of a pair whose norms are within the limits in both models."""
    x_a, x_b = pair
    keep = (x_a.norm(dim=1) <= limits[0]) & (x_b.norm(dim=1) <= limits[1])
    return x_a[keep], x_b[keep]


def _scale(x: torch.Tensor) -> float:
    """Factor that brings the median row norm to sqrt(d), i.e. coordinates of size ~1."""
    median = x.norm(dim=1).median().item()
    if not median > 0:
        raise DataError("cannot fit a stitch: the median activation norm is 0")
    return math.sqrt(x.shape[1]) / median


def _least_squares(
    sample: Pair, scale_a: float, scale_b: float, ridge: float | None, device
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Closed-form affine fits in both directions, as trainable [w_ab, b_ab, w_ba, b_ba]
    in scaled units, and the ridge each direction used."""
    x_a, x_b = sample
    w_ab, b_ab, ridge_ab = _affine_fit(x_a, x_b, ridge)  # raw units
    w_ba, b_ba, ridge_ba = _affine_fit(x_b, x_a, ridge)
    # y = W x + b in raw units is (y s_y) = (W s_y / s_x)(x s_x) + b s_y in scaled units.
    params = (w_ab * scale_b / scale_a, b_ab * scale_b, w_ba * scale_a / scale_b, b_ba * scale_a)
    trainable = [p.float().to(device).requires_grad_() for p in params]
    return trainable, {"a_to_b": ridge_ab, "b_to_a": ridge_ba}


def _affine_fit(
    x: torch.Tensor, y: torch.Tensor, ridge: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge least-squares W [d_y, d_x], b [d_y] with y ≈ x W^T + b, in float64, and the
    ridge used: `ridge`, or (None) the one of RIDGE_GRID with the least squared error on
    the last tenth of the rows when fitted on the rest (the final fit uses every row).

    Centring removes the mean (for Gemma, a few massive dimensions) that made a plain solve
    on raw rows ill-conditioned, and standardising each input dimension makes `ridge`
    relative (x the mean eigenvalue of the covariance, which is 1).
    """
    x, y = x.double(), y.double()
    std = (x - x.mean(dim=0)).pow(2).mean(dim=0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant input stays 0
    n_val = x.shape[0] // 10 if ridge is None else 0
    if ridge is None and n_val < 1:
        ridge = RIDGE_GRID[0]  # too few rows to choose
    rest = _Moments(x[n_val:], y[n_val:], std)
    if ridge is None:
        x_val, y_val = x[:n_val], y[:n_val]

        def error(lam: float) -> float:
            w, b = rest.solve(lam)
            return float((x_val @ w.T + b - y_val).pow(2).sum())

        ridge = min(RIDGE_GRID, key=error)  # the first (smallest) of equals
        rest = rest.plus(_Moments(x[:n_val], y[:n_val], std))
    w, b = rest.solve(ridge)
    return w, b, ridge


class _Moments:
    """Sums over rows of standardised x and of y, from which a ridge fit is solved."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, std: torch.Tensor) -> None:
        xs = x / std
        self.std, self.n = std, x.shape[0]
        self.sx, self.sy = xs.sum(dim=0), y.sum(dim=0)
        self.sxx, self.sxy = xs.T @ xs, xs.T @ y

    def plus(self, other: _Moments) -> _Moments:
        both = object.__new__(_Moments)
        both.std, both.n = self.std, self.n + other.n
        for name in ("sx", "sy", "sxx", "sxy"):
            setattr(both, name, getattr(self, name) + getattr(other, name))
        return both

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """W [d_y, d_x] and b in raw units for this ridge (0: minimum-norm least squares)."""
        mx, my = self.sx / self.n, self.sy / self.n
        gram = self.sxx / self.n - torch.outer(mx, mx)
        cross = self.sxy / self.n - torch.outer(mx, my)
        if ridge > 0:
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            beta = torch.linalg.solve(gram + ridge * eye, cross)
        else:
            beta = torch.linalg.lstsq(gram, cross, driver="gelsd").solution
        w = (beta / self.std[:, None]).T.contiguous()  # per raw input unit
        return w, my - w @ (mx * self.std)


def _to(
    batch: Pair,
    d_a: int,
    d_b: int,
    device,
    scale_a: float,
    scale_b: float,
    limits: tuple[float, float],
) -> Pair:
    """A training batch on the device, scaled, without non-finite or outlier rows."""
    x_a, x_b = batch
    check_pair_shapes(x_a, x_b, d_a, d_b)
    x_a, x_b = x_a.to(device).float(), x_b.to(device).float()
    keep = finite_rows(x_a, x_b)
    x_a, x_b = _inliers((x_a[keep], x_b[keep]), limits)
    return x_a * scale_a, x_b * scale_b


def _optimise(
    params: list[torch.Tensor],
    stream: Iterator[Pair],
    steps: int,
    lr: float,
    inv: float,
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
