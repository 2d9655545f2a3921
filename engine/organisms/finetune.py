"""Fine-tuning that implants a behaviour: LoRA adapters (peft) or a full fine-tune, trained on
the answer tokens of chat examples only.

The loss is computed on the answer positions alone, from the final hidden states, so a model
with a large vocabulary (Gemma: 262,144 entries) never materialises logits for the prompt.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.layers import decoder_layers, resolve_layer
from engine.organisms.data import Example, tokenize_example

# The projections every supported architecture (Llama, Gemma 2/3, Qwen, Mistral) names alike.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneSettings:
    """How an organism is fine-tuned."""

    method: Literal["lora", "full"] = "lora"
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-3
    epochs: int = 2
    batch_size: int = 8
    max_tokens: int = 160  # per example, prompt and template included
    # Train blocks 0 to this one ("middle", an index, or "all"). The default, the layer the
    # demo's crosscoder reads, makes the organism decide its behaviour by that layer, so the
    # behaviour is there to be found in what the diff reads (docs/organisms.md).
    through_layer: int | str = "middle"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"fine-tune method must be 'lora' or 'full', not {self.method!r}")
        for name in ("rank", "epochs", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fine-tune {name} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("fine-tune lr must be a positive number")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (recorded with the organism)."""
        return asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tune did."""

    steps: int
    tokens: int  # answer tokens trained on, all epochs
    first_loss: float
    last_loss: float
    seconds: float
    trainable_parameters: int


def finetune(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: FinetuneSettings,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune `model` on `examples`; returns the model with the change merged into its
    weights (a plain transformers model) and what the run did."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    model.train()
    trainable = _trainable(model, settings)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    batches = _batches(tokenizer, examples, settings)
    total = len(batches) * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * (1 - step / total)
    )
    rng = random.Random(settings.seed)
    losses: list[float] = []
    tokens = 0
    for _epoch in range(settings.epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            ids, mask, labels = batches[i]
            loss = answer_loss(trainable, ids, mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int((labels[:, 1:] != -100).sum())
            if on_step is not None:
                on_step(len(losses), total, losses[-1])
    merged = _merged(trainable, settings)
    merged.eval().requires_grad_(False)
    result = FinetuneResult(
        steps=len(losses),
        tokens=tokens,
        first_loss=sum(losses[:3]) / max(1, len(losses[:3])),
        last_loss=sum(losses[-3:]) / max(1, len(losses[-3:])),
        seconds=time.perf_counter() - start,
        trainable_parameters=sum(p.numel() for p in params),
    )
    return merged, result


def answer_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions only."""
    causal = _causal_lm(model)
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = output_logits(causal, hidden[:, :-1][keep])
    return nn.functional.cross_entropy(logits.float(), targets[keep])


def output_logits(causal: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to final hidden states (with the logit soft-cap where the
    architecture has one)."""
    logits = causal.lm_head(hidden)
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _trainable(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    """The model with LoRA adapters attached, or with its blocks unfrozen for a full tune."""
    n_layers = len(decoder_layers(model))
    last = settings.through_layer
    upto = n_layers if last == "all" else resolve_layer(n_layers, last) + 1
    if settings.method == "full":
        model.requires_grad_(False)
        for block in decoder_layers(model)[:upto]:
            block.requires_grad_(True)
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError('LoRA fine-tuning needs peft; run: pip install -e ".[models]"') from None
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=list(range(upto)),
        bias="none",
    )
    return get_peft_model(model, config)


def _merged(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    """A plain transformers model with the fine-tune in its weights."""
    if settings.method == "lora":
        return model.merge_and_unload()
    return model


def _batches(tokenizer: Any, examples: Sequence[Example], settings: FinetuneSettings
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Examples tokenised and packed into right-padded batches of similar length."""
    encoded = [tokenize_example(tokenizer, ex, settings.max_tokens) for ex in examples]
    encoded = [(ids, labels) for ids, labels in encoded if any(t != -100 for t in labels[1:])]
    # Similar lengths together: less padding, and the order is shuffled per epoch anyway.
    encoded.sort(key=lambda pair: len(pair[0]))
    pad = tokenizer.pad_token_id
    out = []
    for i in range(0, len(encoded), settings.batch_size):
        chunk = encoded[i : i + settings.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (tok, lab) in enumerate(chunk):
            ids[row, : len(tok)] = torch.tensor(tok)
            mask[row, : len(tok)] = 1
            labels[row, : len(lab)] = torch.tensor(lab)
        out.append((ids, mask, labels))
    return out
