"""Model stitching (paper B.5): affine maps between two models' activation spaces.

Fitting. A->B (``W_ab x + b_ab``) and B->A are fitted by ridge-regularised least squares
in closed form, in float64 on centred, per-dimension standardised inputs; `ridge` is
relative to that scale, and by default each direction picks it from RIDGE_GRID on a
validation tenth of the training pairs. Rows whose norm is more than `outlier_norm` x the
median in either model (massive-activation tokens: a few Gemma rows reach 10x its median
norm on one dimension) are left out of the fit and of the held-out score. Optionally
(`steps` > 0) Adam then trains both maps jointly on MSE both ways plus an inversion
penalty (A->B->A and B->A->B should return the input), the paper's objective; that trades
held-out FVE for invertibility. With the same source and seed a fit is deterministic: the
same tensors, bit for bit, on the same machine and thread count.

Units. Parameters are stored in median-norm-scaled units (each model divided by its
median activation norm, times sqrt(d)); every public method takes and returns raw
model units.

Translating a steering vector (`Stitch.map`). A steering vector v is a displacement added
to activations, and for an affine T, T(x + a v) - T(x) = a W v: the bias cancels, so the
translation of a direction is its linear part. That is the default (``translation =
"linear"``). ``translation = "affine"`` is the paper's eq. 18 read literally, d' = W d + b:
it treats the vector as a point (an activation) and adds the bias, the image of the zero
vector, which is roughly the target model's mean activation; at strength a the target is
then pushed by a (W d + b), a push along its mean direction (for Gemma, its massive
dimensions) that is the same for every feature. Use it only to reproduce the paper.

API other code reads (stable):

* ``Stitch.fve``: held-out fraction of variance explained, keys ``a_to_b`` and ``b_to_a``
  (the maps) and ``a_to_b_to_a``, ``b_to_a_to_b`` (round trips); computed on held-out
  pairs without outlier rows, in raw units. Empty for a stitch made by hand.
* ``fve_for(stitch, source)``: the FVE of the direction a vector from model `source`
  travels through (``a`` -> ``a_to_b``), or None when not recorded.
* ``stitch_warning(stitch, source=None, threshold=FVE_WARN_BELOW) -> str | None``: a
  one-line warning when a direction's held-out FVE is below `threshold` (or unknown),
  else None. ``FVE_WARN_BELOW`` = 0.5: below it the map leaves more of the target
  model's variance unexplained than it explains, so "the other model does not react to
  the translated vector" says little about exclusivity (docs/verification.md, "Stitch
  quality", has the measurements behind the number).

A stitch is independent of any crosscoder: it is the crosscoder-free baseline against
which feature exclusivity is judged.
"""

from __future__ import annotations

