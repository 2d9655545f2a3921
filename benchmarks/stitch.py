"""Stitch quality: held-out FVE per direction of the earlier fit and the current one.

Both are fitted on the same activation store with the same seeds, in the same run:

* **earlier**: the fit as it was before: each model scaled by its median norm, a plain
  least-squares solve on the raw (uncentred) rows with a column of ones (LAPACK gelsy, float32,
  default rank cutoff), then 500 Adam steps (lr 1e-4, batch 1024) on MSE plus the inversion
  penalty (weight 1); 32,768 pairs drawn, a tenth held out, every row kept.
* **current**: `train_stitch` defaults: ridge least squares in float64 on centred,
  standardised rows (ridge chosen on a validation tenth), no Adam steps, rows above 3x the
  median norm in either model left out; 65,536 pairs asked for, capped at one pass over the
  store, a tenth held out.

Each setting's FVE is reported on its own held-out pairs (what `modeldiff stitch` prints)
and on a common set no fit trained on: the first 10% of the earlier setting's 32,768-pair
draw (the same rows for both, since both draw the store in the seed's order), outlier rows
left out. `--ablation` adds one-change-at-a-time rows.

    python benchmarks/stitch.py --store /work/runs/demo-store --out-dir /work/runs/stitch-exp
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from engine.activations import ActivationStore
from engine.steering.stitching import Stitch, evaluate, train_stitch
from engine.steering.stitching import fit as stitching

EARLIER = {"samples": 32768, "steps": 500, "batch_size": 1024, "lr": 1e-4, "inversion": 1.0}


def earlier_stitch(acts: ActivationStore, seed: int, steps: int = EARLIER["steps"]) -> Stitch:
    """The fit as it was before (see the module docstring), on this store and seed."""
    x_a, x_b = stitching._draw(
        acts, EARLIER["samples"], EARLIER["batch_size"], seed, acts.d_a, acts.d_b
    )
    n_held = round(0.1 * x_a.shape[0])
    held, fit = (x_a[:n_held], x_b[:n_held]), (x_a[n_held:], x_b[n_held:])
    scale_a, scale_b = stitching._scale(fit[0]), stitching._scale(fit[1])
    params = []
    for x, y in ((fit[0] * scale_a, fit[1] * scale_b), (fit[1] * scale_b, fit[0] * scale_a)):
        ones = torch.ones(x.shape[0], 1)
        solution = torch.linalg.lstsq(torch.cat([x, ones], dim=1), y).solution
        params += [solution[:-1].T.contiguous(), solution[-1].contiguous()]
    params = [p.requires_grad_() for p in params]
    pairs = stitching.TensorPairs(*fit)
    keep_all = (float("inf"), float("inf"))
    stream = (
        stitching._to(b, acts.d_a, acts.d_b, "cpu", scale_a, scale_b, keep_all)
        for b in pairs.batches(EARLIER["batch_size"], 0, seed)
    )
    stitching._optimise(params, stream, steps, EARLIER["lr"], EARLIER["inversion"])
    w_ab, b_ab, w_ba, b_ba = (p.detach() for p in params)
    info = {"fit": f"earlier: gelsy least squares + {steps} Adam steps", "seed": seed}
    stitch = Stitch(w_ab, b_ab, w_ba, b_ba, scale_a, scale_b, info=info)
    stitch.models = stitching.fitted_models(acts)
    stitch.fve = evaluate(stitch, *held)
    stitch.info["heldout_pairs"] = n_held
    return stitch


def common_heldout(acts: ActivationStore, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs no setting trains on for this seed, outlier rows left out."""
    x_a, x_b = stitching._draw(
        acts, EARLIER["samples"], EARLIER["batch_size"], seed, acts.d_a, acts.d_b
    )
    n_held = round(0.1 * x_a.shape[0])
    limits = stitching._norm_limits((x_a, x_b), stitching.OUTLIER_NORM)
    return stitching._inliers((x_a[:n_held], x_b[:n_held]), limits)


