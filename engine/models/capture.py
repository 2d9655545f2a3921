"""Residual-stream activations at one block's output, without running the rest of the model.

A forward hook on the chosen block stores its output and raises a private exception, so the
forward pass ends there: later blocks, the final norm and the LM head (often the largest
matmul of a small model) never run.

Relation to ``output_hidden_states``: in transformers 5.23 ``hidden_states[0]`` is the input of
block 0 (the scaled embeddings for Gemma) and ``hidden_states[i + 1]`` the output of block
``i``, EXCEPT the last entry, which is replaced by ``last_hidden_state``, i.e. it has the final
norm applied. ``capture_residual(model, L)`` therefore equals ``hidden_states[L + 1]`` for every
block but the last, where it returns the raw (un-normed) output of the last block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.models.layers import decoder_layers, resolve_layer


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass at the hooked block."""


def capture_residual(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream [batch, seq, d] at the output of block `layer`."""
    layers = decoder_layers(model)
    block = layers[resolve_layer(len(layers), layer)]
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        # Blocks return a tensor (transformers 5) or a tuple led by the hidden state (older).
        captured.append(output[0] if isinstance(output, tuple | list) else output)
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            # use_cache=False: no KV cache is built for a pass that never finishes.
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} of {type(model).__name__} was never called")
    return captured[0]
