"""Cached vs streamed training on the demo pair (SmolLM2-135M vs Gemma-3-270m, CPU).

(a) cached: `harvest` a store of analysis + training pairs, then train on it (`train
    --store`, which holds out `validation_pairs` of the store's windows);
(b) streamed: `train --stream`: the first `analysis` pairs go to RUN/store (the hold-out),
    and training runs on pairs computed live from the documents after it.

Both train the demo preset's crosscoder for the same steps x batch (so each sees as many
training pairs; the stream sees each once). Every phase runs in its own subprocess, so
each peak memory is that phase's alone: the peak resident set size (ru_maxrss) of the
process, models, store reads and crosscoder included. Also prints pairs/s of each phase,
bytes per stored pair, each run's held-out FVE (on its own hold-out: different windows),
and the replay rate of a streamed resume (tokenisation and alignment only).

    OMP_NUM_THREADS=1 python benchmarks/streaming.py     # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPLAY_PAIRS = 50_000


def settings(args: argparse.Namespace):
    """The demo preset with the benchmark's budget: (run config, stream config)."""
    from engine.config import StreamConfig, load_preset

    cfg = load_preset("demo")
    cfg.train = replace(
        cfg.train, steps=args.steps, batch_size=args.batch, warmup_steps=min(10, args.steps),
        anneal_steps=args.steps, log_every=args.steps, checkpoint_every=10 * args.steps,
        validation_pairs=args.validation,
    )  # fmt: skip
    stream = StreamConfig(analysis_pairs=args.analysis, buffer_pairs=args.buffer)
    return cfg, stream


def peak_gb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def held_out(final: dict) -> dict:
    return {"val_fve_a": final.get("val_fve_a"), "val_fve_b": final.get("val_fve_b")}


def phase_harvest(args, work: Path) -> dict:
    """(a) 1: a store of analysis + training pairs."""
    from engine import stages
    from engine.activations.stats import bytes_per_pair

    cfg, _ = settings(args)
    pairs = args.analysis + args.steps * args.batch
    started = time.perf_counter()
    result = stages.harvest(replace(cfg.harvest, max_pairs=pairs), work / "store", progress=False)
    return {
        "pairs": result.pairs,
        "seconds": result.seconds,  # after loading the models
        "load_seconds": time.perf_counter() - started - result.seconds,
        "bytes_per_pair": bytes_per_pair(result.manifest),
    }


def phase_train(args, work: Path) -> dict:
    """(a) 2: train on the store."""
    from engine import stages

    cfg, _ = settings(args)
    data = stages.training_data(store=work / "store")
    cfg = replace(cfg, crosscoder=replace(cfg.crosscoder, d_a=data.dims[0], d_b=data.dims[1]))
    started = time.perf_counter()
    result = stages.train(cfg, data, work / "cached", resume=False, progress=False)
    return {"seconds": time.perf_counter() - started, **held_out(result.final)}


def phase_stream(args, work: Path) -> dict:
    """(b): the analysis store, then training on the live stream; then the replay rate."""
    from engine import stages
    from engine.streaming.run import StreamRun

    cfg, stream_cfg = settings(args)
    started = time.perf_counter()
    run = StreamRun(cfg.harvest, stream_cfg, work / "streamed", fresh=True, progress=False)
    loaded = time.perf_counter()
    data = stages.streaming_data(run, cfg.train.batch_size)
    stored = time.perf_counter()
    result = stages.train(cfg, data, work / "streamed", resume=False, progress=False)
    trained = time.perf_counter()
    # What a resume replays: training windows tokenised and aligned, no forward pass (over
    # REPLAY_PAIRS, so that the one-off reading of the demo corpus counts little).
    source, replayed = data.source, 0
    for planned in source.training_windows():
        replayed = planned.end
        if replayed >= REPLAY_PAIRS:
            break
    return {
        "load_seconds": loaded - started,
        "store_seconds": stored - loaded,
        "store_pairs": source.manifest["stats"]["count"],
        "train_seconds": trained - stored,
        "replay_pairs": replayed,
        "replay_seconds": time.perf_counter() - trained,
        **held_out(result.final),
    }


PHASES = {"harvest": phase_harvest, "train": phase_train, "stream": phase_stream}


def child(args) -> None:
    out = PHASES[args.phase](args, Path(args.work))
    print(json.dumps({**out, "peak_gb": peak_gb()}))


def run_phase(name: str, argv: list[str], work: Path) -> dict:
    """One phase in a subprocess of its own; its result line."""
    cmd = [sys.executable, __file__, *argv, "--phase", name, "--work", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode:
        sys.exit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, h: dict, t: dict, s: dict) -> None:
    training = args.steps * args.batch
    print(
        f"budget: {args.analysis:,} analysis pairs, {args.steps} steps x {args.batch} = "
        f"{training:,} training pairs; blocks of {args.buffer:,}; torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"{'phase':<44}{'seconds':>9}{'pairs/s':>9}{'peak RSS':>10}")
    rows = [
        ("(a) harvest store (after loading)", h["seconds"], h["pairs"], h["peak_gb"]),
        ("(a) train from the store", t["seconds"], training, t["peak_gb"]),
        ("(b) analysis store (after loading)", s["store_seconds"], s["store_pairs"], None),
        ("(b) train on the stream", s["train_seconds"], training, s["peak_gb"]),
    ]
    for label, seconds, pairs, peak in rows:
        rss = f"{peak:.2f} GB" if peak is not None else ""
        print(f"{label:<44}{seconds:>9.1f}{pairs / seconds:>9.0f}{rss:>10}")
    cached = h["seconds"] + t["seconds"]
    streamed = s["store_seconds"] + s["train_seconds"]
    print(
        f"total after loading: (a) {cached:.1f} s, (b) {streamed:.1f} s; model loading "
        f"{h['load_seconds']:.1f} s / {s['load_seconds']:.1f} s"
    )
    print(
        f"disk: (a) {h['pairs']:,} pairs x {h['bytes_per_pair']:,.0f} bytes; (b) only its "
        f"{s['store_pairs']:,}-pair analysis store"
    )
    print(
        f"replay (tokenise + align, no forward): {s['replay_pairs'] / s['replay_seconds']:,.0f}"
        f" pairs/s vs {training / s['train_seconds']:,.0f} pairs/s streamed training"
    )
    for name, r in (("(a) cached", t), ("(b) streamed", s)):
        fve = [f"{v:.3f}" if v is not None else "n/a" for v in (r["val_fve_a"], r["val_fve_b"])]
        print(f"held-out FVE {name}: A {fve[0]}, B {fve[1]} (its own hold-out)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", type=int, default=2000, help="analysis-store pairs")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    # The normaliser fit reads the first 8,192 pairs: with smaller blocks, or fewer training
    # pairs, the stream would run the models over pairs it never trains on.
    parser.add_argument("--buffer", type=int, default=8192, help="pairs per shuffled block")
    parser.add_argument("--validation", type=int, default=512, help="held-out pairs measured")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args)
        return
    argv = [
        f"--{k}={getattr(args, k)}" for k in ("analysis", "steps", "batch", "buffer", "validation")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        h = run_phase("harvest", argv, work)
        t = run_phase("train", argv, work)
        s = run_phase("stream", argv, work)
    report(args, h, t, s)


if __name__ == "__main__":
    main()
