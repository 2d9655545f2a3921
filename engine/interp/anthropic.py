"""Explainer and judge backed by Anthropic's Messages API, with the paper's prompts.

Requests put the fixed system prompt and few-shot turns first, marked for prompt caching,
so only each feature's examples are new input. Transient failures (429, 529 overloaded,
other 5xx, dropped connections) are retried with exponential backoff on top of the SDK's
own retries. A malformed answer is asked for once more with the same request, then
recorded unparsed with its raw text. Bulk work can go through the Message Batches API at
half price; submitted batches are written to a ledger file so an interrupted run collects
them instead of paying for them twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engine.analysis.context import Context
from engine.config import ConfigError
from engine.files import atomic_write_text
from engine.interp.base import (
    ExplainRun,
    Explanation,
    FeatureExamples,
    OnResult,
    explain_each,
    pending,
)
from engine.interp.format import format_examples, format_plain
from engine.interp.parse import ParseError, parse_explanation, parse_judgement
from engine.interp.prompts import (
    DETECTION_PROMPT_VERSION,
    DETECTION_SYSTEM,
    DETECTION_TEMPLATE,
    EXPLAIN_PROMPT_VERSION,
    FEW_SHOT,
    FLAGGING_SYSTEM,
    few_shot_messages,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MODEL = "claude-opus-4-1-20250805"
INSTALL = 'pip install -e ".[app]"'
N_EXAMPLES = 10  # top examples shown to the explainer (paper B.4.2)
MAX_BATCH = 10_000  # requests per Message Batch (the API allows 100,000 or 256 MB)
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx, 529 "overloaded" included

# USD per million tokens (input, output), from Anthropic's pricing page as of PRICE_DATE.
# Cache writes cost 1.25x input, cache reads 0.1x; the Batches API halves every price.
PRICE_DATE = "2025-11-01"
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-1-20250805": (15.0, 75.0),
    "claude-opus-4-20250514": (15.0, 75.0),
    "claude-opus-4-5-20251101": (5.0, 25.0),
    "claude-sonnet-4-5-20250929": (3.0, 15.0),
    "claude-sonnet-4-20250514": (3.0, 15.0),
    "claude-haiku-4-5-20251001": (1.0, 5.0),
    "claude-3-5-haiku-20241022": (0.8, 4.0),
}
CACHE_WRITE, CACHE_READ, BATCH_DISCOUNT = 1.25, 0.10, 0.5
# A prefix shorter than this is never cached (the API ignores cache_control on it).
MIN_CACHE_TOKENS: dict[str, int] = {
    "claude-opus-4-5-20251101": 4096,
    "claude-haiku-4-5-20251001": 4096,
    "claude-3-5-haiku-20241022": 2048,
}
DEFAULT_MIN_CACHE_TOKENS = 1024
CHARS_PER_TOKEN = 4
OUTPUT_TOKENS = 200  # a short reasoning paragraph and the three sections
EXAMPLE_CHARS = 320  # a 32-token window with highlights and its importance line


def sdk() -> Any:
    """The anthropic package, or a ConfigError saying how to install it."""
    try:
        import anthropic
    except ImportError:
        raise ConfigError(
            f"the Anthropic explainer needs the anthropic package; run: {INSTALL}"
        ) from None
    return anthropic


def make_client(client: Any = None, flag: str = "--explainer", max_retries: int = 2) -> Any:
    """The given client, or a new one from ANTHROPIC_API_KEY (ConfigError if it is unset)."""
    anthropic = sdk()
    if client is not None:
        return client
    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise ConfigError(
            f"ANTHROPIC_API_KEY is not set; export ANTHROPIC_API_KEY=... or use {flag} offline"
        )
    return anthropic.Anthropic(max_retries=max_retries)


def message_text(message: Any) -> str:
    """The concatenated text blocks of a Messages API response."""
    return "".join(block.text for block in message.content if block.type == "text")


def _transient(err: Exception) -> bool:
    """Whether an API error is worth retrying after a pause."""
    anthropic = sdk()
    if isinstance(err, anthropic.APIConnectionError):
        return True
    if isinstance(err, anthropic.APIStatusError):
        return err.status_code in RETRY_STATUS or err.status_code >= 500
    return False


class Caller:
    """An Anthropic client with a retry loop for overloaded and rate-limited requests."""

    def __init__(
        self,
        model: str,
        client: Any,
        flag: str,
        retries: int,
        backoff: float,
        sleep: Callable[[float], None],
    ) -> None:
        self.model = model
        self.client = make_client(client, flag)
        self.retries, self.backoff, self.sleep = retries, backoff, sleep

    def retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn, retrying transient API errors with exponential backoff."""
        anthropic = sdk()
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as err:
                raise ConfigError(
                    f"the Anthropic API refused the key ({err.status_code}); "
                    "check ANTHROPIC_API_KEY"
                ) from None
            except anthropic.APIError as err:
                if not _transient(err) or attempt == self.retries:
                    raise
                delay = min(self.backoff * 2**attempt, 60.0)
                log.warning("Anthropic API: %s; retrying in %.0f s", err, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def create(self, params: dict) -> str:
        """Send one Messages request and return its text."""
        try:
            return message_text(self.retrying(self.client.messages.create, **params))
        except sdk().NotFoundError:
            raise ConfigError(
                f"the Anthropic API does not know model {self.model!r}; known models: "
                f"{', '.join(PRICES)}"
            ) from None


def cached_system(text: str) -> list[dict]:
    """A system prompt as one text block marked for prompt caching."""
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


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
    ) -> None:
        self.caller = Caller(model, client, "--explainer", retries, backoff, sleep)
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


