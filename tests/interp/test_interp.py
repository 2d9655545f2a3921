"""Explainers and judges: prompt formatting, answer parsing, the Anthropic path against a
fake HTTP transport (requests, retries, batches, costs), offline statistics, detection."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable

import numpy as np
import pytest

from engine.config import ConfigError
from engine.contexts import Context
from engine.interp.base import Explainer, FeatureExamples, Judge
from engine.interp.detection import detection_score
from engine.interp.format import format_examples, format_plain, highlight, importances
from engine.interp.offline import (
    OfflineExplainer,
    OfflineJudge,
    background_from,
    flag_terms,
    key_terms,
)
from engine.interp.parse import ParseError, parse_explanation, parse_judgement
from engine.interp.prompts import FEW_SHOT, FLAGGING_SYSTEM

MODEL = "claude-opus-4-1-20250805"
GOOD = (
    "The examples are about drinks.\n\n"
    "[EXPLANATION]: Hot drinks such as tea and coffee.\n"
    "[HARMFUL]: NO\n"
    "[HARMFUL_REASON]: Beverages carry no safety concern."
)
MALFORMED = "These examples are about drinks, I think."

# -- contexts --------------------------------------------------------------------------------

WORDS = """the cat sat on a mat while rain fell over quiet hills and people walked home slowly
near old river bridge under grey winter sky children played games in small town square
market sold bread fish apples shoes books lamps chairs songs letters maps boats"""
VOCAB = WORDS.split()


def context(words: list[str], acts: list[float], kind: str = "top") -> Context:
    """A context of space-separated words, one span (with its leading space) per word."""
    text, spans = "", []
    for word in words:
        start = len(text)
        text += (" " if text else "") + word
        spans.append((start, len(text)))
    return Context(text, np.array(spans), np.array(acts, dtype=float), kind=kind)


def planted(
    feature_id: int, tokens: list[str], seed: int = 0, n: int = 10
) -> tuple[list[Context], list[Context]]:
    """Top contexts where one of `tokens` carries a high activation, and random ones at 0."""
    rng = np.random.default_rng(seed)
    top = []
    for i in range(n):
        words = [str(w) for w in rng.choice(VOCAB, 10)]
        k = int(rng.integers(10))
        words[k] = tokens[i % len(tokens)]
        acts = [0.0] * 10
        acts[k] = 5.0 + i % 3
        top.append(context(words, acts))
    random = [
        context([str(w) for w in rng.choice(VOCAB, 10)], [0.0] * 10, "random") for _ in range(n)
    ]
    return top, random


# -- formatting ------------------------------------------------------------------------------


def test_format_highlights_merges_and_lists_importances() -> None:
    # Spans: "Hello", " world", "!", " How", " are", " you"
    c = Context(
        "Hello world! How are you",
        np.array([[0, 5], [5, 11], [11, 12], [12, 16], [16, 20], [20, 24]]),
        np.array([0.0, 7.0, 2.0, 0.0, 3.0, 3.5]),
    )
    # 0.3 x 10 = 3: "!" (2) is not highlighted, " are" and " you" merge into one run.
    assert highlight(c, 10.0) == "Hello «world»! How «are you»"
    assert importances(c, 10.0) == "(world: 7, !: 2, are: 3, you: 4)"
    text = format_examples([c, c], 10.0)
    assert text.startswith("Example 1: Hello «world»! How «are you»\n(world: 7")
    assert "\n\nExample 2: " in text
    # The feature max defaults to the largest activation shown.
    assert "«world»" in format_examples([c]) and "(world: 10" in format_examples([c])


def test_format_escapes_newlines_and_delimiters() -> None:
    c = Context("a\nb «x»", np.array([[0, 1], [1, 2], [2, 3]]), np.array([0.0, 5.0, 0.0]))
    assert format_examples([c]) == "Example 1: a«\\n»b <<x>>\n(\\n: 10)"
    assert format_plain([c]) == "Example 1: a\\nb <<x>>"


def test_whitespace_between_highlights_joins_but_trailing_whitespace_stays_out() -> None:
    c = Context(
        "over the moon to",
        np.array([[0, 4], [4, 5], [5, 8], [8, 13], [13, 16]]),
        np.array([5.0, 0.0, 5.0, 5.0, 0.0]),
    )
    assert highlight(c, 5.0) == "«over the moon» to"


# -- parsing ---------------------------------------------------------------------------------


def test_parse_paper_few_shot_answers() -> None:
    harmless, harmful = (parse_explanation(answer) for _, answer in FEW_SHOT)
    assert harmless.explanation == "Common idioms in text conveying positive sentiment."
    assert harmless.harmful is False
    assert harmful.harmful is True and "misinformation" in harmful.harmful_reason


def test_parse_markdown_case_and_missing_colon() -> None:
    answer = (
        "Reasoning first.\n\n**[EXPLANATION]:** *Mentions of tea.*\n"
        "**[Harmful]** **yes**\n- __HARMFUL_REASON__: Could\nbe about drugs."
    )
    parsed = parse_explanation(answer)
    assert parsed.explanation == "Mentions of tea."
    assert parsed.harmful is True
    assert parsed.harmful_reason == "Could be about drugs."
    # A section repeated (e.g. echoed from the instructions) keeps its last value.
    echoed = "[HARMFUL]: <YES or NO>\n" + GOOD
    assert parse_explanation(echoed).harmful is False


@pytest.mark.parametrize(
    "answer",
    [
        MALFORMED,
        "[EXPLANATION]: x\n[HARMFUL]: maybe\n[HARMFUL_REASON]: y",
        "[EXPLANATION]:\n[HARMFUL]: NO\n[HARMFUL_REASON]: y",
        "[EXPLANATION]: x\n[HARMFUL]: NO",
        "Explanation of the pattern is hard. Harmful content: none.",
    ],
)
def test_parse_malformed_raises(answer: str) -> None:
    with pytest.raises(ParseError):
        parse_explanation(answer)


def test_parse_judgement_lists_and_lines() -> None:
    assert parse_judgement("[1, 0, 1]", 3) == [True, False, True]
    assert parse_judgement('Here:\n```json\n[true, "0", 1]\n```', 3) == [True, False, True]
    # The last list of the right length wins over an echoed example list.
    assert parse_judgement("e.g. [1, 0, 0, 1]; answer: [0, 0, 1]", 3) == [False, False, True]
    assert parse_judgement("Example 1: yes\nExample 2: 0\n3. match", 3) == [True, False, True]
    for bad in ("[1, 0]", "[1, 2, 0]", "Example 1: 1\nExample 3: 0", "no idea"):
        with pytest.raises(ParseError):
            parse_judgement(bad, 3)


# -- a fake Anthropic API --------------------------------------------------------------------


def http_module():
    """The HTTP library the installed SDK is built on (httpx, or httpx2 in newer SDKs)."""
    anthropic = pytest.importorskip("anthropic")
    return importlib.import_module(anthropic.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])


def message(text: str) -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


def error(status: int, kind: str) -> tuple[int, dict]:
    return status, {"type": "error", "error": {"type": kind, "message": kind}}


def batch(batch_id: str, status: str) -> dict:
    ended = status == "ended"
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": 0 if ended else 2,
            "succeeded": 2 if ended else 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "created_at": "2025-01-01T00:00:00Z",
        "expires_at": "2025-01-02T00:00:00Z",
        "ended_at": "2025-01-01T01:00:00Z" if ended else None,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": (
            f"https://api.anthropic.com/v1/messages/batches/{batch_id}/results" if ended else None
        ),
    }


def jsonl(results: dict[str, dict]) -> str:
    return "\n".join(json.dumps({"custom_id": k, "result": v}) for k, v in results.items())


class FakeAPI:
    """Scripted replies per (method, path); the last reply of a route repeats."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict | None]] = []
        self.replies: dict[tuple[str, str], list] = {}

    def on(self, method: str, path: str, *replies) -> None:
        self.replies.setdefault((method, path), []).extend(replies)

    def bodies(self, method: str, path: str) -> list[dict]:
        return [b for m, p, b in self.requests if (m, p) == (method, path)]

    def handler(self, request):
        http = http_module()
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        queue = self.replies[(request.method, request.url.path)]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        status, payload = reply if isinstance(reply, tuple) else (200, reply)
        if isinstance(payload, str):
            return http.Response(status, text=payload)
        return http.Response(status, json=payload)

    def client(self):
        anthropic = pytest.importorskip("anthropic")
        http = http_module()
        return anthropic.Anthropic(
            api_key="test",
            max_retries=0,
            http_client=http.Client(transport=http.MockTransport(self.handler)),
        )


