"""Judges of steered generations (paper B.5): interpretability, similarity, rubric scores.

* `interpretability`: does steering one model move its answers in a clear semantic
  direction across strengths? (1-5; the exclusivity score keeps features rated >= 3)
* `similarity`: are two models, steered with a feature and its translation, moved in the
  same semantic direction? (1-5; exclusivity = 6 - similarity)
* `rate`: one response scored on a steering-evaluation rubric (behaviour and coherence).

`AnthropicSteeringJudge` sends the paper's prompts to Claude. `OfflineSteeringJudge` needs
no network: it embeds texts with MiniLM and measures how steered answers move away from
the unsteered one (and, for rubrics, how close they are to reference answers). Its scores
are a cheap proxy, and every row it writes names it.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.interp.anthropic.client import DEFAULT_MODEL, Caller, Spending, cached_system
from engine.interp.embeddings import SentenceEncoder, shared_encoder
from engine.steering.rubrics import Rubric, parse_scores, score_from_count

log = logging.getLogger(__name__)

STEERING_PROMPT_VERSION = "steer-judge-b5-v1"
OFFLINE_VERSION = "minilm-shift-v1"
RESPONSE_CHARS = 1500  # per response shown to the judge: long enough to read a drift

Responses = Mapping[float, str]  # strength -> generated text


@dataclass(frozen=True)
class Verdict:
    """A 1-5 judgement and why (None when the judge's answer could not be read)."""

    score: float | None
    reasoning: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rating:
    """Rubric scores of one response (None for a score the judge cannot give)."""

    scores: dict[str, float | None]
    reasoning: str


class SteeringJudge(Protocol):
    """What the exclusivity score and the steering evaluations need from a judge."""

    name: str
    prompt_version: str

    def interpretability(self, prompt: str, responses: Responses) -> Verdict:
        """How clearly steering moves one model's answers in one direction (1-5)."""
        ...

    def similarity(self, prompt: str, source: Responses, target: Responses) -> Verdict:
        """How similarly two models are moved by a feature and its translation (1-5)."""
        ...

    def rate(self, rubric: Rubric, prompt: str, response: str) -> Rating:
        """One response's rubric scores."""
        ...


# --- Anthropic ---------------------------------------------------------------------------

INTERPRETABILITY_SYSTEM = """\
You are evaluating how interpretable the steering behavior is for a single AI model when a \
feature is activated.

You will be given:
1. A prompt that was given to the model
2. Responses from the model at different steering strengths (0 is the unsteered baseline)

Your task is to rate how interpretable the steering behavior is on a scale of 1-5:
- 1: No interpretable pattern (random or incoherent changes)
- 2: Barely interpretable (very weak or unclear pattern)
- 3: Somewhat interpretable (noticeable pattern but not entirely clear)
- 4: Clearly interpretable (obvious semantic direction)
- 5: Highly interpretable (very clear, consistent semantic steering)

IMPORTANT:
- IGNORE coherence degradation, repetition, or gibberish at higher strengths
- FOCUS on whether there's a clear semantic direction being induced
- A feature can be interpretable even if it causes repetition at high strengths
- Look for consistent themes, topics, or behavioral changes across strengths

Answer in exactly this format:
REASONING: <two or three sentences naming the direction, if any>
SCORE: <1-5>"""

SIMILARITY_SYSTEM = """\
You are evaluating whether two AI models show the same steering behavior when influenced by \
a transferred feature.

IMPORTANT:
- IGNORE coherence degradation, repetition, or gibberish at higher strengths
- IGNORE the strength at which behaviors first appear or intensify
- FOCUS ONLY on whether both models are steered in the same semantic direction

You will be given:
1. A prompt that was given to both models
2. Responses from Model A (original feature) at different steering strengths
3. Responses from Model B (with the stitched/transferred feature) at different steering \
strengths

Your task is to rate how similar the steering behavior is on a scale of 1-5:
- 1: Completely different behaviors (no semantic similarity in steering direction)
- 2: Mostly different with minor similarities
- 3: Some similarities but notable differences
- 4: Mostly similar with minor differences
- 5: Nearly identical steering behavior (same semantic direction)

Examples:
- Model A drifts towards water, rivers and floating islands; Model B keeps answering \
normally and then degrades into unrelated repetition. Different directions: 1.
- Both models drift towards mathematics; A talks about scalars and zeros, B repeats \
"vector" and "coordinates". Same direction despite different words and gibberish: 5.
- Model A turns to cooking recipes, Model B to restaurants and travel. Related domain, \
different behavior: 3.
- Both become obsessed with "problems", A with legal deadlines, B with offering help with \
the problem. Mostly the same: 4.

Answer in exactly this format:
REASONING: <two or three sentences comparing the two directions>
SCORE: <1-5>"""

_SCORE = re.compile(r"SCORE\s*[:=]\s*\**\s*([1-5])\b")
_REASON = re.compile(r"REASONING\s*:\s*(.+?)(?:\n\s*SCORE|\Z)", re.S)


def format_responses(responses: Responses) -> str:
    """Responses listed by strength, each cut to RESPONSE_CHARS."""
    lines = []
    for alpha in sorted(responses):
        text = " ".join(responses[alpha].split())[:RESPONSE_CHARS]
        lines.append(f"Strength {alpha:g}: {text or '(empty)'}")
    return "\n".join(lines)


def parse_verdict(raw: str) -> Verdict:
    """The SCORE and REASONING of an answer; ValueError if there is no score."""
    score = _SCORE.search(raw)
    if not score:
        raise ValueError("no SCORE line")
    reason = _REASON.search(raw)
    return Verdict(float(score.group(1)), reason.group(1).strip() if reason else raw.strip())


class AnthropicSteeringJudge:
    """The paper's steering judge prompts sent to Claude (temperature 0)."""

    prompt_version = STEERING_PROMPT_VERSION

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        client: Any = None,
        max_tokens: int = 400,
        temperature: float | None = 0.0,
        retries: int = 4,
        backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        spending: Spending | None = None,
    ) -> None:
        self.caller = Caller(model, client, "--judge", retries, backoff, sleep, spending)
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.name = f"anthropic:{model}"

    def request(self, system: str, text: str) -> dict:
        """Messages API parameters: cached system prompt, one user turn, temperature 0."""
        params = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": cached_system(system),
            "messages": [{"role": "user", "content": text}],
        }
        if self.temperature is not None:
            # The paper judged at temperature 0. SDK 1.x dropped the keyword, but the API
            # still takes the field on models with sampling options; None omits it for
            # models that only accept the default.
            params["extra_body"] = {"temperature": self.temperature}
        return params

    def interpretability(self, prompt: str, responses: Responses) -> Verdict:
        """Paper B.5 interpretability prompt."""
        text = f"PROMPT: {prompt}\n\nRESPONSES:\n{format_responses(responses)}"
        return self._verdict(self.request(INTERPRETABILITY_SYSTEM, text))

    def similarity(self, prompt: str, source: Responses, target: Responses) -> Verdict:
        """Paper B.5 similarity prompt."""
        text = (
            f"PROMPT: {prompt}\n\nMODEL A (original feature):\n{format_responses(source)}\n\n"
            f"MODEL B (transferred feature):\n{format_responses(target)}"
        )
        return self._verdict(self.request(SIMILARITY_SYSTEM, text))

    def rate(self, rubric: Rubric, prompt: str, response: str) -> Rating:
        """Paper B.5.2-B.5.6 rubric prompt; one retry on a malformed answer."""
        params = self.request(rubric.system_prompt(), rubric.user_prompt(prompt, response))
        raw = ""
        for _attempt in range(2):
            raw = self.caller.create(params)
            try:
                scores, reasoning = parse_scores(raw, rubric.metrics)
                return Rating({k: float(v) for k, v in scores.items()}, reasoning)
            except ValueError as err:
                log.info("malformed rubric answer (%s); asking again", err)
        return Rating(dict.fromkeys(rubric.metrics), f"unparsed: {raw[:500]}")

    def _verdict(self, params: dict) -> Verdict:
        """Send, parse, ask once more if malformed, else an unscored verdict."""
        raw = ""
        for _attempt in range(2):
            raw = self.caller.create(params)
            try:
                return parse_verdict(raw)
            except ValueError:
                log.info("malformed steering verdict; asking again")
        return Verdict(None, f"unparsed: {raw[:500]}")


