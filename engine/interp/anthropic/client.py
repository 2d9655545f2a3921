"""The Anthropic Messages API client: the SDK and API key, a retry loop for transient
failures, prompt caching, and prices with the cost estimate of explaining features.

Transient failures (429, 529 overloaded, other 5xx, dropped connections) are retried with
exponential backoff on top of the SDK's own retries.

Every paid request goes through `Caller.retrying`, and a Caller sends nothing unless its
`Spending` says the user agreed (after seeing an estimate) and any spending cap is not yet
reached: the one gate that no paid path can leave out.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.errors import ConfigError, UserError
from engine.interp.prompts import FEW_SHOT, FLAGGING_SYSTEM

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MODEL = "claude-opus-4-1-20250805"
INSTALL = 'pip install -e ".[app]"'
N_EXAMPLES = 10  # top examples shown to the explainer (paper B.4.2)
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


class SpendingRefused(UserError):
    """A paid Claude request without the user's consent, or past the spending cap."""


CONSENT_HINT = "rerun with --yes, or --max-cost USD to cap the spending, or use the offline backend"


@dataclass
class Spending:
    """The user's consent to paid Claude requests, and an optional cap in USD.

    `approved` is set only after the user saw a cost estimate and agreed (or passed --yes or
    --max-cost); the default refuses every request. `spent_usd` adds up what the requests
    sent so far cost, from the token counts the API returns.
    """

    approved: bool = False
    max_usd: float | None = None
    spent_usd: float = 0.0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def agreed(cls, max_usd: float | None = None) -> Spending:
        """Consent given (up to `max_usd`, when set)."""
        return cls(approved=True, max_usd=max_usd)

    def allow(self) -> None:
        """Raise SpendingRefused unless one more request may be sent; count it."""
        with self._lock:
            if not self.approved:
                raise SpendingRefused(f"paid Claude requests were not approved; {CONSENT_HINT}")
            if self.max_usd is not None and self.spent_usd >= self.max_usd:
                raise SpendingRefused(
                    f"spending cap reached: ≈ ${self.spent_usd:,.2f} of --max-cost "
                    f"${self.max_usd:,.2f} spent in {self.requests} requests; what was done "
                    "is saved, rerun with a higher --max-cost to go on"
                )
            self.requests += 1

    def charge(self, usd: float) -> None:
        """Add the cost of a request that was answered."""
        with self._lock:
            self.spent_usd += usd


def usage_cost(model: str, usage: Any, batch: bool = False) -> float:
    """USD of one answered request from its `usage` token counts (the highest known price
    for a model without one, so a cap errs on the safe side)."""
    price_in, price_out = PRICES.get(model, max(PRICES.values()))
    tokens = {
        name: float(getattr(usage, name, 0) or 0)
        for name in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                     "cache_read_input_tokens")
    }  # fmt: skip
    usd_in = (
        tokens["input_tokens"]
        + tokens["cache_creation_input_tokens"] * CACHE_WRITE
        + tokens["cache_read_input_tokens"] * CACHE_READ
    ) * price_in
    usd = (usd_in + tokens["output_tokens"] * price_out) / 1e6
    return usd * (BATCH_DISCOUNT if batch else 1.0)


class Caller:
    """An Anthropic client with a retry loop for overloaded and rate-limited requests, that
    sends nothing without the user's consent (`spending`)."""

    def __init__(
        self,
        model: str,
        client: Any,
        flag: str,
        retries: int,
        backoff: float,
        sleep: Callable[[float], None],
        spending: Spending | None = None,
    ) -> None:
        self.model = model
        self.client = make_client(client, flag)
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.spending = spending if spending is not None else Spending()

    def retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn (a paid request), retrying transient API errors with exponential
        backoff; every attempt needs the user's consent (SpendingRefused without it)."""
        return self._attempts(fn, args, kwargs, paid=True)

    def fetching(self, fn: Callable[..., T], *args: Any) -> T:
        """Call fn (a free request: a batch's status or results) with the same retries."""
        return self._attempts(fn, args, {}, paid=False)

    def _attempts(self, fn: Callable[..., T], args: tuple, kwargs: dict, paid: bool) -> T:
        anthropic = sdk()
        for attempt in range(self.retries + 1):
            if paid:
                self.spending.allow()
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
            answer = self.retrying(self.client.messages.create, **params)
            self.spending.charge(usage_cost(self.model, getattr(answer, "usage", None)))
            return message_text(answer)
        except sdk().NotFoundError:
            raise ConfigError(
                f"the Anthropic API does not know model {self.model!r}; known models: "
                f"{', '.join(PRICES)}"
            ) from None


def cached_system(text: str) -> list[dict]:
    """A system prompt as one text block marked for prompt caching."""
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


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


def estimate_requests(
    what: str,
    n_requests: int,
    model: str = DEFAULT_MODEL,
    *,
    prompt_chars: float,
    prefix_chars: float = 0.0,
    output_tokens: int = OUTPUT_TOKENS,
) -> dict:
    """Estimated tokens and USD of `n_requests` judge requests (`what` names them): each a
    cacheable `prefix_chars` (system prompt) and `prompt_chars` of its own text."""
    prefix = math.ceil(prefix_chars / CHARS_PER_TOKEN)
    variable = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    cacheable = prefix >= MIN_CACHE_TOKENS.get(model, DEFAULT_MIN_CACHE_TOKENS)
    cached = prefix * max(0, n_requests - 1) if cacheable else 0
    input_tokens = n_requests * (prefix + variable)
    out = {
        "what": what,
        "model": model,
        "n_requests": n_requests,
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "output_tokens": n_requests * output_tokens,
        "price_date": PRICE_DATE,
        "usd": 0.0 if n_requests == 0 else None,
    }
    if model in PRICES and n_requests > 0:
        price_in, price_out = PRICES[model]
        written = prefix if cacheable else 0
        plain = input_tokens - cached - written
        usd_in = (plain + written * CACHE_WRITE + cached * CACHE_READ) * price_in
        out["usd"] = (usd_in + out["output_tokens"] * price_out) / 1e6
    return out


def describe_requests(estimate: dict) -> str:
    """One line summarising `estimate_requests`, shown before asking for consent."""
    usd = estimate["usd"]
    price = f"≈ ${usd:,.2f}" if usd is not None else "no price known for this model"
    return (
        f"{estimate['what']}: up to {estimate['n_requests']:,} requests to {estimate['model']}, "
        f"≈ {estimate['input_tokens']:,} input tokens ({estimate['cached_input_tokens']:,} "
        f"from cache) and {estimate['output_tokens']:,} output tokens, {price} "
        f"(prices of {estimate['price_date']})"
    )
