"""What do logit effects cost `modeldiff analyze` at a given dictionary size?

Random unembeddings of the demo models' real shapes (SmolLM2: 49,152 x 576, Gemma 3:
262,144 x 640) and a random DFC (5% A-exclusive, 5% B-exclusive, like the demo preset):
every feature's top promoted / suppressed tokens and histogram in both models (exclusive
features through their shared-partition transfer), then the rows written to a DuckDB file.
Each size runs in its own process, so its peak memory is its own.

    python benchmarks/logit_effects.py --features 4096 131072
    python benchmarks/logit_effects.py --features 131072 --sample-chunks 8   # projected

Columns: wall seconds for model A, model B, the write, in all, and the process's CPU
seconds in all (the work itself, whatever else shares the CPU); the resident memory
once the inputs exist (the unembeddings and the crosscoder), its peak during the work, and
the peak's growth over the inputs (what the chunked computation adds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = {"a": (49_152, 576), "b": (262_144, 640)}  # SmolLM2-135M, Gemma-3-270m


def _rss_mib(field: str) -> float:
    """VmRSS or VmHWM (the peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(n_features: int, chunk_mib: int, device: str, sample_chunks: int = 0) -> dict:
    """One size, in this process: seconds and memory."""
    import pandas as pd
    import torch

    from engine.analysis.logit_effects import (
        BINS,
        TOP,
        Readout,
        _effects_frame,
        chunk_rows,
        feature_vectors,
        logit_effects,
    )
    from engine.crosscoder.model import Crosscoder
    from engine.crosscoder.normalize import Normalizer
    from engine.partition import Partition
    from engine.results import Database

    torch.manual_seed(0)
    n_excl = round(0.05 * n_features)
    cc = Crosscoder(
        VOCAB["a"][1],
        VOCAB["b"][1],
        Partition(n_excl, n_excl, n_features - 2 * n_excl),
    ).requires_grad_(False)
    readouts = {
        k: Readout(
            torch.rand(d) + 0.5,
            torch.randn(v, d, device=device) * 0.02,
            [f"t{i}" for i in range(v)],
        )
        for k, (v, d) in VOCAB.items()
    }
    normalizer = Normalizer(0.05, 0.002)
    inputs = _rss_mib("VmRSS")
    _reset_peak()
    seconds, cpu, frames, projected = {}, {}, [], False
    for model, readout in readouts.items():
        t, c = time.perf_counter(), time.process_time()
        if not sample_chunks:
            frames.append(
                logit_effects(cc, normalizer, {model: readout}, chunk_bytes=chunk_mib << 20)
            )
            seconds[model] = time.perf_counter() - t
            cpu[model] = time.process_time() - c
            continue
        # Every vector (the batched transfer included) in full, then the first chunks of
        # the read-out; its time, linear in the rows, is projected to all of them and the
        # sample's rows are repeated to the full count for the write.
        ids, vectors, kinds = feature_vectors(cc, normalizer, model)
        t_vectors, c_vectors = time.perf_counter() - t, time.process_time() - c
        rows = min(len(ids), sample_chunks * chunk_rows(readout.vocab, chunk_mib << 20))
        t, c = time.perf_counter(), time.process_time()
        part = _effects_frame(
            readout, model, ids[:rows], vectors[:rows], kinds[:rows], TOP, BINS,
            chunk_mib << 20, False,
        )  # fmt: skip
        seconds[model] = t_vectors + (time.perf_counter() - t) * len(ids) / rows
        cpu[model] = c_vectors + (time.process_time() - c) * len(ids) / rows
        copies = -(-len(ids) // rows)
        full = pd.concat([part] * copies, ignore_index=True).iloc[: len(ids)].copy()
        full["feature_id"] = ids.numpy()
        frames.append(full)
        projected = projected or rows < len(ids)
    frame = pd.concat(frames, ignore_index=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        with Database(path) as db:
            db.add_run("bench", model_a={}, model_b={}, architecture="dfc",
                       n_features=n_features, partition={})  # fmt: skip
            t, c = time.perf_counter(), time.process_time()
            with db.transaction():
                db.write_logit_effects("bench", frame)
                for model, readout in readouts.items():
                    db.write_vocab("bench", model, readout.tokens)
            seconds["write"] = time.perf_counter() - t
            cpu["write"] = time.process_time() - c
        size = path.stat().st_size / 2**20
    peak = _rss_mib("VmHWM")
    return {
        "features": n_features,
        "rows": len(frame),
        "chunk_rows_b": chunk_rows(VOCAB["b"][0], chunk_mib << 20),
        **{f"s_{k}": v for k, v in seconds.items()},
        "s_total": sum(seconds.values()),
        "cpu_total": sum(cpu.values()),
        "inputs_mib": inputs,
        "peak_mib": peak,
        "growth_mib": peak - inputs,
        "db_mib": size,
        "projected": projected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 131072])
    parser.add_argument("--chunk-mib", type=int, default=256, help="logits block per chunk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sample-chunks",
        type=int,
        default=0,
        help="time only the first N chunks of each model's read-out and project the rest "
        "(linear in the features); 0: all of them",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.chunk_mib, args.device, args.sample_chunks)))
        return
    import torch

    print(
        f"logit effects, random DFC (5% + 5% exclusive), unembeddings A "
        f"{VOCAB['a'][0]:,} x {VOCAB['a'][1]}, B {VOCAB['b'][0]:,} x {VOCAB['b'][1]}, "
        f"device {args.device}, {torch.get_num_threads()} thread(s), chunk {args.chunk_mib} MiB"
    )
    head = (
        f"{'features':>9} {'rows':>8} {'A s':>8} {'B s':>8} {'write s':>8} {'total s':>8} "
        f"{'CPU s':>8} "
        f"{'inputs MiB':>10} {'peak MiB':>9} {'growth MiB':>10} {'DB MiB':>7}"
    )
    print(head)
    for n in args.features:
        command = [sys.executable, __file__, "--one", str(n), "--chunk-mib", str(args.chunk_mib)]
        command += ["--device", args.device, "--sample-chunks", str(args.sample_chunks)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['features']:>9,} {r['rows']:>8,} {r['s_a']:>8.1f} {r['s_b']:>8.1f} "
            f"{r['s_write']:>8.1f} {r['s_total']:>8.1f} {r['cpu_total']:>8.1f} "
            f"{r['inputs_mib']:>10,.0f} "
            f"{r['peak_mib']:>9,.0f} {r['growth_mib']:>10,.0f} {r['db_mib']:>7,.0f}"
            + ("  (A and B s projected from a sample of chunks)" if r["projected"] else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
