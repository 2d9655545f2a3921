"""Training steps per second: the engine's sparse DFC trainer vs a dense baseline and
the paper's own trainer.

All run the same DFC configuration (5% / 5% / 90% partition, BatchTopK, AuxK with 10% of
the features dead, Adam, gradient clipping) on the same random batches, each in its own
subprocess (so peak memory is measured separately) with the same number of threads.
Prints a table (wall-clock and process CPU seconds per step: on a shared machine the CPU
time varies less with the load) and the speed ratios.

The paper's trainer (impl `paper`, `benchmarks/paper_trainer.py`) runs when its code is
found: --paper-code PATH, else $MODELDIFF_PAPER_CODE, else the local mirror of
superkaiba/dfc_learning (a git repository is extracted to a temporary directory). Its
child process stubs the unused imports nnsight, datasets and zstandard; it needs einops.
It has one hidden size for both models, so it runs at d = max(d_a, d_b) for both (the
narrower model zero-padded): slightly more work than the engine's.

    python benchmarks/train_step.py                 # CPU config
    python benchmarks/train_step.py --config paper  # GPU, paper scale (bf16)
    python benchmarks/train_step.py --steps 10 --rounds 2 --impls engine,engine@/tmp/old
        # best of 2 alternating rounds, against the engine of another checkout
    python benchmarks/train_step.py --dead 0        # no dead features: no AuxK anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package
import paper_trainer

CONFIGS = {
    # The demo scale: SmolLM2-135M (576) vs Gemma-3-270m (640).
    "cpu": dict(
        d_a=576, d_b=640, n_features=16_384, batch=1024, k=64, k_aux=512, steps=6, warmup=2
    ),
    # The paper's Llama-3.1-8B vs Qwen3-8B crosscoder (appendix B.1.1).
    "paper": dict(
        d_a=4096, d_b=4096, n_features=131_072, batch=2048, k=200, k_aux=512, steps=30, warmup=5
    ),
}
DEAD_FRACTION = 0.10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(cfg: dict, device: torch.device, n: int = 4):
    gen = torch.Generator().manual_seed(0)
    # Gaussian data scaled to the normalised median norm sqrt(d_a + d_b) / 2.
    scale = ((cfg["d_a"] + cfg["d_b"]) ** 0.5 / 2) / cfg["d_a"] ** 0.5
    return [
        (
            (torch.randn(cfg["batch"], cfg["d_a"], generator=gen) * scale).to(device),
            (torch.randn(cfg["batch"], cfg["d_b"], generator=gen) * scale).to(device),
        )
        for _ in range(n)
    ]


def run_engine(cfg: dict, device: torch.device, bf16: bool) -> tuple[float, float]:
    """Seconds per step of engine.crosscoder.trainer.Trainer."""
    from engine.config import CrosscoderConfig, TrainConfig
    from engine.crosscoder.trainer import Trainer

    trainer = Trainer(
        CrosscoderConfig(d_a=cfg["d_a"], d_b=cfg["d_b"], n_features=cfg["n_features"]),
        TrainConfig(
            k=cfg["k"],
            k_initial=None,
            k_aux=cfg["k_aux"],
            warmup_steps=0,
            device=str(device),
            autocast_bf16=bf16,
            outlier_factor=None,
            dead_window_tokens=10_000_000,
        ),
    )
    dead = torch.zeros(cfg["n_features"], dtype=torch.bool)
    dead[
        torch.randperm(cfg["n_features"], generator=torch.Generator().manual_seed(1))[
            : int(cfg["dead"] * cfg["n_features"])
        ]
    ] = True
    batches = _batches(cfg, device)

    def step(i: int) -> None:
        trainer.since_fired[dead.to(device)] = 10**12  # keep the same features dead
        trainer.step(*batches[i % len(batches)])

    return _time(step, cfg, device)


def run_dense(cfg: dict, device: torch.device, bf16: bool) -> tuple[float, float]:
    """Seconds per step of the dense masked baseline."""
    from dense_baseline import DenseDFC

    n_a = n_b = round(0.05 * cfg["n_features"])
    model = DenseDFC(cfg["d_a"], cfg["d_b"], cfg["n_features"], n_a, n_b).to(device)
    # The same fused Adam as the engine, so the ratio measures the sparse design only.
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(cfg["n_features"], device=device)
    dead[: int(cfg["dead"] * cfg["n_features"])] = 1
    batches = _batches(cfg, device)

    def step(i: int) -> None:
        x_a, x_b = batches[i % len(batches)]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else _Null()
        with ctx:
            loss = model.loss(x_a, x_b, cfg["k"], dead, cfg["k_aux"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return _time(step, cfg, device)


def run_paper(cfg: dict, device: torch.device, bf16: bool, code: str) -> tuple[float, float]:
    """Seconds per step of the paper's BatchTopKCrossCoderTrainer.update (DFC)."""
    trainer, dead = paper_trainer.paper_trainer(Path(code), cfg, device, cfg["dead"])
    batches = [paper_trainer.padded_batch(x_a, x_b) for x_a, x_b in _batches(cfg, device)]

    def step(i: int) -> None:
        trainer.num_tokens_since_fired[dead] = 10**12  # keep the same features dead
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else _Null()
        with ctx:
            trainer.update(i, batches[i % len(batches)])

    return _time(step, cfg, device)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _time(step, cfg: dict, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step (CPU time: the work done, which on a
    shared machine varies less with the load than the wall clock does)."""
    for i in range(cfg["warmup"]):
        step(i)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(cfg["steps"]):
        step(i)
    _sync(device)
    steps = cfg["steps"]
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def child(args: argparse.Namespace, device_name: str, bf16: bool) -> None:
    """Run one implementation and print a JSON line with its timing and peak memory."""
    impl, device = args.child, torch.device(device_name)
    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS[args.config], dead=args.dead)
    if args.steps:
        cfg["steps"] = args.steps
    torch.manual_seed(0)
    if impl == "paper":
        seconds, cpu = run_paper(cfg, device, bf16, args.paper_code)
    else:
        seconds, cpu = (run_engine if impl == "engine" else run_dense)(cfg, device, bf16)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"impl": impl, "s_per_step": seconds, "cpu_s_per_step": cpu, "peak_gib": peak}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 even on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation")
    parser.add_argument(
        "--impls",
        default=None,
        help="default: dense,engine[,paper]; engine@PATH: the engine of the checkout at PATH",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--dead", type=float, default=DEAD_FRACTION, help="share of dead features (AuxK)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every impl this often, keep each one's best"
    )
    parser.add_argument(
        "--paper-code",
        default=paper_trainer.default_location(),
        help="the paper's code (dfc_learning): a work tree or a git repository",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.startswith("cuda") and not args.no_bf16
    if args.child:
        child(args, device, bf16)
        return
    impls = args.impls or "dense,engine" + (",paper" if args.paper_code else "")
    if "paper" in impls.split(","):
        if not args.paper_code:
            parser.error("impl paper needs the paper's code: --paper-code PATH")
        args.paper_code = str(paper_trainer.work_tree(args.paper_code))
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternating, so that a busy spell hits every impl
        for impl in impls.split(","):
            r = _run_child(impl, args, device, bf16)
            if r.get("s_per_step", math.inf) < results.get(impl, {}).get("s_per_step", math.inf):
                results[impl] = r
            results.setdefault(impl, r)
    _report(results, args, device, bf16)


def _run_child(impl: str, args: argparse.Namespace, device: str, bf16: bool) -> dict:
    """One implementation's result, timed in a subprocess of its own. `engine@PATH` is the
    engine of another checkout (PATH holds its `engine/`, e.g. a worktree of an earlier
    commit), for a before/after comparison within one run."""
    name, _, checkout = impl.partition("@")
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", name, "--config", args.config]
    cmd += ["--device", device, "--threads", str(args.threads), "--dead", str(args.dead)]
    cmd += ["--no-bf16"] if not bf16 else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--paper-code", args.paper_code] if name == "paper" else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return {"impl": impl, "error": proc.stderr.strip().splitlines()[-1]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "impl": impl}


def _report(results: dict, args: argparse.Namespace, device: str, bf16: bool) -> None:
    """Print the table and the speed ratios; write them as JSON if asked."""
    cfg = CONFIGS[args.config]
    print(
        f"\nconfig {args.config}: d {cfg['d_a']}+{cfg['d_b']}, {cfg['n_features']:,} features, "
        f"batch {cfg['batch']}, k {cfg['k']}, k_aux {cfg['k_aux']}, {args.dead:.0%} dead, "
        f"device {device}{' bf16' if bf16 else ' fp32'}, torch {torch.__version__}, "
        f"{args.threads} threads, {args.steps or cfg['steps']} steps"
        + (f", best of {args.rounds} rounds" if args.rounds > 1 else "")
        + f", load average {os.getloadavg()[0]:.1f} at the end"
    )
    if "paper" in results:
        d = max(cfg["d_a"], cfg["d_b"])
        print(
            f"paper: the paper's BatchTopKCrossCoderTrainer, one hidden size d {d} for both "
            f"models (A zero-padded), so slightly more work than the engine's"
        )
    w = max(16, *(len(impl) + 2 for impl in results))
    print(f"{'implementation':<{w}}{'s/step':>10}{'steps/s':>10}{'CPU s/step':>12}{'peak GiB':>10}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<{w}}  failed: {r['error']}")
            continue
        print(
            f"{impl:<{w}}{r['s_per_step']:>10.4f}{1 / r['s_per_step']:>10.2f}"
            f"{r['cpu_s_per_step']:>12.4f}{r['peak_gib']:>10.2f}"
        )
    others = [("dense", "dense baseline", "speedup")]
    others += [("paper", "the paper's trainer", "speedup_paper")]
    others += [(i, i, f"speedup_{i}") for i in results if i.startswith("engine@")]
    for other, label, key in others:
        if all("s_per_step" in results.get(i, {}) for i in (other, "engine")):
            ratio = results[other]["s_per_step"] / results["engine"]["s_per_step"]
            cpu = results[other]["cpu_s_per_step"] / results["engine"]["cpu_s_per_step"]
            print(f"engine speed-up over {label}: {ratio:.2f}x (CPU time: {cpu:.2f}x)")
            results[key] = ratio
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "device": device, **results}))


if __name__ == "__main__":
    main()
