"""Explaining through the Message Batches API, at half price: submit, poll, collect, and
ask once more for what failed or came back malformed.

Submitted batches are written to a ledger file so an interrupted run collects them instead
of paying for them twice.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import UserError
from engine.files import atomic_write_text
from engine.interp.anthropic.client import message_text, sdk
from engine.interp.base import ExplainRun, FeatureExamples, OnResult, pending
from engine.interp.parse import ParseError

if TYPE_CHECKING:
    from engine.interp.anthropic.explainer import AnthropicExplainer

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # requests per Message Batch (the API allows 100,000 or 256 MB)


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
                raise UserError(
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
        # Billed as the answers come; counted now, so a cap stops the next batch.
        estimate = self.ex.estimate([self.todo[fid] for fid in ids], batch=True)["usd"]
        self.ex.caller.spending.charge(estimate or 0.0)
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
            batch = caller.fetching(batches.retrieve, batch_id)
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
        for line in caller.fetching(batches.results, batch_id):
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
