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

Modules: `maps` (the Stitch object, its translation of a vector, its file), `quality`
(held-out FVE and the warning), `fit` (least squares, outliers, the optional Adam phase).

API other code reads (stable; all importable from this package):

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

from engine.steering.stitching.fit import OUTLIER_NORM, RIDGE_GRID, fitted_models, train_stitch
from engine.steering.stitching.maps import (
    FORMAT,
    TENSORS,
    TRANSLATIONS,
    VERSION,
    Stitch,
    check_stitch_target,
    check_translation,
)
from engine.steering.stitching.quality import (
    DIRECTIONS,
    FVE_WARN_BELOW,
    evaluate,
    fve,
    fve_for,
    fve_lines,
    stitch_warning,
)

__all__ = [
    "DIRECTIONS", "FORMAT", "FVE_WARN_BELOW", "OUTLIER_NORM", "RIDGE_GRID", "TENSORS",
    "TRANSLATIONS", "VERSION", "Stitch", "check_stitch_target", "check_translation",
    "evaluate", "fitted_models", "fve", "fve_for", "fve_lines", "stitch_warning",
    "train_stitch",
]  # fmt: skip