@pytest.fixture
def api() -> FakeAPI:
    pytest.importorskip("anthropic")
    return FakeAPI()


def explainer(api: FakeAPI, sleeps: list[float] | None = None, **kwargs):
    from engine.interp.anthropic.client import Spending
    from engine.interp.anthropic.explainer import AnthropicExplainer

    record: Callable[[float], None] = sleeps.append if sleeps is not None else lambda s: None
    kwargs.setdefault("spending", Spending.agreed())  # as after the user's yes
    return AnthropicExplainer(client=api.client(), sleep=record, **kwargs)


def features(*ids: int) -> list[FeatureExamples]:
    top, random = planted(0, ["tea", "coffee"])
    return [FeatureExamples(i, top, random) for i in ids]


# -- the Anthropic explainer -----------------------------------------------------------------


def test_anthropic_request_shape(api: FakeAPI) -> None:
    api.on("POST", "/v1/messages", message(GOOD))
    ex = explainer(api)
    result = ex.explain(features(7)[0])
    assert result.parsed and result.explanation == "Hot drinks such as tea and coffee."
    assert result.harmful is False and result.raw == GOOD
    assert result.explainer == f"anthropic:{MODEL}" and result.prompt_version == ex.prompt_version
    assert isinstance(ex, Explainer)

    (body,) = api.bodies("POST", "/v1/messages")
    assert body["model"] == MODEL
    assert body["system"] == [
        {"type": "text", "text": FLAGGING_SYSTEM, "cache_control": {"type": "ephemeral"}}
    ]
    turns = body["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2 + ["user"]
    assert turns[0]["content"] == FEW_SHOT[0][0] and turns[2]["content"] == FEW_SHOT[1][0]
    # The whole fixed prefix is cached: a breakpoint on the last demonstration as well.
    assert turns[3]["content"][0]["cache_control"] == {"type": "ephemeral"}
    final = turns[-1]["content"]
    assert final.startswith("Example 1: ") and "Example 10: " in final
    assert "«tea»" in final and "«coffee»" in final and "(tea: " in final


def test_anthropic_retries_rate_limit_and_overload(api: FakeAPI) -> None:
    api.on("POST", "/v1/messages", error(429, "rate_limit_error"))
    api.on("POST", "/v1/messages", error(529, "overloaded_error"), message(GOOD))
    sleeps: list[float] = []
    result = explainer(api, sleeps, backoff=1.0).explain(features(1)[0])
    assert result.parsed
    assert len(api.requests) == 3
    assert sleeps == [1.0, 2.0]  # exponential backoff


def test_anthropic_gives_up_after_retries_and_refuses_bad_key(api: FakeAPI) -> None:
    anthropic = pytest.importorskip("anthropic")
    api.on("POST", "/v1/messages", error(529, "overloaded_error"))
    with pytest.raises(anthropic.InternalServerError):
        explainer(api, retries=2).explain(features(1)[0])
    assert len(api.requests) == 3

    bad = FakeAPI()
    bad.on("POST", "/v1/messages", error(401, "authentication_error"))
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        explainer(bad).explain(features(1)[0])
    assert len(bad.requests) == 1  # not retried

    unknown = FakeAPI()
    unknown.on("POST", "/v1/messages", error(404, "not_found_error"))
    with pytest.raises(ConfigError, match="does not know model"):
        explainer(unknown).explain(features(1)[0])


def test_anthropic_malformed_then_good(api: FakeAPI) -> None:
    api.on("POST", "/v1/messages", message(MALFORMED), message(GOOD))
    result = explainer(api).explain(features(1)[0])
    assert result.parsed and result.explanation.startswith("Hot drinks")
    bodies = api.bodies("POST", "/v1/messages")
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same request again


def test_anthropic_malformed_twice_recorded_unparsed(api: FakeAPI) -> None:
    api.on("POST", "/v1/messages", message(MALFORMED))
    result = explainer(api).explain(features(1)[0])
    assert not result.parsed
    assert result.explanation == "" and result.harmful is None and result.raw == MALFORMED
    assert len(api.requests) == 2


def test_anthropic_explain_many_resumes_and_reports(api: FakeAPI) -> None:
    api.on("POST", "/v1/messages", message(GOOD))
    idle = FeatureExamples(9, [context(["a", "b"], [0.0, 0.0])], [])
    seen: dict[int, str] = {}
    run = explainer(api, workers=2).explain_many(
        [*features(1, 2, 3), idle], done={2}, on_result=lambda f, e: seen.setdefault(f, e.raw)
    )
    assert sorted(run.results) == sorted(seen) == [1, 3]
    assert run.skipped_done == [2] and run.skipped_few == [9] and not run.failed
    assert len(api.requests) == 2
    assert "1 skipped" in run.summary()


def test_anthropic_batches(api: FakeAPI, tmp_path) -> None:
    good = {"type": "succeeded", "message": message(GOOD)}
    api.on("POST", "/v1/messages/batches", batch("b1", "in_progress"), batch("b2", "in_progress"))
    api.on("GET", "/v1/messages/batches/b1", batch("b1", "in_progress"), batch("b1", "ended"))
    api.on(
        "GET",
        "/v1/messages/batches/b1/results",
        jsonl(
            {
                "feature-12": good,
                "feature-5": {"type": "succeeded", "message": message(MALFORMED)},
                "feature-8": {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": "api_error", "message": "x"}},
                },
            }
        ),
    )
    api.on("GET", "/v1/messages/batches/b2", batch("b2", "ended"))
    api.on(
        "GET",
        "/v1/messages/batches/b2/results",
        jsonl({"feature-8": good, "feature-5": {"type": "succeeded", "message": message("?")}}),
    )
    ledger = tmp_path / "batches.json"
    sleeps: list[float] = []
    seen: list[int] = []
    ex = explainer(api, sleeps, poll_interval=5.0)
    run = ex.explain_many(
        features(5, 8, 12), on_result=lambda f, e: seen.append(f), batch=True, ledger=ledger
    )
    # custom_id maps back to features; the malformed and errored ones were retried once.
    created = api.bodies("POST", "/v1/messages/batches")
    assert [r["custom_id"] for r in created[0]["requests"]] == [
        "feature-5",
        "feature-8",
        "feature-12",
    ]
    assert [r["custom_id"] for r in created[1]["requests"]] == ["feature-5", "feature-8"]
    assert created[0]["requests"][0]["params"] == ex.request(features(5)[0])
    assert seen == [12, 5, 8]
    assert run.results[12].parsed and run.results[8].parsed
    assert not run.results[5].parsed and run.results[5].raw == "?"
    assert sleeps == [5.0]  # polled once while in progress
    assert json.loads(ledger.read_text()) == {"batches": []}
    assert not api.bodies("POST", "/v1/messages")  # no synchronous requests


def test_anthropic_batch_resumes_from_ledger(api: FakeAPI, tmp_path) -> None:
    from engine.interp.prompts import EXPLAIN_PROMPT_VERSION

    ledger = tmp_path / "batches.json"
    entry = {"id": "old", "attempt": 1, "features": [3], "model": MODEL}
    v = EXPLAIN_PROMPT_VERSION
    ledger.write_text(json.dumps({"batches": [{**entry, "prompt_version": v}]}))
    api.on("GET", "/v1/messages/batches/old", batch("old", "ended"))
    api.on(
        "GET",
        "/v1/messages/batches/old/results",
        jsonl({"feature-3": {"type": "succeeded", "message": message(GOOD)}}),
    )
    run = explainer(api).explain_many(features(3), batch=True, ledger=ledger)
    assert run.results[3].parsed
    assert not api.bodies("POST", "/v1/messages/batches")  # collected, not paid for twice

    # A batch that no longer exists is dropped and its features are asked again.
    ledger.write_text(json.dumps({"batches": [{**entry, "id": "gone", "prompt_version": v}]}))
    api.on("GET", "/v1/messages/batches/gone", error(404, "not_found_error"))
    api.on("POST", "/v1/messages/batches", batch("old", "in_progress"))
    run = explainer(api).explain_many(features(3), batch=True, ledger=ledger)
    assert run.results[3].parsed and len(api.bodies("POST", "/v1/messages/batches")) == 1
    assert json.loads(ledger.read_text()) == {"batches": []}


def test_cost_estimate(monkeypatch) -> None:
    from engine.interp.anthropic import client as mod

    prefix = -(-mod.prefix_chars() // 4)
    est = mod.estimate_cost(100, MODEL, prompt_chars=4000, output_tokens=200)
    assert est["input_tokens"] == 100 * (prefix + 1000) and est["output_tokens"] == 20_000
    cacheable = prefix >= 1024
    assert est["cacheable"] is cacheable
    if not cacheable:
        assert est["usd"] == pytest.approx((100 * (prefix + 1000) * 15 + 20_000 * 75) / 1e6)
    batch = mod.estimate_cost(100, MODEL, batch=True, prompt_chars=4000, output_tokens=200)
    assert batch["usd"] == pytest.approx(est["usd"] / 2)
    # With a cacheable prefix, one cache write then cache reads at a tenth of the price.
    monkeypatch.setattr(mod, "DEFAULT_MIN_CACHE_TOKENS", 1)
    cached = mod.estimate_cost(100, MODEL, prompt_chars=4000, output_tokens=200)
    assert cached["cached_input_tokens"] == 99 * prefix
    expected = (100 * 1000 + prefix * 1.25 + 99 * prefix * 0.1) * 15 + 20_000 * 75
    assert cached["usd"] == pytest.approx(expected / 1e6)
    assert mod.estimate_cost(10, "claude-unknown")["usd"] is None
    assert "$" in mod.describe_cost(est) and "100 features" in mod.describe_cost(est)


def test_missing_key(monkeypatch) -> None:
    pytest.importorskip("anthropic")
    from engine.interp.anthropic.explainer import AnthropicExplainer
    from engine.interp.anthropic.judge import AnthropicJudge

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"ANTHROPIC_API_KEY.*--explainer offline"):
        AnthropicExplainer()
    with pytest.raises(ConfigError, match="--judge offline"):
        AnthropicJudge()


def test_missing_package(monkeypatch) -> None:
    from engine.interp.anthropic.explainer import AnthropicExplainer

    monkeypatch.setitem(sys.modules, "anthropic", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[app\]"'):
        AnthropicExplainer()


# -- the Anthropic judge ---------------------------------------------------------------------


def test_anthropic_judge(api: FakeAPI) -> None:
    from engine.interp.anthropic.judge import AnthropicJudge

    top, random = planted(0, ["tea"], n=2)
    contexts = [top[0], random[0], top[1]]
    api.on("POST", "/v1/messages", message("Not sure."), message("[1, 0, 1]"))
    from engine.interp.anthropic.client import Spending

    judge = AnthropicJudge(client=api.client(), sleep=lambda s: None, spending=Spending.agreed())
    assert isinstance(judge, Judge)
    assert judge.judge("Mentions of tea", contexts) == [True, False, True]
    body = api.bodies("POST", "/v1/messages")[0]
    prompt = body["messages"][0]["content"]
    assert "Mentions of tea" in prompt and "Example 3: " in prompt
    assert "«" not in prompt  # plain text, no highlights
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}

    api.replies.clear()
    api.on("POST", "/v1/messages", message("[1, 0]"))
    with pytest.raises(ParseError):
        judge.judge("Mentions of tea", contexts)


# -- offline ---------------------------------------------------------------------------------


def test_offline_explainer_names_planted_tokens() -> None:
    top, random = planted(0, ["tea", "coffee", "Tea"])
    result = OfflineExplainer().explain(FeatureExamples(1, top, random))
    assert result.parsed and result.explainer == "offline:ngram-v1"
    assert '"tea"' in result.explanation and '"coffee"' in result.explanation
    assert result.harmful is False
    assert parse_explanation(result.raw).explanation == result.explanation
    # A supplied corpus background gives the same answer on a clean planted feature.
    corpus = background_from(c.text for c in random)
    assert OfflineExplainer(background=corpus).explain(FeatureExamples(1, top, random)) == result


def test_offline_explainer_flags_planted_harmful_feature() -> None:
    top, random = planted(0, ["bombs", "weapon"])
    result = OfflineExplainer().explain(FeatureExamples(1, top, random))
    assert result.harmful is True
    assert "violence" in result.harmful_reason and "weapon" in result.harmful_reason
    assert flag_terms(["hello world"]) == {}


def test_offline_explainer_is_deterministic_and_resumable() -> None:
    top, random = planted(3, ["tea"])
    items = [FeatureExamples(i, top, random) for i in range(3)]
    seen: list[int] = []
    run = OfflineExplainer().explain_many(items, done={1}, on_result=lambda f, e: seen.append(f))
    assert seen == [0, 2] and run.skipped_done == [1]
    assert run.results[0] == run.results[2]


def test_offline_judge() -> None:
    judge = OfflineJudge()
    texts = ["I drink Teas daily", "a cup of coffee", "nothing here", "the teapot"]
    contexts = [context(t.split(), [0.0] * len(t.split())) for t in texts]
    explanation = 'Text about "tea", "coffee" (activating on: "tea")'
    assert judge.judge(explanation, contexts) == [True, True, False, False]
    # Without quoted terms: content words of the explanation, generic words dropped.
    assert key_terms("Mentions of hot drinks in text") == [("hot",), ("drink",)]
    assert judge.judge("Hot drinks", contexts) == [True, False, False, False]


def test_detection_score_planted_and_random() -> None:
    top, random = planted(0, ["tea", "coffee"])
    explanation = OfflineExplainer().explain(FeatureExamples(1, top, random)).explanation
    result = detection_score(OfflineJudge(), explanation, top, random)
    assert result is not None and result.n_examples == 20
    assert result.accuracy >= 0.8 and result.interpretable
    assert sorted(result.labels) == [False] * 10 + [True] * 10
    assert result.labels != [True] * 10 + [False] * 10  # shuffled
    assert detection_score(OfflineJudge(), explanation, top, random) == result  # seeded

    # A feature firing at random on ordinary text: its explanation cannot separate the sets.
    accuracies = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        _, text = planted(seed, ["x"])
        noise = [context(c.text.split(), list(rng.uniform(0, 1, 10))) for c in text]
        _, others = planted(50 + seed, ["x"])
        explained = OfflineExplainer().explain(FeatureExamples(2, noise, others)).explanation
        accuracies.append(detection_score(OfflineJudge(), explained, noise, others).accuracy)
    assert 0.3 <= float(np.mean(accuracies)) <= 0.7, accuracies


def test_detection_score_few_or_no_examples() -> None:
    top, random = planted(0, ["tea"], n=4)
    result = detection_score(OfflineJudge(), 'Text about "tea"', top, random[:2])
    assert result is not None and result.n_examples == 6
    assert detection_score(OfflineJudge(), 'Text about "tea"', [], random) is None
    assert detection_score(OfflineJudge(), "  ", top, random) is None