import hashlib
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
TRANSLATIONS = ("linear", "affine")  # how `Stitch.map` translates a steering vector
FVE_WARN_BELOW = 0.5  # held-out FVE under which a direction's translation is flagged
OUTLIER_NORM = 3.0  # rows above this x the median norm (either model) are not fitted
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # ridge=None picks one
DIRECTIONS = {"a": "a_to_b", "b": "b_to_a"}  # a vector's source model -> its FVE key
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Stitch:
    """Affine maps A->B and B->A; parameters live in median-norm-scaled units."""

    w_ab: torch.Tensor  # [d_b, d_a]
    b_ab: torch.Tensor  # [d_b]
    w_ba: torch.Tensor  # [d_a, d_b]
    b_ba: torch.Tensor  # [d_a]
    scale_a: float  # raw A activations x scale_a = the units the maps are stored in
    scale_b: float
    fve: dict[str, float] = field(default_factory=dict)  # held-out, per direction
    info: dict[str, Any] = field(default_factory=dict)  # training settings (provenance)
    # The models and layers fitted for: {"a": {"name", "layer", "d_model"}, "b": ...};
    # empty when unknown (fitted on tensors rather than an activation store).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    translation: str = "linear"  # what `map` does: the linear part, or eq. 18 with the bias

    def __post_init__(self) -> None:
        check_translation(self.translation)

    @property
    def d_a(self) -> int:
        return self.w_ab.shape[1]

    @property
    def fingerprint(self) -> str:
        """A short digest of what the stitch does (maps, scales, translation): equal for
        the same fit, different for another."""
        digest = hashlib.sha256(f"{self.scale_a!r} {self.scale_b!r} {self.translation}".encode())
        for t in (self.w_ab, self.b_ab, self.w_ba, self.b_ba):
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def d_b(self) -> int:
        return self.w_ab.shape[0]

    def a_to_b(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-A activations [..., d_a] to model-B activations [..., d_b]."""
        return self._apply(x, "a", bias=True)

    def b_to_a(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-B activations [..., d_b] to model-A activations [..., d_a]."""
        return self._apply(x, "b", bias=True)

    def map(
        self, vector: torch.Tensor, source: str, translation: str | None = None
    ) -> torch.Tensor:
        """Translate a steering vector (or rows of them) from `source` to the other model.

        `translation` (default: the stitch's own) is "linear": W v, the translation of a
        displacement (T(x + v) - T(x) = W v for an affine T, so the bias cancels); or
        "affine": W v + b, the paper's eq. 18, which treats the vector as a point and adds
        the bias (see the module docstring for why that is not a direction).
        """
        other_model(source)
        mode = check_translation(self.translation if translation is None else translation)
        return self._apply(vector, source, bias=mode == "affine")

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
            "translation": self.translation,
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
            translation=header.get("translation", "linear"),
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


def check_translation(translation: str) -> str:
    """`translation` if it is one `Stitch.map` knows, else a ConfigError naming them."""
    if translation not in TRANSLATIONS:
        raise ConfigError(
            f"translation must be one of {', '.join(TRANSLATIONS)}, got {translation!r}"
        )
    return translation


def fve_for(stitch: Stitch, source: str) -> float | None:
    """Held-out FVE of the map a vector from model `source` goes through (None if unknown)."""
    other_model(source)
    value = stitch.fve.get(DIRECTIONS[source])
    return None if value is None else float(value)


def stitch_warning(
    stitch: Stitch, source: str | None = None, threshold: float = FVE_WARN_BELOW
) -> str | None:
    """One line warning that the stitch translates poorly, or None when it is good enough.

    Checks the direction vectors from `source` travel (both when None): a held-out FVE
    below `threshold`, or none recorded, makes "the other model does not react" weak
    evidence of exclusivity.
    """
    sources = SIDES if source is None else (source,)
    low, unknown = [], []
    for m in sources:
        value = fve_for(stitch, m)
        arrow = f"{m.upper()}->{other_model(m).upper()}"
        if value is None or not math.isfinite(value):
            unknown.append(arrow)
        elif value < threshold:
            low.append(f"{arrow} {value:.2f}")
    if not (low or unknown):
        return None
    parts = []
    if low:
        parts.append(f"held-out FVE {', '.join(low)} is below {threshold:g}")
    if unknown:
        parts.append(f"no held-out FVE recorded for {', '.join(unknown)}")
    return (
        f"stitch quality: {'; '.join(parts)}, so a feature that does not transfer may only "
        "be badly translated; refit with more pairs (`modeldiff stitch --samples`) or read "
        "its exclusivity as an upper bound"
    )


def fve_lines(stitch: Stitch) -> list[str]:
    """The held-out FVE per direction and round trip, as lines for a terminal."""
    fve, info = stitch.fve, stitch.info
    if not fve:
        return ["held-out fraction of variance explained (FVE): not recorded"]
    held = info.get("heldout_pairs")
    dropped = info.get("outlier_rows")
    where = f" on {held} held-out pairs" if held is not None else ""
    if dropped:
        where += f" ({dropped} outlier pairs left out of fit and score)"

    def value(key: str) -> str:
        return f"{fve[key]:.3f}" if key in fve else "n/a"

    return [
        f"held-out fraction of variance explained (FVE){where}: A->B {value('a_to_b')}, "
        f"B->A {value('b_to_a')}",
        f"round trips: A->B->A {value('a_to_b_to_a')}, B->A->B {value('b_to_a_to_b')}",
    ]


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
    prediction, target = prediction.double(), target.double()
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
