"""The Anthropic judge: detection judging (B.4.4) of an explanation against a feature's
shuffled examples, sent to a Claude model; a malformed answer is asked for once more."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from engine.contexts import Context
from engine.interp.anthropic.client import DEFAULT_MODEL, Caller, Spending, cached_system
from engine.interp.format import format_plain
from engine.interp.parse import ParseError, parse_judgement
from engine.interp.prompts import DETECTION_PROMPT_VERSION, DETECTION_SYSTEM, DETECTION_TEMPLATE

log = logging.getLogger(__name__)


class AnthropicJudge:
    """Detection judging (B.4.4): one request per feature labelling its shuffled examples."""

    prompt_version = DETECTION_PROMPT_VERSION

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        client: Any = None,
        max_tokens: int = 400,
        retries: int = 4,
        backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        spending: Spending | None = None,
    ) -> None:
        self.caller = Caller(model, client, "--judge", retries, backoff, sleep, spending)
        self.model, self.max_tokens = model, max_tokens
        self.name = f"anthropic:{model}"

    def request(self, explanation: str, contexts: list[Context]) -> dict:
        """The Messages API parameters for judging one explanation."""
        text = DETECTION_TEMPLATE.format(
            explanation=explanation.strip(), examples=format_plain(contexts), n=len(contexts)
        )
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": cached_system(DETECTION_SYSTEM),
            "messages": [{"role": "user", "content": text}],
        }

    def judge(self, explanation: str, contexts: list[Context]) -> list[bool]:
        """One label per context (True = matches); a malformed answer is asked for again."""
        if not contexts:
            return []
        params = self.request(explanation, contexts)
        raw = self.caller.create(params)
        try:
            return parse_judgement(raw, len(contexts))
        except ParseError as err:
            log.info("malformed judgement (%s); asking again", err)
        return parse_judgement(self.caller.create(params), len(contexts))
