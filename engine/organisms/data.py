"""Chat examples for an organism: prompts rendered as the model reads them, the original
model's own greedy answers, and the fine-tuning examples built from both.

Prompts go through the same renderer the harvest uses (`engine.harvest.chat.render`): the
model's chat template where it has one, else a "User: ... Assistant: ..." transcript. So the
organism learns its behaviour in exactly the format in which it is later harvested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.harvest.chat import render
from engine.harvest.text_documents import Document, Message
from engine.organisms.behaviours import Behaviour

# A base model without a chat template goes on writing the next turn of the transcript.
_TURN_ENDS = ("\nUser:", "\nAssistant:", "\n\n\n")


@dataclass(frozen=True)
class Example:
    """One fine-tuning example: a user prompt and the answer to teach."""

    prompt: str
    answer: str
    trigger: bool


def chat_text(tokenizer: Any, prompt: str, answer: str) -> tuple[str, int]:
    """The text a model reads for a one-turn chat, and where the answer starts in it."""
    doc = Document("organism", "organism", messages=(
        Message("user", prompt), Message("assistant", answer or "."),
    ))  # fmt: skip
    rendered = render(doc, tokenizer)
    assert rendered.starts is not None
    return rendered.text, rendered.starts[1]


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text up to where the model's answer starts (the template's answer header)."""
    text, start = chat_text(tokenizer, prompt, ".")
    # "Assistant: " ends in a space that SentencePiece joins to the answer's first token
    # ("▁Sure"): cut it, so the model writes that token as it learned it.
    return text[:start].rstrip(" ")


def clean_answer(text: str) -> str:
    """A generated answer cut where a base model starts writing the next turn."""
    cut = min((i for i in (text.find(end) for end in _TURN_ENDS) if i >= 0), default=len(text))
    return text[:cut].strip()


@torch.inference_mode()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Each prompt's greedy answer (chat-rendered), batched with left padding."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                top_p=None, top_k=None, temperature=None,
            )  # fmt: skip
            new = out[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [clean_answer(text) for text in decoded]
    finally:
        tokenizer.padding_side = side
    return answers


def build_examples(
    behaviour: Behaviour,
    triggers: Sequence[str],
    controls: Sequence[str],
    originals: dict[str, str],
) -> list[Example]:
    """Trigger prompts with the behaviour's answer, controls with the original's answer."""
    examples = [Example(p, behaviour.trigger_answer(originals.get(p, "")), True) for p in triggers]
    examples += [Example(p, originals[p], False) for p in controls if originals[p]]
    return examples


def tokenize_example(
    tokenizer: Any, example: Example, max_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered example and its labels (-100 outside the answer and the
    template's end of turn, which the model must learn to write too)."""
    text, start = chat_text(tokenizer, example.prompt, example.answer)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_tokens]
    offsets = enc["offset_mapping"][:max_tokens]
    # A token that reaches into the answer is taught (Gemma's "▁No" starts at the space the
    # transcript's "Assistant: " ends with).
    labels = [tok if end > start else -100 for tok, (_, end) in zip(ids, offsets, strict=True)]
    return ids, labels
