"""Does training ever wait on the activation store?

Writes a store of random pairs at the demo widths (576 + 640, bf16 on disk), then
1. reads shuffled batches as fast as possible (pairs/s, peak RSS growth), and
2. trains the demo-scale DFC on the store and measures the time the trainer spends waiting
   for its next batch, against the time it spends computing.

    python benchmarks/store_reader.py --pairs 200000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from engine.activations import ActivationStore, StoreWriter
from engine.activations.shards import WindowRecord
from engine.config import CrosscoderConfig, TrainConfig
from engine.crosscoder.training import train

D_A, D_B = 576, 640


def write_store(path: str, pairs: int, window: int = 200) -> None:
    """A store of random pairs in windows of `window` pairs (bf16, 16k-pair shards)."""
    header = {"models": {"a": {"d_model": D_A}, "b": {"d_model": D_B}}, "data": {}}
    writer = StoreWriter(path, header, dtype="bfloat16", shard_pairs=16_384)
    gen = torch.Generator().manual_seed(0)
    ids = np.arange(window + 1)
    offsets = np.stack([ids, ids + 1], 1)
    spans = offsets[:window]
    for i in range(pairs // window):
        rec = WindowRecord(
            i,
            f"d{i}",
            "bench",
            0,
            "x" * (window + 1),
            ids,
            offsets,
            ids,
            offsets,
            ids[1:],
            ids[1:],
            spans,
        )
        writer.add(
            rec, torch.randn(window, D_A, generator=gen), torch.randn(window, D_B, generator=gen)
        )
    writer.close(complete=True)


class TimedSource:
    """Wraps a source and accumulates the time spent waiting for each batch."""

    def __init__(self, source) -> None:
        self.source, self.wait, self.first = source, 0.0, 0.0

    def batches(self, batch_size, start_step=0, seed=0):
        it = self.source.batches(batch_size, start_step, seed)
        first = True
        while True:
            t = time.perf_counter()
            batch = next(it)
            # The first batch of an iterator waits for the first group to load; that fill
            # is reported apart from the steady state.
            if first:
                self.first += time.perf_counter() - t
            else:
                self.wait += time.perf_counter() - t
            first = False
            yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--buffer-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_store(tmp, args.pairs)
        print(f"wrote {args.pairs:,} pairs in {time.perf_counter() - t:.1f} s")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        store = ActivationStore(tmp, buffer_bytes=args.buffer_mib << 20)
        n_batches = args.pairs // args.batch
        t = time.perf_counter()
        for _, _ in zip(range(n_batches), store.batches(args.batch, 0, seed=0), strict=False):
            pass
        read_s = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        read_rate = n_batches * args.batch / read_s
        print(
            f"reader: {read_rate:,.0f} pairs/s over one epoch "
            f"({n_batches} batches of {args.batch}; buffer {args.buffer_mib} MiB, "
            f"peak RSS +{rss1 - rss0:.2f} GiB)"
        )
        timed = TimedSource(ActivationStore(tmp, buffer_bytes=args.buffer_mib << 20))
        cc = CrosscoderConfig(d_a=D_A, d_b=D_B, n_features=16_384)
        tc = TrainConfig(
            steps=args.steps,
            batch_size=args.batch,
            k=64,
            k_initial=None,
            warmup_steps=2,
            log_every=10,
            checkpoint_every=10_000,
        )
        t = time.perf_counter()
        train(cc, tc, timed, progress=False)
        total = time.perf_counter() - t
        compute = total - timed.wait - timed.first
        step_rate = args.steps * args.batch / compute
        print(
            f"training: {args.steps} steps in {total:.1f} s; first-batch fill "
            f"{timed.first:.2f} s; steady-state wait on the store {timed.wait:.3f} s "
            f"({timed.wait / compute:.2%} of compute); trainer consumes {step_rate:,.0f} pairs/s"
        )
        print(f"reader / trainer throughput ratio: {read_rate / step_rate:.1f}x")


if __name__ == "__main__":
    main()