def feature_of(custom_id: str) -> int:
    """The feature id in a batch request's custom_id (``feature-<id>``)."""
    match = re.fullmatch(r"feature-(\d+)", custom_id)
    if not match:
        raise ValueError(f"unexpected custom_id {custom_id!r} in batch results")
    return int(match.group(1))


def _batch_error(result: Any) -> str:
    """A short description of a batch request that did not succeed."""
    error = getattr(result, "error", None)
    inner = getattr(error, "error", None)
    detail = getattr(inner, "message", None) or getattr(error, "message", None) or ""
    return f"{result.type}: {detail}".rstrip(": ")


class _Ledger:
    """Batches submitted but not yet collected, kept in a JSON file (or only in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: list[dict] = []
        if self.path is not None and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())["batches"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConfigError(
                    f"batch ledger {self.path} is damaged ({err}); check its batches in the "
                    "Anthropic console, then delete the file to start afresh"
                ) from None

    def add(self, entry: dict) -> None:
        """Record a submitted batch."""
        self.entries.append(entry)
        self._save()

    def remove(self, batch_id: str) -> None:
        """Forget a batch whose results are recorded."""
        self.entries = [e for e in self.entries if e["id"] != batch_id]
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"batches": self.entries}, indent=1))


class _BatchRun:
    """One explain_many call through the Message Batches API: submit, poll, collect, retry."""

    def __init__(self, explainer: AnthropicExplainer, ledger: Path | None) -> None:
        self.ex = explainer
        self.ledger = _Ledger(ledger)
        self.result = ExplainRun()
        self.todo: dict[int, FeatureExamples] = {}
        self.retry: list[int] = []
        self.on_result: OnResult | None = None

    def run(
        self,
        items: Iterable[FeatureExamples],
        done: set[int] | frozenset[int],
        on_result: OnResult | None,
    ) -> ExplainRun:
        """Explain every pending item: resumed batches first, then new ones, then retries."""
        self.on_result = on_result
        self.todo = {item.feature_id: item for item in pending(items, done, self.result)}
        for entry in list(self.ledger.entries):
            self._resume(entry)
        first = [fid for fid in self.todo if fid not in self.retry]
        for chunk in _chunks(first, self.ex.batch_size):
            self._round(chunk, attempt=1)
        retry, self.retry = self.retry, []
        for chunk in _chunks([fid for fid in retry if fid in self.todo], self.ex.batch_size):
            self._round(chunk, attempt=2)
        return self.result

    def _resume(self, entry: dict) -> None:
        """Collect a batch an earlier run submitted, if it was made the same way."""
        if (entry.get("model"), entry.get("prompt_version")) != (
            self.ex.model,
            self.ex.prompt_version,
        ):
            log.warning("batch %s was made with another model or prompt; ignoring it", entry["id"])
        else:
            log.info("collecting batch %s submitted by an earlier run", entry["id"])
            try:
                self._settle(self._collect(entry["id"], entry["features"]), entry["attempt"])
            except sdk().NotFoundError:
                # Results are kept for 29 days; after that the features are asked again.
                log.warning("batch %s no longer exists; asking its features again", entry["id"])
        self.ledger.remove(entry["id"])

    def _round(self, ids: list[int], attempt: int) -> None:
        """Submit one batch, wait for it and record its answers."""
        requests = [
            {"custom_id": f"feature-{fid}", "params": self.ex.request(self.todo[fid])}
            for fid in ids
        ]
        batches = self.ex.caller.client.messages.batches
        batch = self.ex.caller.retrying(batches.create, requests=requests)
        log.info("submitted batch %s: %d requests (attempt %d)", batch.id, len(ids), attempt)
        self.ledger.add(
            {
                "id": batch.id,
                "attempt": attempt,
                "features": ids,
                "model": self.ex.model,
                "prompt_version": self.ex.prompt_version,
            }
        )
        self._settle(self._collect(batch.id, ids), attempt)
        self.ledger.remove(batch.id)

    def _collect(self, batch_id: str, ids: list[int]) -> dict[int, tuple[str | None, str]]:
        """Wait for a batch to end; each feature's (answer text or None, error)."""
        caller, batches = self.ex.caller, self.ex.caller.client.messages.batches
        while True:
            batch = caller.retrying(batches.retrieve, batch_id)
            if batch.processing_status == "ended":
                break
            counts = batch.request_counts
            log.info(
                "batch %s: %s (%d processing, %d succeeded, %d errored)",
                batch_id,
                batch.processing_status,
                counts.processing,
                counts.succeeded,
                counts.errored,
            )
            self.ex.sleep(self.ex.poll_interval)
        answers: dict[int, tuple[str | None, str]] = {fid: (None, "no result") for fid in ids}
        for line in caller.retrying(batches.results, batch_id):
            result = line.result
            if result.type == "succeeded":
                answers[feature_of(line.custom_id)] = (message_text(result.message), "")
            else:
                answers[feature_of(line.custom_id)] = (None, _batch_error(result))
        return answers

    def _settle(self, answers: dict[int, tuple[str | None, str]], attempt: int) -> None:
        """Record good answers; queue malformed or failed ones for one retry, then give up."""
        for fid, (raw, error) in answers.items():
            if fid not in self.todo:
                continue
            if raw is None:
                if attempt == 1:
                    self.retry.append(fid)
                else:
                    log.warning("feature %d failed in batch: %s", fid, error)
                    self.result.failed[fid] = error
                    del self.todo[fid]
                continue
            try:
                explanation = self.ex.parsed(raw)
            except ParseError:
                if attempt == 1:
                    self.retry.append(fid)
                    continue
                explanation = self.ex.unparsed(raw)
            del self.todo[fid]
            self.result.results[fid] = explanation
            if self.on_result is not None:
                self.on_result(fid, explanation)


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    """ids split into consecutive lists of at most `size`."""
    return [ids[i : i + size] for i in range(0, len(ids), max(1, size))]


