"""Harvest throughput on the demo pair: forward stopped at the layer vs a full forward.

Both runs are the whole `harvest` pipeline on the same texts (demo mixture: chitchat
conversations and pydoc/KJV prose), with the same windows, batches and store; they differ
only in how the residual stream is obtained:
- engine: a hook ends the forward pass at the captured layer (no later layers, no lm_head);
- baseline: a plain forward with ``output_hidden_states=True``, reading hidden_states[L + 1].

Prints aligned pairs/s for both, the ratio, and disk bytes per pair.

    python benchmarks/harvest.py --pairs 5000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from engine.activations.stats import bytes_per_pair
from engine.config import HarvestConfig
from engine.harvest.pipeline import harvest
from engine.models.loading import load_model


def full_forward(model, layer: int, input_ids, attention_mask=None) -> torch.Tensor:
    """hidden_states[layer + 1] of a complete forward pass (logits included)."""
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
    return out.hidden_states[layer + 1]


def run(cfg: HarvestConfig, models, capture=None) -> tuple[float, int, float]:
    """(pairs/s, pairs, bytes/pair) of one harvest into a temporary store."""
    kwargs = {} if capture is None else {"capture": capture}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = harvest(cfg, tmp, models=models, progress=False, **kwargs)
        seconds = time.perf_counter() - t
        return result.pairs / seconds, result.pairs, bytes_per_pair(result.manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--store-dtype", default="bfloat16")
    args = parser.parse_args()
    t = time.perf_counter()
    models = (load_model("smollm2"), load_model("gemma3"))
    print(
        f"models loaded in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}"
    )
    cfg = HarvestConfig(
        max_pairs=args.pairs, context_length=args.context_length, store_dtype=args.store_dtype
    )
    run(HarvestConfig(max_pairs=200, context_length=args.context_length), models)  # warm-up
    engine_rate, n, per_pair = run(cfg, models)
    base_rate, n_base, _ = run(cfg, models, capture=full_forward)
    print(f"{'method':<34}{'pairs':>8}{'pairs/s':>10}")
    print(f"{'engine (stop at layer)':<34}{n:>8}{engine_rate:>10.1f}")
    print(f"{'baseline (output_hidden_states)':<34}{n_base:>8}{base_rate:>10.1f}")
    print(
        f"speed-up: {engine_rate / base_rate:.2f}x; disk: {per_pair:,.0f} bytes/pair "
        f"({args.store_dtype}); 200k pairs would take {200_000 / engine_rate / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
