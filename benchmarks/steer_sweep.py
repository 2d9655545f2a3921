"""A steering sweep as one batched generation vs one generation per strength.

Both steer SmolLM2 (demo model A) at its middle layer along the same unit direction scaled
to the layer's typical norm, with greedy decoding, and must produce identical texts; the
batched sweep carries one coefficient per row.

    python benchmarks/steer_sweep.py --strengths 11 --tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.models.capture import capture_residual
from engine.models.loading import load_model
from engine.steering.steer import GenerationConfig, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strengths", type=int, default=11)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    m = load_model("smollm2")
    layer = m.n_layers // 2
    prompt = "Write a short note about your favourite city."
    ids = m.tokenizer(prompt, return_tensors="pt")["input_ids"]
    # A direction at the scale of the layer's activations (median norm over the prompt).
    scale = capture_residual(m.model, layer, ids)[0, 1:].norm(dim=-1).median().item()
    vector = torch.nn.functional.normalize(torch.randn(m.d_model), dim=0)
    alphas = torch.linspace(0, 1, args.strengths).tolist()
    cfg = GenerationConfig(max_new_tokens=args.tokens)
    sweep(m, prompt, vector, layer, scale, alphas[:2], cfg=cfg)  # warm-up
    t = time.perf_counter()
    batched = sweep(m, prompt, vector, layer, scale, alphas, cfg=cfg)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    looped = [sweep(m, prompt, vector, layer, scale, [a], cfg=cfg)[0] for a in alphas]
    t_loop = time.perf_counter() - t
    same = sum(a == b for a, b in zip(batched, looped, strict=True))
    print(f"{args.strengths} strengths x {args.tokens} new tokens, greedy, SmolLM2 layer {layer}")
    print(f"batched sweep   {t_batched:6.2f} s")
    print(f"one per strength {t_loop:6.2f} s")
    print(f"speed-up {t_loop / t_batched:.1f}x; identical texts {same}/{len(alphas)}")


if __name__ == "__main__":
    main()