def prefix_chars() -> int:
    """Characters of the fixed, cacheable part of every explainer request."""
    return len(FLAGGING_SYSTEM) + sum(len(u) + len(a) for u, a in FEW_SHOT)


def estimate_cost(
    n_features: int,
    model: str = DEFAULT_MODEL,
    *,
    batch: bool = False,
    prompt_chars: float = N_EXAMPLES * EXAMPLE_CHARS,
    output_tokens: int = OUTPUT_TOKENS,
) -> dict:
    """Estimated tokens and USD for explaining n features (prompt_chars: mean examples text).

    Tokens are characters / 4. The fixed prefix is billed as a cache write once and cache
    reads after, when it is long enough to be cached; usd is None for a model without a
    known price.
    """
    prefix = math.ceil(prefix_chars() / CHARS_PER_TOKEN)
    variable = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    cacheable = prefix >= MIN_CACHE_TOKENS.get(model, DEFAULT_MIN_CACHE_TOKENS)
    cached = prefix * max(0, n_features - 1) if cacheable else 0
    input_tokens = n_features * (prefix + variable)
    out = {
        "model": model,
        "n_features": n_features,
        "batch": batch,
        "prefix_tokens": prefix,
        "cacheable": cacheable,
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "output_tokens": n_features * output_tokens,
        "price_date": PRICE_DATE,
        "usd": None,
    }
    if model in PRICES and n_features > 0:
        price_in, price_out = PRICES[model]
        written = prefix if cacheable else 0
        plain = input_tokens - cached - written
        usd_in = (plain + written * CACHE_WRITE + cached * CACHE_READ) * price_in
        usd = (usd_in + out["output_tokens"] * price_out) / 1e6
        out["usd"] = usd * (BATCH_DISCOUNT if batch else 1.0)
    elif n_features == 0:
        out["usd"] = 0.0
    return out


def describe_cost(estimate: dict) -> str:
    """One line summarising an estimate, for the CLI to print before submitting."""
    usd = estimate["usd"]
    price = f"≈ ${usd:,.2f}" if usd is not None else "no price known for this model"
    mode = "Message Batches (50% off)" if estimate["batch"] else "one request per feature"
    return (
        f"{estimate['n_features']:,} features with {estimate['model']} via {mode}: "
        f"≈ {estimate['input_tokens']:,} input tokens ({estimate['cached_input_tokens']:,} "
        f"from cache) and {estimate['output_tokens']:,} output tokens, {price} "
        f"(prices of {estimate['price_date']})"
    )


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
    ) -> None:
        self.caller = Caller(model, client, "--judge", retries, backoff, sleep)
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