def steering_judge(
    kind: str, model: str = DEFAULT_MODEL, spending: Spending | None = None
) -> SteeringJudge:
    """The judge named by `kind`: "anthropic" (needs ANTHROPIC_API_KEY, and `spending`
    approved before it sends anything) or "offline"."""
    if kind == "anthropic":
        return AnthropicSteeringJudge(model=model, spending=spending)
    return OfflineSteeringJudge()


# --- offline -----------------------------------------------------------------------------

MOVED = 0.05  # 1 - cosine to the baseline below which a steered answer "did not move"
# Thresholds for scores 2..5 on cosine margins: how much more steered answers resemble
# each other than an unsteered answer (one model: interpretability; two: similarity).
# Calibrated on hand-written series: one topic ~0.5, related topics ~0.1, unrelated or
# paraphrased answers <= 0.05.
CONSISTENCY_BINS = (0.1, 0.2, 0.3, 0.4)
AGREEMENT_BINS = (0.1, 0.2, 0.3, 0.4)
ANCHOR_TEMPERATURE = 0.05  # softness of the high-vs-low anchor comparison
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def binned(value: float, bins: tuple[float, ...]) -> int:
    """1 + the number of thresholds `value` reaches."""
    return 1 + sum(value >= b for b in bins)


class OfflineSteeringJudge:
    """Sentence-embedding judge: how steered answers move away from the unsteered one."""

    name = f"offline:{OFFLINE_VERSION}"
    prompt_version = OFFLINE_VERSION

    def __init__(self, encoder: SentenceEncoder | None = None) -> None:
        self._encoder = encoder

    @property
    def encoder(self) -> SentenceEncoder:
        """The MiniLM encoder, loaded on first use."""
        if self._encoder is None:
            self._encoder = shared_encoder()
        return self._encoder

    def interpretability(self, prompt: str, responses: Responses) -> Verdict:
        """How much more the steered answers resemble each other than the baseline."""
        base, moved = self._moved(responses)
        if len(moved) < 2:
            return Verdict(1.0, _no_drift(len(moved)), {"moved": len(moved)})
        together = _mean_pairwise(moved)
        to_base = float((moved @ base).mean())
        consistency = together - to_base
        reason = (
            f"{len(moved)} of {len(responses) - 1} steered answers moved away from the "
            f"baseline; they resemble each other (mean cosine {together:.2f}) more than the "
            f"baseline ({to_base:.2f}) by {consistency:.2f}"
        )
        details = {"moved": len(moved), "consistency": consistency}
        return Verdict(float(binned(consistency, CONSISTENCY_BINS)), reason, details)

    def similarity(self, prompt: str, source: Responses, target: Responses) -> Verdict:
        """How much more the two models' steered answers resemble each other than either
        resembles the other model's unsteered answer."""
        base_a, a = self._moved(source)
        base_b, b = self._moved(target)
        if len(a) == 0 or len(b) == 0:
            which = "source" if len(a) == 0 else "target"
            reason = f"the {which} model's answers did not move under steering"
            return Verdict(1.0, reason, {"moved_source": len(a), "moved_target": len(b)})
        cross = float((a @ b.T).mean())
        to_base = max(float((a @ base_b).mean()), float((b @ base_a).mean()))
        agreement = cross - to_base
        reason = (
            f"steered answers of the two models resemble each other (mean cosine {cross:.2f})"
            f" more than the other model's baseline ({to_base:.2f}) by {agreement:.2f}"
        )
        details = {"agreement": agreement, "moved_source": len(a), "moved_target": len(b)}
        return Verdict(float(binned(agreement, AGREEMENT_BINS)), reason, details)

    def rate(self, rubric: Rubric, prompt: str, response: str) -> Rating:
        """Behaviour from mention counts or reference answers; coherence from repetition."""
        scores: dict[str, float | None] = dict.fromkeys(rubric.metrics)
        if rubric.count:
            scores[rubric.metric] = float(score_from_count(_count(rubric.count, response)))
            if "MENTIONS_POLICY" in scores:
                scores["MENTIONS_POLICY"] = float(
                    score_from_count(_count(r"\bpolic(?:y|ies)\b", response))
                )
        elif rubric.anchors_low and rubric.anchors_high:
            scores[rubric.metric] = self._anchor_score(rubric, response)
        scores["COHERENCE"] = coherence(response)
        return Rating(scores, "offline: reference-answer similarity and repetition heuristics")

    def _anchor_score(self, rubric: Rubric, response: str) -> float:
        """1 + 4 x P(closer to the score-5 answers than to the score-1 answers)."""
        emb = self.encoder.encode([response, *rubric.anchors_low, *rubric.anchors_high])
        n_low = len(rubric.anchors_low)
        sims = emb[1:] @ emb[0]
        gap = float(sims[n_low:].max() - sims[:n_low].max())
        return 1.0 + 4.0 / (1.0 + math.exp(-gap / ANCHOR_TEMPERATURE))

    def _moved(self, responses: Responses) -> tuple[torch.Tensor, torch.Tensor]:
        """The baseline's embedding and those of the steered answers that moved from it."""
        if 0.0 not in responses:
            raise ValueError("responses need the unsteered baseline at strength 0")
        alphas = [a for a in sorted(responses) if a != 0.0]
        emb = self.encoder.encode([responses[0.0], *(responses[a] for a in alphas)])
        base, steered = emb[0], emb[1:]
        return base, steered[1.0 - steered @ base >= MOVED]


def _mean_pairwise(emb: torch.Tensor) -> float:
    """Mean cosine between distinct rows of unit vectors."""
    n = len(emb)
    return float(((emb @ emb.T).sum() - n) / (n * (n - 1)))


def _no_drift(moved: int) -> str:
    """Reason for an interpretability score of 1."""
    if moved == 0:
        return "no steered answer moved away from the baseline"
    return "only one steered answer moved away from the baseline: no direction to compare"


def _count(pattern: str, text: str) -> int:
    """Case-insensitive matches of a pattern."""
    return len(re.findall(pattern, text, flags=re.I))


def coherence(text: str) -> float:
    """1-5 from how repetitive a text is (share of distinct word bigrams) and its letters."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 3:
        return 1.0 if not words else 3.0
    bigrams = list(itertools.pairwise(words))
    distinct = len(set(bigrams)) / len(bigrams)
    letters = sum(len(w) for w in words) / max(len(text.replace(" ", "")), 1)
    quality = min(max((distinct - 0.3) / 0.6, 0.0), 1.0) * min(letters / 0.7, 1.0)
    return round(1.0 + 4.0 * quality, 2)
