"""Interfaces shared by every explainer and judge, and the resumable loop that drives them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from engine.contexts import Context

log = logging.getLogger(__name__)

# A feature needs at least this many top examples with a non-zero activation to be explained.
MIN_EXAMPLES = 1

OnResult = Callable[[int, "Explanation"], None]


@dataclass(frozen=True)
class Explanation:
    """One feature's explanation and harmful flag, with who produced it and how."""

    explanation: str  # "" when the answer could not be parsed
    harmful: bool | None  # None when the answer could not be parsed
    harmful_reason: str
    raw: str  # the model's full answer, kept even when it could not be parsed
    parsed: bool
    explainer: str  # e.g. "anthropic:claude-opus-4-1-20250805", "offline:ngram-v1"
    prompt_version: str


@dataclass(frozen=True)
class FeatureExamples:
    """A feature's max-activating and random contexts, the input of an explainer."""

    feature_id: int
    top: list[Context]
    random: list[Context] = field(default_factory=list)

    @property
    def max_act(self) -> float:
        """The feature's largest activation over all its examples."""
        return max((c.max_act for c in [*self.top, *self.random]), default=0.0)

    @property
    def n_active(self) -> int:
        """How many top examples have a non-zero activation."""
        return sum(c.max_act > 0 for c in self.top)


@dataclass
class ExplainRun:
    """What one `explain_many` call did: features explained, skipped and failed."""

    results: dict[int, Explanation] = field(default_factory=dict)
    skipped_done: list[int] = field(default_factory=list)  # already explained before
    skipped_few: list[int] = field(default_factory=list)  # too few activating examples
    # Requests that failed (the API refused or gave up); nothing was recorded for them, so a
    # rerun tries them again.
    failed: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"{len(self.results)} explained, {len(self.skipped_done)} already done, "
            f"{len(self.skipped_few)} skipped (fewer than {MIN_EXAMPLES} activating "
            f"example(s)), {len(self.failed)} failed"
        )


@runtime_checkable
class Explainer(Protocol):
    """Turns a feature's examples into an explanation and harmful flag."""

    name: str
    prompt_version: str

    def explain(self, examples: FeatureExamples) -> Explanation:
        """Explain one feature."""
        ...

    def explain_many(
        self,
        items: Iterable[FeatureExamples],
        done: set[int] = ...,
        on_result: OnResult | None = None,
    ) -> ExplainRun:
        """Explain features not in `done`, calling `on_result` as each finishes."""
        ...


@runtime_checkable
class Judge(Protocol):
    """Decides which contexts match an explanation (the detection task)."""

    name: str
    prompt_version: str

    def judge(self, explanation: str, contexts: list[Context]) -> list[bool]:
        """One label per context: True when it matches the explanation."""
        ...


def pending(
    items: Iterable[FeatureExamples], done: set[int] | frozenset[int], run: ExplainRun
) -> Iterator[FeatureExamples]:
    """The items still to explain; the others are counted in `run` as skipped."""
    for item in items:
        if item.feature_id in done:
            run.skipped_done.append(item.feature_id)
        elif item.n_active < MIN_EXAMPLES:
            run.skipped_few.append(item.feature_id)
        else:
            yield item


def explain_each(
    explain: Callable[[FeatureExamples], Explanation],
    items: Iterable[FeatureExamples],
    done: set[int] | frozenset[int] = frozenset(),
    on_result: OnResult | None = None,
    workers: int = 1,
    errors: tuple[type[Exception], ...] = (),
) -> ExplainRun:
    """Explain pending items one request each, `workers` at a time, reporting as they finish.

    An exception in `errors` marks that feature failed and the run goes on; any other one
    stops the run (results already reported stay recorded, so a rerun resumes).
    """
    run = ExplainRun()

    def record(fid: int, future: Future[Explanation]) -> None:
        try:
            result = future.result()
        except errors as err:
            log.warning("feature %d failed: %s", fid, err)
            run.failed[fid] = str(err)
            return
        run.results[fid] = result
        if on_result is not None:
            on_result(fid, result)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        flight: dict[Future[Explanation], int] = {}
        for item in pending(items, done, run):
            # Bounded submission: items may be a lazy stream over a large database.
            while len(flight) >= 2 * max(1, workers):
                finished, _ = wait(flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(flight.pop(future), future)
            flight[pool.submit(explain, item)] = item.feature_id
        for future in list(flight):
            record(flight.pop(future), future)
    return run