def settings(ablation: bool) -> dict:
    """name -> fit(acts, seed) -> Stitch."""
    rows = {
        "earlier (gelsy LS + 500 Adam, inversion 1)": earlier_stitch,
        "current (ridge LS, outliers out, 0 Adam)": lambda acts, seed: train_stitch(
            acts, acts.d_a, acts.d_b, seed=seed
        ),
    }
    if ablation:
        rows.update({
            "earlier LS only (0 Adam steps)": lambda acts, seed: earlier_stitch(
                acts, seed, steps=0
            ),
            "current, outliers kept": lambda acts, seed: train_stitch(
                acts, acts.d_a, acts.d_b, seed=seed, outlier_norm=None
            ),
            "current, ridge 0": lambda acts, seed: train_stitch(
                acts, acts.d_a, acts.d_b, seed=seed, ridge=0.0
            ),
            "current + 500 Adam steps, inversion 1": lambda acts, seed: train_stitch(
                acts, acts.d_a, acts.d_b, seed=seed, steps=500
            ),
            "current + 500 Adam steps, inversion 0": lambda acts, seed: train_stitch(
                acts, acts.d_a, acts.d_b, seed=seed, steps=500, inversion_weight=0.0
            ),
        })  # fmt: skip
    return rows


def spread(values: list[float]) -> str:
    """mean (min-max) of a few fits."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/work/runs/demo-store")
    parser.add_argument("--out-dir", type=Path, help="write each fit's stitch file here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation", action="store_true", help="add one-change rows")
    parser.add_argument("--no-refit", action="store_true", help="skip the determinism refit")
    parser.add_argument("--only", action="append", help="run the settings whose name has this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    acts = ActivationStore(args.store)
    print(f"store {args.store}: {len(acts)} pairs, d_a {acts.d_a}, d_b {acts.d_b}; 1 thread")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    common = {seed: common_heldout(acts, seed) for seed in range(args.seeds)}
    rows = []
    chosen = [
        (index, name, fit)
        for index, (name, fit) in enumerate(settings(args.ablation).items())
        if not args.only or any(part in name for part in args.only)
    ]
    for index, name, fit in chosen:
        got: dict[str, list[float]] = {}
        first = None
        for seed in range(args.seeds):
            start = time.perf_counter()
            stitch = fit(acts, seed)
            seconds = time.perf_counter() - start
            first = first or stitch
            shared = evaluate(stitch, *common[seed])
            values = {
                "a_to_b": stitch.fve["a_to_b"],
                "b_to_a": stitch.fve["b_to_a"],
                "common a_to_b": shared["a_to_b"],
                "common b_to_a": shared["b_to_a"],
                "a_to_b_to_a": stitch.fve["a_to_b_to_a"],
                "b_to_a_to_b": stitch.fve["b_to_a_to_b"],
                "seconds": seconds,
            }
            for key, value in values.items():
                got.setdefault(key, []).append(value)
            print(f"{name}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
            if args.out_dir:
                stitch.save(args.out_dir / f"setting{index}-seed{seed}.safetensors")
        same = "-"
        if not args.no_refit and index < 2:
            again = fit(acts, 0)
            same = "yes" if all(
                torch.equal(getattr(again, k), getattr(first, k)) for k in stitching.TENSORS
            ) else "no"  # fmt: skip
        rows.append((name, got, same, first))
    print()
    print(
        "| setting | A->B (own held-out) | B->A (own held-out) | A->B (common) | B->A (common) "
        "| A->B->A | B->A->B | fit time s | identical refit |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, got, same, _ in rows:
        cells = [spread(got[k]) for k in (
            "a_to_b", "b_to_a", "common a_to_b", "common b_to_a", "a_to_b_to_a", "b_to_a_to_b"
        )]  # fmt: skip
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {statistics.fmean(got['seconds']):.0f} | {same} |"
        )
    current = next((r[3] for r in rows if r[0].startswith("current (")), None)
    if current is None:
        return
    print(f"\ncurrent fit, seed 0: {current.info['train_pairs']} training and "
          f"{current.info['heldout_pairs']} held-out pairs, {current.info['outlier_rows']} "
          f"outlier rows left out, ridge {current.info['ridge']}")  # fmt: skip
    for source, target in (("a", "b"), ("b", "a")):
        x_src, x_tgt = common[0] if source == "a" else common[0][::-1]
        bias = (current.a_to_b if source == "a" else current.b_to_a)(torch.zeros(x_src.shape[1]))
        print(f"bias of {source.upper()}->{target.upper()}: norm {bias.norm():.0f} = "
              f"{bias.norm() / x_tgt.norm(dim=1).median():.2f} x model {target.upper()}'s "
              f"median activation norm")  # fmt: skip


if __name__ == "__main__":
    main()
