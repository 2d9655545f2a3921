"""Interactive text has a size limit: a steering prompt, the new-token count, and the text
of a probe or a search. A refused request fails at once with the limit in its message, and
a steering prompt is refused before the process-wide generation lock is taken, so one huge
request cannot stall every dashboard session."""

from __future__ import annotations

import time

import pytest

from engine.analysis.probe import MAX_CHARS
from engine.errors import ConfigError
from engine.steering import steer
from engine.steering.steer import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, GenerationConfig


def test_new_tokens_are_capped():
    GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)  # the paper's longest (2,000) fits
    for bad in (0, MAX_NEW_TOKENS + 1, 100_000):
        with pytest.raises(ConfigError, match=f"between 1 and {MAX_NEW_TOKENS:,}"):
            GenerationConfig(max_new_tokens=bad)


def test_a_huge_prompt_is_refused_without_waiting_for_the_generation_lock(tiny_pair):
    llama, _ = tiny_pair
    huge = "tea " * (MAX_PROMPT_CHARS // 4 + 1)
    with steer._LOCK:  # another session is generating
        started = time.perf_counter()
        for call in (
            lambda: steer.generate(llama, [huge]),
            lambda: steer.sweep(llama, huge, None, 0, 1.0, [0.0]),
            lambda: next(steer.stream(llama, huge)),
        ):
            with pytest.raises(ConfigError, match=f"keep it under {MAX_PROMPT_CHARS:,}"):
                call()
        assert time.perf_counter() - started < 5.0
    # A prompt at the limit is not refused for its length.
    steer.check_prompt("x" * MAX_PROMPT_CHARS)


def test_probe_and_search_keep_their_text_limit():
    from engine.analysis.probe import feature_activations_on_text
    from engine.analysis.search import features_on_text

    long = "a" * (MAX_CHARS + 1)  # refused before the models are used: none are passed
    for call in (
        lambda: feature_activations_on_text({}, 0, long, models=None, crosscoder=None,
                                            normalizer=None),
        lambda: features_on_text({}, long, models=None, crosscoder=None, normalizer=None),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=f"keep it under {MAX_CHARS:,}"):
            call()
