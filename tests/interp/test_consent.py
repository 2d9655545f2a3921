"""Paid Claude requests need the user's consent: every Claude explainer and judge sends
nothing until `stages.consent` records a yes (or --yes / --max-cost), a refusal or no
answer spends nothing, and a spending cap stops the requests. Tested against the fake HTTP
transport of test_interp; nothing reaches the network."""

from __future__ import annotations

import pytest

from engine import stages
from tests.interp.test_interp import GOOD, FakeAPI, error, features, message

pytest.importorskip("anthropic")


def backends(api: FakeAPI) -> list:
    """A Claude explainer, detection judge and steering judge, as the factories make them:
    no consent given."""
    from engine.interp.anthropic.explainer import AnthropicExplainer
    from engine.interp.anthropic.judge import AnthropicJudge
    from engine.steering.judges import AnthropicSteeringJudge

    quiet = {"client": api.client(), "sleep": lambda s: None}
    return [AnthropicExplainer(**quiet), AnthropicJudge(**quiet), AnthropicSteeringJudge(**quiet)]


def send(backend) -> None:
    """One paid request of `backend`."""
    from engine.steering.rubrics import RUBRICS

    if hasattr(backend, "explain"):
        backend.explain(features(1)[0])
    elif hasattr(backend, "judge"):
        top = features(1)[0].top
        backend.judge("Mentions of tea", top[:2])
    else:
        backend.rate(RUBRICS["harmless_refusal"], "p", "r")


def test_a_claude_backend_sends_nothing_without_consent():
    from engine.interp.anthropic.client import SpendingRefused

    api = FakeAPI()
    api.on("POST", "/v1/messages", error(529, "overloaded_error"), message(GOOD))
    for backend in backends(api):
        with pytest.raises(SpendingRefused, match="--yes"):
            send(backend)
    assert api.requests == []  # not one request, retries included


@pytest.mark.parametrize("answer", ["", "n", "no", "yes please"])
def test_declining_spends_nothing(answer):
    from engine.interp.anthropic.client import SpendingRefused

    def ask(prompt: str) -> str:
        return answer

    api = FakeAPI()
    api.on("POST", "/v1/messages", message(GOOD))
    said: list[str] = []
    for backend in backends(api):
        assert stages.consent(backend, "≈ $1.00", ask=ask, say=said.append) is False
        with pytest.raises(SpendingRefused):
            send(backend)
    assert api.requests == []
    assert said.count("≈ $1.00") == 3 and said.count("nothing sent") == 3  # estimate shown


def test_a_yes_after_the_estimate_lets_requests_through():
    api = FakeAPI()
    api.on("POST", "/v1/messages", message(GOOD))
    (explainer, *_) = backends(api)
    asked: list[str] = []
    said: list[str] = []
    ok = stages.consent(explainer, "the estimate", ask=lambda p: asked.append(p) or "y",
                        say=said.append)  # fmt: skip
    assert ok and said == ["the estimate"] and asked == ["proceed? [y/N] "]
    send(explainer)
    assert len(api.requests) == 1


def test_no_answer_spends_nothing_and_says_how_to_agree(monkeypatch):
    import io

    from engine.interp.anthropic.client import SpendingRefused

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal, nothing piped in
    api = FakeAPI()
    api.on("POST", "/v1/messages", message(GOOD))
    for backend in backends(api):
        with pytest.raises(SpendingRefused, match=r"no answer.*--yes.*--max-cost"):
            stages.consent(backend, "estimate", say=lambda line: None)
        with pytest.raises(SpendingRefused):
            send(backend)
    assert api.requests == []
    # A yes piped in by a script is an answer.
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    (explainer, *_) = backends(api)
    assert stages.consent(explainer, "estimate", say=lambda line: None)


def test_offline_backends_need_no_consent():
    offline = stages.detection_judge("offline")
    assert not stages.paid(offline)
    assert stages.consent(offline, "never shown", ask=lambda p: "n", say=print) is True


def test_max_cost_stops_the_requests_at_the_cap():
    from engine.interp.anthropic.client import SpendingRefused, usage_cost

    api = FakeAPI()
    api.on("POST", "/v1/messages", message(GOOD))  # 10 input and 5 output tokens each
    (explainer, *_) = backends(api)
    each = usage_cost(explainer.model, type("U", (), {"input_tokens": 10, "output_tokens": 5}))
    assert stages.consent(explainer, "estimate", max_cost=2.5 * each, say=lambda line: None)
    send(explainer)
    send(explainer)
    send(explainer)  # the third starts under the cap
    with pytest.raises(SpendingRefused, match="--max-cost"):
        send(explainer)
    assert len(api.requests) == 3
    assert explainer.caller.spending.spent_usd == pytest.approx(3 * each)


def test_cost_lines_count_the_requests():
    from engine.steering.exclusivity import ExclusivityConfig

    api = FakeAPI()
    _, judge, steering = backends(api)
    assert "score: up to 12 requests" in stages.score_cost(judge, 12)
    cfg = ExclusivityConfig()
    line = stages.exclusivity_cost(steering, 4, cfg)
    assert f"up to {2 * 4 * cfg.units} requests" in line and "$" in line
    evaluation = stages.eval_config("harmless_refusal", limit=2, alphas=[0, 4])
    line = stages.steer_eval_cost(steering, evaluation)
    assert f"up to {len(evaluation.models) * 2 * 2} requests" in line


def test_the_demo_without_an_answer_runs_offline_and_asks_no_more(monkeypatch, tmp_path):
    from engine.demo import Demo, DemoSettings, _paid_or_offline

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")  # nothing leaves
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))  # nobody answers
    demo = Demo(tmp_path)
    judge = _paid_or_offline(demo, stages.detection_judge, lambda j: stages.score_cost(j, 3))
    assert not stages.paid(judge) and demo.claude_declined
    later = _paid_or_offline(demo, stages.detection_judge, lambda j: pytest.fail("asked again"))
    assert not stages.paid(later)

    agreed = Demo(tmp_path, DemoSettings(yes=True))
    judge = _paid_or_offline(agreed, stages.detection_judge, lambda j: stages.score_cost(j, 3))
    assert stages.paid(judge) and judge.caller.spending.approved
