"""Does the judge-free effect measure separate features from random directions?

Measures `--shared` random shared features (and `--exclusive` A-exclusive ones) of a run
with `engine.steering.effects`, against the run's null of random directions (measured
once, stored in the results DB), and prints the area under the ROC curve for "shared
features transfer more than random directions" for the measure and its companions. With
`--offline N` it also scores the first N shared features and N of the null's directions
(half from each model) with the paper's protocol and the offline judge, at the demo's
settings, and prints that protocol's AUC on the same items.

    python benchmarks/effects.py --db runs/demo/results.duckdb --run-id demo \\
        --stitch runs/demo/stitch.safetensors --shared 30 [--offline 30] [--repeat 1]

`--repeat 1` measures the first shared feature again in a fresh session and prints
whether every number is identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def auc(positive: list[float], negative: list[float]) -> float:
    """P(positive > negative), ties half: the area under the ROC curve."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path)
    parser.add_argument("--run-id", default="demo")
    parser.add_argument("--stitch", type=Path)
    parser.add_argument("--shared", type=int, default=30)
    parser.add_argument("--exclusive", type=int, default=0)
    parser.add_argument("--offline", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--nulls", type=int, default=None, help="random directions per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument(
        "--null-json",
        nargs="+",
        type=Path,
        help="null effects measured beforehand (EffectSession.save_null) to store first",
    )
    parser.add_argument(
        "--features-json",
        nargs="+",
        type=Path,
        help="summarise features measured beforehand (JSON of scripts like this one's "
        "measure loop) against --null-json, without a database; prints the AUCs",
    )
    args = parser.parse_args()
    if args.features_json:
        print(json.dumps(summarise_json(args.features_json, args.null_json or []), indent=2))
        return
    if args.db is None or args.stitch is None:
        parser.error("--db and --stitch are needed (or --features-json)")

    from dataclasses import replace

    from engine.categories import A_EXCLUSIVE, SHARED
    from engine.results import Database
    from engine.steering.effects.measure import EffectsConfig
    from engine.steering.effects.run import (
        NULL,
        ensure_null,
        feature_direction,
        measure_features,
        open_session,
    )
    from engine.steering.pair import SteeringPair

    cfg = EffectsConfig(seed=args.seed)
    if args.budget is not None:
        cfg = replace(cfg, budget=args.budget)
    if args.nulls is not None:
        cfg = replace(cfg, nulls=args.nulls)
    report: dict = {"config": cfg.key_payload()}
    with Database(args.db) as db:
        table = db.features(args.run_id, dead=False)
        table = table[table["s_max"].fillna(0) > 0]
        rng = np.random.default_rng(args.seed)
        shared = np.sort(
            rng.choice(
                table[table["partition"] == SHARED]["feature_id"], args.shared, replace=False
            )
        )
        exclusive_pool = table[table["partition"] == A_EXCLUSIVE]["feature_id"]
        exclusive = (
            np.sort(
                rng.choice(exclusive_pool, min(args.exclusive, len(exclusive_pool)), replace=False)
            )
            if args.exclusive
            else []
        )
        pair = SteeringPair.open(db, args.run_id, args.stitch)
        session = open_session(pair, cfg)
        if args.null_json:
            import_null(db, args.run_id, session, args.null_json)
        t0 = time.perf_counter()
        ensure_null(
            db, args.run_id, session, on_item=lambda s, i: print(f"null {s}{i}", flush=True)
        )
        report["null_seconds"] = time.perf_counter() - t0
        times = {}
        results = {}
        for group, ids in (("shared", shared), ("a_exclusive", exclusive)):
            for fid in ids:
                t = time.perf_counter()
                measure_features(db, args.run_id, pair, [int(fid)], cfg)
                times[int(fid)] = time.perf_counter() - t
                print(f"{group} {fid}: {times[int(fid)]:.1f} s", flush=True)
        stored = db.effects(args.run_id, settings=session.key)
        null = stored[stored["kind"] == NULL]
        feats = (
            stored[stored["kind"] == "feature"]
            .drop_duplicates("item", keep="last")
            .set_index("item")
        )
        for group, ids in (("shared", shared), ("a_exclusive", exclusive)):
            rows = [feats.loc[int(f)] for f in ids if int(f) in feats.index]
            results[group] = rows
        sim_null = null["similarity"].astype(float).tolist()
        sim_shared = [float(r["similarity"]) for r in results["shared"]]
        report["auc_similarity_shared_vs_null"] = auc(sim_shared, sim_null)
        for side in ("a", "b"):
            sub = null[null["source"] == side]["similarity"].astype(float).tolist()
            report[f"auc_similarity_shared_vs_null_{side}"] = auc(sim_shared, sub)

        # companions: the coefficient needed and the output score, features vs the null
        def comp(rows, key, model):
            return [float(r["details"][key][model]) for r in rows]

        null_rows = [r for _, r in null.iterrows()]
        for model in ("a", "b"):
            report[f"auc_log_coef_{model}_null_over_shared"] = auc(
                np.log(comp(null_rows, "coefficients", model)).tolist(),
                np.log(comp(results["shared"], "coefficients", model)).tolist(),
            )
            report[f"auc_output_{model}_shared_over_null"] = auc(
                comp(results["shared"], "output", model), comp(null_rows, "output", model)
            )
        report["variants"] = variants(results["shared"], null_rows)
        report["shared"] = {
            "n": len(sim_shared),
            "similarity_mean": float(np.mean(sim_shared)),
            "z": [float(r["z"]) for r in results["shared"] if r["z"] == r["z"]],
        }
        report["null"] = {"n": len(sim_null), "similarity_mean": float(np.mean(sim_null))}
        if results["a_exclusive"]:
            sim_ex = [float(r["similarity"]) for r in results["a_exclusive"]]
            report["a_exclusive"] = {
                "n": len(sim_ex),
                "similarity_mean": float(np.mean(sim_ex)),
                "z": [float(r["z"]) for r in results["a_exclusive"]],
            }
            report["auc_shared_over_a_exclusive"] = auc(sim_shared, sim_ex)
        report["seconds_per_feature"] = {
            "median": float(np.median(list(times.values()))) if times else None,
            "max": float(max(times.values())) if times else None,
            "measured": len([t for t in times.values() if t > 1.0]),
        }
        if args.repeat:
            from engine.steering.effects.session import EffectSession

            fresh = EffectSession(pair.models, pair.layers, pair.stitch, cfg, session._sample)
            fresh.nulls = dict(session.nulls)
            vector, source = feature_direction(pair, int(shared[0]))
            again = fresh.measure(vector, source).to_json()
            first = feats.loc[int(shared[0]), "details"]
            report["repeat_identical"] = json.dumps(again, sort_keys=True) == json.dumps(
                first, sort_keys=True
            )
        if args.offline:
            report["offline"] = offline_protocol(db, args, pair, session, shared[: args.offline])
    print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def summarise_json(features: list[Path], nulls: list[Path]) -> dict:
    """AUCs of shared features over the null from JSON files: {"features": {id: {"effect":
    ...}}} and `EffectSession.save_null` files (rows deduplicated by source and item)."""
    null = {}
    for path in nulls:
        for row in json.loads(path.read_text())["null"]:
            null[(row["source"], int(row["item"]))] = row["effect"]
    feats = {}
    for path in features:
        for fid, row in json.loads(path.read_text())["features"].items():
            feats[int(fid)] = row
    shared = [{"details": r["effect"]} for r in feats.values()]
    nrows = [{"details": e} for e in null.values()]

    def col(rows, key, model=None):
        return [r["details"][key] if model is None else r["details"][key][model] for r in rows]

    out = {
        "n_features": len(shared),
        "n_null": len(nrows),
        "auc_similarity": auc(col(shared, "similarity"), col(nrows, "similarity")),
        "auc_raw_similarity": auc(
            [r["details"]["companions"]["raw_similarity"] for r in shared],
            [r["details"]["companions"]["raw_similarity"] for r in nrows],
        ),
        "similarity_features": sorted(round(x, 3) for x in col(shared, "similarity")),
        "similarity_null": sorted(round(x, 3) for x in col(nrows, "similarity")),
        "seconds_per_feature": sorted(round(r["seconds"], 1) for r in feats.values()),
    }
    for m in ("a", "b"):
        out[f"auc_log_coef_{m}_null_over_features"] = auc(
            np.log(col(nrows, "coefficients", m)).tolist(),
            np.log(col(shared, "coefficients", m)).tolist(),
        )
        out[f"auc_output_{m}"] = auc(col(shared, "output", m), col(nrows, "output", m))
    out["variants"] = variants(shared, nrows)
    return out


def import_null(db, run_id: str, session, paths: list[Path]) -> None:
    """Store null effects saved by `EffectSession.save_null` (the first `nulls` of each
    model). A file saved with another `nulls` holds the same directions: they are drawn
    in one seeded sequence, so the first n of a larger draw are the draw of n."""
    from engine.steering.effects.measure import Effect
    from engine.steering.effects.run import NULL, load_null

    load_null(db, run_id, session)
    have = set(session.nulls)
    for path in paths:
        for row in json.loads(path.read_text())["null"]:
            key = (row["source"], int(row["item"]))
            if key in have or key[1] >= session.cfg.nulls:
                continue
            have.add(key)
            effect = Effect.from_json(row["effect"])
            session.nulls[key] = effect
            db.add_effect(
                run_id, settings=session.key, kind=NULL, item=key[1], feature_id=None,
                source=key[0], similarity=effect.similarity, exclusivity=effect.exclusivity,
                z=None, percentile=None, details=effect.to_json(),
            )  # fmt: skip


def variants(shared: list, null: list) -> dict:
    """AUCs (shared over null) of other readings of the same stored effects: rank
    correlation on the source's own panel strings only, Pearson correlation, and the share
    of the source's promoted strings the target also raises."""
    from scipy.stats import pearsonr

    from engine.steering.effects.measure import rank_correlation

    def readings(row) -> dict:
        d = row["details"]
        src, tgt = d["source"], d["target"]
        a, b = np.asarray(d["changes"][src]), np.asarray(d["changes"][tgt])
        own = np.asarray([o.startswith(src) for o in d["origins"]])
        up = np.asarray([o == f"{src}+" for o in d["origins"]])
        return {
            "spearman_all": rank_correlation(a, b),
            "spearman_source_panel": rank_correlation(a[own], b[own]),
            "pearson_all": float(pearsonr(a, b).statistic) if np.ptp(a) and np.ptp(b) else 0.0,
            "promoted_raised": float((b[up] > 0).mean()) if up.any() else 0.0,
        }

    rs, rn = [readings(r) for r in shared], [readings(r) for r in null]
    return {k: auc([r[k] for r in rs], [r[k] for r in rn]) for k in rs[0]}


def offline_protocol(db, args, pair, session, shared) -> dict:
    """The paper's protocol with the offline judge (demo settings) on the same shared
    features and on null directions, half from each model: AUC of its similarity."""
    from engine import stages
    from engine.steering.effects.run import feature_direction
    from engine.steering.exclusivity import score_vectors
    from engine.steering.pair import FeatureVectors

    judge = stages.steering_judge("offline")
    cfg = stages.exclusivity_config(
        alphas=(0.0, 2.0, 4.0, 6.0, 8.0, 10.0), max_new_tokens=32, samples=1
    )
    from dataclasses import replace

    cfg = replace(cfg, judge_filtered=True)
    s_maxes = []
    sims_shared = []
    for fid in shared:
        s_max = float(db.feature(args.run_id, int(fid))["s_max"])
        s_maxes.append(s_max)
        _, source = feature_direction(pair, int(fid))  # the same source as the measure's
        vectors = pair.vectors(int(fid), s_max, source)
        result = score_vectors(pair, vectors, judge, cfg)
        sims_shared.append(6.0 - result.unfiltered)
        print(f"offline shared {fid}: similarity {6.0 - result.unfiltered:.2f}", flush=True)
    # null directions at the median decoder norm and median s_max of the shared features,
    # as the calibration's null is steered
    norms = {m: [] for m in ("a", "b")}
    for fid in shared:
        for m in ("a", "b"):
            v = pair.vectors(int(fid), 1.0, m).source_vector
            norms[m].append(float(v.norm()))
    sims_null = []
    n = len(shared)
    for k in range(n):
        source = "ab"[k % 2]
        direction = session.null_vectors(source)[k // 2]
        own = direction / direction.norm() * float(np.median(norms[source]))
        moved = pair.stitch.map(own, source)
        vectors = FeatureVectors(-1 - k, source, "b" if source == "a" else "a",
                                 float(np.median(s_maxes)), own, moved)  # fmt: skip
        result = score_vectors(pair, vectors, judge, cfg)
        sims_null.append(6.0 - result.unfiltered)
        print(
            f"offline null {source}{k // 2}: similarity {6.0 - result.unfiltered:.2f}", flush=True
        )
    return {
        "auc_similarity_shared_vs_null": auc(sims_shared, sims_null),
        "shared_similarity": sims_shared,
        "null_similarity": sims_null,
    }


if __name__ == "__main__":
    main()
