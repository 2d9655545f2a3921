"""The Anthropic explainer: the paper's explanation-and-flagging prompt (B.4.2) sent to a
Claude model, one request per feature or through the Message Batches API (`batch`).

Requests put the fixed system prompt and few-shot turns first, marked for prompt caching,
so only each feature's examples are new input. A malformed answer is asked for once more
with the same request, then recorded unparsed with its raw text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.interp.anthropic.batch import MAX_BATCH, _BatchRun
from engine.interp.anthropic.client import (
    DEFAULT_MODEL,
    N_EXAMPLES,
    Caller,
    Spending,
    cached_system,
    estimate_cost,
    sdk,
)
from engine.interp.base import ExplainRun, Explanation, FeatureExamples, OnResult, explain_each
from engine.interp.format import format_examples
from engine.interp.parse import ParseError, parse_explanation
from engine.interp.prompts import EXPLAIN_PROMPT_VERSION, FLAGGING_SYSTEM, few_shot_messages

log = logging.getLogger(__name__)


def explain_messages(examples: FeatureExamples, n_examples: int = N_EXAMPLES) -> list[dict]:
    """The few-shot turns, the last one a cache breakpoint, then the feature's examples."""
    turns = few_shot_messages()
    last = turns[-1]
    # The system prompt alone may be under the minimum cacheable length; caching through
    # the last demonstration covers the whole fixed prefix.
    turns[-1] = {
        "role": last["role"],
        "content": [
            {"type": "text", "text": last["content"], "cache_control": {"type": "ephemeral"}}
        ],
    }
    shown = examples.top[:n_examples]
    return [*turns, {"role": "user", "content": format_examples(shown, examples.max_act)}]


class AnthropicExplainer:
    """The paper's explanation-and-flagging prompt (B.4.2) sent to a Claude model."""

    prompt_version = EXPLAIN_PROMPT_VERSION

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        client: Any = None,
        max_tokens: int = 1000,
        batch: bool = False,
        n_examples: int = N_EXAMPLES,
        workers: int = 4,
        retries: int = 4,
        backoff: float = 2.0,
        poll_interval: float = 30.0,
        batch_size: int = MAX_BATCH,
        sleep: Callable[[float], None] = time.sleep,
        spending: Spending | None = None,
    ) -> None:
        self.caller = Caller(model, client, "--explainer", retries, backoff, sleep, spending)
        self.model, self.max_tokens, self.batch = model, max_tokens, batch
        self.n_examples, self.workers = n_examples, workers
        self.poll_interval, self.batch_size, self.sleep = poll_interval, batch_size, sleep
        self.name = f"anthropic:{model}"

    def request(self, examples: FeatureExamples) -> dict:
        """The Messages API parameters for one feature."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": cached_system(FLAGGING_SYSTEM),
            "messages": explain_messages(examples, self.n_examples),
        }

    def explain(self, examples: FeatureExamples) -> Explanation:
        """Explain one feature; a malformed answer is asked for once more."""
        params = self.request(examples)
        raw = self.caller.create(params)
        try:
            return self.parsed(raw)
        except ParseError as err:
            log.info("feature %d: malformed answer (%s); asking again", examples.feature_id, err)
        raw = self.caller.create(params)
        try:
            return self.parsed(raw)
        except ParseError:
            return self.unparsed(raw)

    def parsed(self, raw: str) -> Explanation:
        """The explanation in a raw answer, or ParseError."""
        p = parse_explanation(raw)
        return Explanation(
            p.explanation, p.harmful, p.harmful_reason, raw, True, self.name, self.prompt_version
        )

    def unparsed(self, raw: str) -> Explanation:
        """A record of an answer that could not be parsed, raw text kept."""
        return Explanation("", None, "", raw, False, self.name, self.prompt_version)

    def estimate(self, items: Sequence[FeatureExamples], batch: bool | None = None) -> dict:
        """Estimated tokens and cost of explaining `items`, from their formatted prompts."""
        chars = [len(format_examples(item.top[: self.n_examples], item.max_act)) for item in items]
        mean = sum(chars) / len(chars) if chars else 0.0
        use_batch = self.batch if batch is None else batch
        return estimate_cost(len(items), self.model, batch=use_batch, prompt_chars=mean)

    def explain_many(
        self,
        items: Iterable[FeatureExamples],
        done: set[int] | frozenset[int] = frozenset(),
        on_result: OnResult | None = None,
        batch: bool | None = None,
        ledger: Path | None = None,
    ) -> ExplainRun:
        """Explain features not in `done`, reporting each result as it arrives.

        With batch (default: the constructor's), requests go through the Message Batches
        API; `ledger` is a JSON file recording submitted batches so a rerun collects them.
        """
        if self.batch if batch is None else batch:
            return _BatchRun(self, ledger).run(items, done, on_result)
        bad_request = sdk().BadRequestError
        return explain_each(self.explain, items, done, on_result, self.workers, (bad_request,))
