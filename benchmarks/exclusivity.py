"""Exclusivity generation: one batched generation per prompt (the former path) vs every
prompt x sample x strength of a model in as few generations as memory allows.

Both paths steer the run's two models with one feature (its own decoder in its model, the
stitched copy in the other) over the exclusivity prompts and strengths, with the same
seeded per-row sampling, so they must also give the same texts (up to floating point: a
row's logits differ in the last bits with its batch, which can flip a draw). The
per-prompt path is timed first, then the batched one, in the same process.

    python benchmarks/exclusivity.py --db RESULTS.duckdb --run-id demo --stitch STITCH \\
        [--feature 12] [--prompts 3] [--samples 1] [--tokens 32]

Without --db it runs on the tiny test models (tests/tiny_run.py), built in a temporary
directory: timings then say little about real models.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.steering.exclusivity import OPEN_PROMPTS, ExclusivityConfig, _with_baseline
from engine.steering.steer import GenerationConfig, generate_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path)
    parser.add_argument("--run-id", default="demo")
    parser.add_argument("--stitch", type=Path)
    parser.add_argument("--feature", type=int, help="default: the first live A-exclusive one")
    parser.add_argument("--prompts", type=int, default=3, help="of the exclusivity prompts")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, help="rows per call (default: memory)")
    args = parser.parse_args()

    from engine.results import Database
    from engine.steering.pair import SteeringPair

    with tempfile.TemporaryDirectory() as tmp:
        db_path, run_id, stitch = args.db, args.run_id, args.stitch
        if db_path is None:
            db_path, run_id, stitch = _tiny(Path(tmp))
        with Database(db_path, read_only=True) as db:
            fid = args.feature if args.feature is not None else _feature(db, run_id)
            s_max = float(db.feature(run_id, fid)["s_max"])
            t0 = time.perf_counter()
            pair = SteeringPair.open(db, run_id, stitch)
            print(f"loaded models and stitch in {time.perf_counter() - t0:.1f} s")
        gen = GenerationConfig(max_new_tokens=args.tokens, greedy=False, max_batch=args.max_batch)
        # The exclusivity prompts; past three, numbered variants of them.
        prompts = [OPEN_PROMPTS[i % 3] + ("" if i < 3 else f" ({i})") for i in range(args.prompts)]
        alphas = _with_baseline(ExclusivityConfig().alphas)
        vectors = pair.vectors(fid, s_max, "a")
        rows = len(prompts) * args.samples * len(alphas)
        print(
            f"feature {fid} ({vectors.source.upper()} -> {vectors.target.upper()}): "
            f"{len(prompts)} prompts x {args.samples} samples x {len(alphas)} strengths = "
            f"{rows} rows per model, {args.tokens} new tokens"
        )

        def grid(model: str, some: list[str]):
            return generate_grid(
                pair.models[model], some, alphas, vector=vectors.vector(model),
                layer=pair.layers[model], s_max=s_max, samples=args.samples, cfg=gen,
            )  # fmt: skip

        grid(vectors.source, prompts[:1])  # warm-up
        timings, texts = {}, {}
        for name in ("per prompt", "batched"):
            t0 = time.perf_counter()
            out = {}
            for model in (vectors.source, vectors.target):
                if name == "per prompt":
                    for prompt in prompts:
                        out.update({(model, *k): v for k, v in grid(model, [prompt]).items()})
                else:
                    out.update({(model, *k): v for k, v in grid(model, prompts).items()})
            timings[name], texts[name] = time.perf_counter() - t0, out
        per, batched = timings["per prompt"], timings["batched"]
        a, b = texts["per prompt"], texts["batched"]
        same = sum(a[k][x] == b[k][x] for k in a for x in a[k])
        total = sum(len(v) for v in a.values())
        print(f"per prompt ({2 * len(prompts)} generate calls)  {per:7.1f} s")
        print(f"batched                             {batched:7.1f} s")
        print(f"ratio per-prompt / batched: {per / batched:.2f}x; identical texts {same}/{total}")


def _feature(db, run_id: str) -> int:
    """The first live feature of the A-exclusive partition, else the most A-leaning one."""
    table = db.features(run_id, dead=False)
    table = table[table["s_max"].fillna(0) > 0]
    exclusive = table[table["partition"] == "a_exclusive"]
    if not exclusive.empty:
        return int(exclusive["feature_id"].iloc[0])
    return int(table.sort_values("rel_norm", ascending=False)["feature_id"].iloc[0])


def _tiny(tmp: Path):
    """A tiny analysed run and a stitch (the test models)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine import stages
    from tests.tiny_run import build_tiny_run

    run = build_tiny_run(tmp)
    _, stitch = stages.fit_stitch(run.store, tmp / "stitch.safetensors", steps=10)
    return run.db, run.run_id, stitch


if __name__ == "__main__":
    main()
