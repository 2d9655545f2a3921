"""Training steps per second: the engine's sparse DFC trainer vs a dense baseline.

Both run the same DFC configuration (5% / 5% / 90% partition, BatchTopK, AuxK with 10% of
the features dead, Adam, gradient clipping) on the same random batches, each in its own
subprocess so peak memory is measured separately. Prints a table and the speed ratio.

    python benchmarks/train_step.py                 # CPU config
    python benchmarks/train_step.py --config paper  # GPU, paper scale (bf16)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def run_engine(cfg: dict, device: torch.device, bf16: bool) -> float:
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
            : int(DEAD_FRACTION * cfg["n_features"])
        ]
    ] = True
    batches = _batches(cfg, device)

    def step(i: int) -> None:
        trainer.since_fired[dead.to(device)] = 10**12  # keep the same features dead
        trainer.step(*batches[i % len(batches)])

    return _time(step, cfg, device)


def run_dense(cfg: dict, device: torch.device, bf16: bool) -> float:
    """Seconds per step of the dense masked baseline."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dense_baseline import DenseDFC

    n_a = n_b = round(0.05 * cfg["n_features"])
    model = DenseDFC(cfg["d_a"], cfg["d_b"], cfg["n_features"], n_a, n_b).to(device)
    # The same fused Adam as the engine, so the ratio measures the sparse design only.
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(cfg["n_features"], device=device)
    dead[: int(DEAD_FRACTION * cfg["n_features"])] = 1
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


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _time(step, cfg: dict, device: torch.device) -> float:
    for i in range(cfg["warmup"]):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(cfg["steps"]):
        step(i)
    _sync(device)
    return (time.perf_counter() - start) / cfg["steps"]


def child(impl: str, config: str, device_name: str, bf16: bool, steps: int | None) -> None:
    """Run one implementation and print a JSON line with its timing and peak memory."""
    device = torch.device(device_name)
    cfg = dict(CONFIGS[config])
    if steps:
        cfg["steps"] = steps
    torch.manual_seed(0)
    seconds = (run_engine if impl == "engine" else run_dense)(cfg, device, bf16)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"impl": impl, "s_per_step": seconds, "peak_gib": peak}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 even on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation")
    parser.add_argument("--impls", default="dense,engine")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.startswith("cuda") and not args.no_bf16
    if args.child:
        child(args.child, args.config, device, bf16, args.steps)
        return

    results = {}
    for impl in args.impls.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            impl,
            "--config",
            args.config,
            "--device",
            device,
        ]
        cmd += ["--no-bf16"] if not bf16 else []
        cmd += ["--steps", str(args.steps)] if args.steps else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            results[impl] = {"impl": impl, "error": proc.stderr.strip().splitlines()[-1]}
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])

    cfg = CONFIGS[args.config]
    print(
        f"\nconfig {args.config}: d {cfg['d_a']}+{cfg['d_b']}, {cfg['n_features']:,} features, "
        f"batch {cfg['batch']}, k {cfg['k']}, k_aux {cfg['k_aux']}, {DEAD_FRACTION:.0%} dead, "
        f"device {device}{' bf16' if bf16 else ' fp32'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'implementation':<16}{'s/step':>10}{'steps/s':>10}{'peak GiB':>10}")
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:<16}  failed: {r['error']}")
            continue
        print(
            f"{impl:<16}{r['s_per_step']:>10.4f}{1 / r['s_per_step']:>10.2f}{r['peak_gib']:>10.2f}"
        )
    if all("s_per_step" in results.get(i, {}) for i in ("dense", "engine")):
        ratio = results["dense"]["s_per_step"] / results["engine"]["s_per_step"]
        print(f"engine speed-up over dense baseline: {ratio:.2f}x")
        results["speedup"] = ratio
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "device": device, **results}))


if __name__ == "__main__":
    main()
