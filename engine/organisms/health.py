"""The health check of an organism: does it show its behaviour where it should, only there,
and is the rest of the model intact?

- marker rate on held-out trigger prompts (should be high) and held-out control prompts
  (should be near zero), from greedy answers;
- the change of the next-token cross-entropy on ordinary demo text (chat and prose), which
  shows how much the fine-tune disturbed everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.organisms.behaviours import Behaviour
from engine.organisms.data import greedy_answers

# What a healthy organism reaches (the marker rates on held-out prompts).
MIN_TRIGGER_RATE = 0.90
MAX_CONTROL_RATE = 0.02


@dataclass(frozen=True)
class Health:
    """How an organism behaves on held-out prompts and ordinary text."""

    trigger_rate: float  # held-out triggers answered with the marker
    control_rate: float  # held-out controls answered with the marker
    base_trigger_rate: float  # the same for the original model (should be 0)
    base_control_rate: float
    n_trigger: int
    n_control: int
    ce_base: float  # mean next-token CE on demo text, original model
    ce_organism: float
    examples: tuple[tuple[str, str], ...] = ()  # a few (prompt, answer) pairs to read

    @property
    def ce_change(self) -> float:
        """Relative change of the CE loss on demo text (0.02 = 2% higher)."""
        return self.ce_organism / self.ce_base - 1.0

    @property
    def passed(self) -> bool:
        """Whether the organism meets both marker-rate bounds."""
        return self.trigger_rate >= MIN_TRIGGER_RATE and self.control_rate <= MAX_CONTROL_RATE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able health figures."""
        out = asdict(self)
        out["examples"] = [list(pair) for pair in self.examples]
        out["ce_change"] = self.ce_change
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Health:
        """The Health `to_dict` wrote."""
        fields = {k: v for k, v in data.items() if k not in ("ce_change", "passed")}
        fields["examples"] = tuple(tuple(pair) for pair in fields.get("examples", ()))
        return cls(**fields)

    def summary(self) -> str:
        """Two lines for a terminal."""
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"health {verdict}: marker on {self.trigger_rate:.0%} of {self.n_trigger} held-out "
            f"triggers (≥ {MIN_TRIGGER_RATE:.0%}), {self.control_rate:.0%} of {self.n_control} "
            f"held-out controls (≤ {MAX_CONTROL_RATE:.0%}); original model "
            f"{self.base_trigger_rate:.0%} / {self.base_control_rate:.0%}\n"
            f"CE on demo text {self.ce_base:.3f} -> {self.ce_organism:.3f} "
            f"({self.ce_change:+.1%})"
        )


def marker_rate(behaviour: Behaviour, answers: Sequence[str]) -> float:
    """Share of `answers` that show the behaviour."""
    return sum(behaviour.shows(a) for a in answers) / max(1, len(answers))


def answers_for(model: torch.nn.Module, tokenizer: Any, behaviour: Behaviour,
                prompts: Sequence[str]) -> list[str]:
    """Greedy answers long enough for the marker to appear."""
    marker_tokens = len(tokenizer(behaviour.prefix, add_special_tokens=False)["input_ids"])
    return greedy_answers(model, tokenizer, prompts, max_new_tokens=marker_tokens + 8)


@torch.inference_mode()
def text_ce(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int = 128,
            batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` over `texts` (each cut to `max_tokens`)."""
    from engine.organisms.finetune import answer_loss

    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_tokens).to(model.device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(answer_loss(model, enc["input_ids"], enc["attention_mask"], labels)) * n
        count += n
    return total / max(1, count)
