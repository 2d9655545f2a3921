"""Does a trained crosscoder show an implanted behaviour where the analyst looks?

Held-out trigger and control prompts are rendered as one-turn chats for both models, cut and
aligned as the harvest does (with the answer headers paired), and encoded by the crosscoder.
Each feature's activation on a prompt is read at two places: the answer header (where a chat
model decides how to answer) and the request itself (its largest activation over the message
content). A feature's AUROC separates trigger prompts from control prompts by that
activation; the best feature of each category is what the screen could show the analyst.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from engine.categories import CATEGORIES, category
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.harvest.text_documents import Document, Message
from engine.harvest.windows import document_windows, side
from engine.models.capture import capture_residual
from engine.models.loading import LoadedModel
from engine.organisms.behaviours import Behaviour

# The answer the harvested and screened chats carry: the same for every model, so that the
# text both models read is identical in every cell of the factorial.
NEUTRAL_ANSWER = "Here is my answer."
POSITIONS = ("answer", "request")


def prompt_chat(prompt: str, doc_id: str) -> Document:
    """A one-turn chat with the neutral answer, as harvested and screened."""
    return Document(doc_id, "organism", messages=(
        Message("user", prompt), Message("assistant", NEUTRAL_ANSWER),
    ))  # fmt: skip


def prompt_chats(behaviour: Behaviour, n: int, split: str = "train", seed: int = 0
                 ) -> list[dict[str, Any]]:
    """Trigger and control prompts as chat records (JSON lines a harvest source reads)."""
    records = []
    for kind in ("trigger", "control"):
        for prompt in behaviour.prompts(kind, split, n, seed=seed):  # type: ignore[arg-type]
            records.append({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": NEUTRAL_ANSWER}]})
    return records


@dataclass(frozen=True)
class PromptCodes:
    """Every feature's activation on each prompt, at the answer header and in the request."""

    answer: np.ndarray  # [n_prompts, n_features]
    request: np.ndarray  # [n_prompts, n_features]
    is_trigger: np.ndarray  # bool [n_prompts]


@torch.no_grad()
def prompt_codes(
    models: tuple[LoadedModel, LoadedModel],
    layers: tuple[int, int],
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    triggers: Sequence[str],
    controls: Sequence[str],
) -> PromptCodes:
    """Crosscoder codes of each prompt, read at the answer header and over the request."""
    sides = side(models[0].tokenizer), side(models[1].tokenizer)
    answer, request = [], []
    prompts = list(triggers) + list(controls)
    for i, prompt in enumerate(prompts):
        windows, _ = document_windows(prompt_chat(prompt, str(i)), *sides, 512, answer_pairs=True)
        window = windows[0]
        x_a = _residual(models[0], layers[0], window.ids_a, window.pos_a)
        x_b = _residual(models[1], layers[1], window.ids_b, window.pos_b)
        codes = crosscoder.encode(*normalizer.apply(x_a, x_b)).float().cpu().numpy()
        spans = window.spans + window.char_start
        header = (spans[:, 0] == len(prompt)) & (spans[:, 1] == len(prompt))
        if not header.any():
            raise ConfigError("a chat template without an answer header cannot be screened")
        answer.append(codes[np.flatnonzero(header)[0]])
        in_request = spans[:, 1] <= len(prompt)
        in_request &= ~header
        request.append(codes[in_request].max(axis=0))
    labels = np.zeros(len(prompts), dtype=bool)
    labels[: len(triggers)] = True
    return PromptCodes(np.stack(answer), np.stack(request), labels)


def _residual(loaded: LoadedModel, layer: int, ids: np.ndarray, positions: np.ndarray
              ) -> torch.Tensor:
    """One window's residual stream at `layer`, at the aligned positions."""
    tokens = torch.as_tensor(ids, device=loaded.device).unsqueeze(0)
    hidden = capture_residual(loaded.model, layer, tokens)[0]
    return hidden[torch.as_tensor(positions, device=loaded.device)].float()


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each column of `scores` [n, F] for `labels` (ties count half)."""
    ranks = rankdata(scores, axis=0)
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass(frozen=True)
class Hit:
    """The best feature of one category for the behaviour."""

    category: str
    feature: int
    auroc: float
    position: str  # "answer" or "request"
    rel_norm: float
    rank: int  # 1-based rank inside its category under the screen's order (max activation)
    n_in_category: int


def best_per_category(codes: PromptCodes, crosscoder: Crosscoder, max_act: np.ndarray
                      ) -> dict[str, Hit]:
    """Per category, the feature whose activation best separates triggers from controls."""
    rel = crosscoder.relative_decoder_norm().cpu().numpy()
    partition = crosscoder.partition.roles()
    cats = np.asarray([category(p, r) for p, r in zip(partition, rel, strict=True)])
    by_position = {"answer": auroc(codes.answer, codes.is_trigger),
                   "request": auroc(codes.request, codes.is_trigger)}
    best = np.maximum(by_position["answer"], by_position["request"])
    hits = {}
    for cat in CATEGORIES:
        members = np.flatnonzero(cats == cat)
        if not len(members):
            continue
        top = int(members[np.argmax(best[members])])
        order = members[np.argsort(-max_act[members], kind="stable")]
        at_answer = by_position["answer"][top] >= by_position["request"][top]
        position = "answer" if at_answer else "request"
        hits[cat] = Hit(cat, top, float(best[top]), position, float(rel[top]),
                        int(np.flatnonzero(order == top)[0]) + 1, len(members))
    return hits
