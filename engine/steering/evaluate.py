"""Steering evaluations (paper B.5.2-B.5.6, Figure 6): a behaviour score per strength.

A feature is steered over a rubric's prompt set at each strength, in its own model and,
through the stitch, in the other one. Every response is rated by a judge on the rubric's
behaviour (e.g. CCP alignment) and on coherence; the ratings are averaged over prompts
per model and strength with a 95% confidence interval (Student t). Scores are shown as
percentages (score x 20), as in the paper's Figure 6, where 1/5 is 20%.

Generation follows the paper: greedy, with the rubric's token limit (B.5.2: 500, B.5.4:
2,000, B.5.6: 1,000; 200 where none is given), and every prompt x strength of a model in
as few batched generations as memory allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from engine.results import Database
from engine.steering.judges import SteeringJudge
from engine.steering.pair import SteeringPair
from engine.steering.rubrics import RUBRIC_VERSION, Rubric, load_prompts, rubric
from engine.steering.steer import GenerationConfig

KIND = "steer-eval"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class EvalConfig:
    """Which rubric, prompts, strengths and decoding (paper: greedy decoding)."""

    rubric: str
    alphas: tuple[float, ...] | None = None  # None: the rubric's grid from the paper
    prompts: str | None = None  # a prompt-set name or file; None: the rubric's own set
    limit: int | None = None  # use only the first `limit` prompts
    # Greedy (the paper); its token limit is the rubric's (`for_rubric`).
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=200, greedy=True)
    )
    source: str = "a"  # source model for features both models decode
    models: tuple[str, ...] = ("source", "target")  # steer its own model, the other, or both

    @classmethod
    def for_rubric(cls, name: str) -> EvalConfig:
        """The paper's settings for a rubric: its strengths, greedy decoding, and its token
        limit (`Rubric.tokens`)."""
        tokens = rubric(name).tokens
        return cls(rubric=name, generation=GenerationConfig(max_new_tokens=tokens, greedy=True))


@dataclass
class EvalResult:
    """Every rated response, the per-strength summary, and where it was stored."""

    feature_id: int
    rubric: str
    rows: list[dict[str, Any]]
    summary: pd.DataFrame
    eval_id: int | None = None


def steer_eval(
    db: Database,
    run_id: str,
    pair: SteeringPair,
    feature_id: int,
    judge: SteeringJudge,
    cfg: EvalConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Steer, rate, aggregate and record one feature's evaluation on one rubric."""
    rub = rubric(cfg.rubric)
    prompts = load_prompts(cfg.prompts or rub.prompt_set)[: cfg.limit]
    alphas = tuple(cfg.alphas if cfg.alphas is not None else rub.alphas)
    s_max = float(db.feature(run_id, feature_id)["s_max"] or 0.0)
    vectors = pair.vectors(feature_id, s_max, cfg.source)
    steered = [vectors.source if m == "source" else vectors.target for m in cfg.models]
    rows: list[dict[str, Any]] = []
    total, done = len(steered) * len(prompts), 0
    for model in steered:
        grid = pair.generate(model, vectors, prompts, alphas, cfg.generation)
        for prompt in prompts:
            texts = grid[(prompt, 0)]
            rows.extend(_rate(judge, rub, model, vectors.describe(model), prompt, texts))
            done += 1
            if on_progress is not None:
                on_progress(done, total)
    summary = aggregate(rows, rub.metrics)
    result = EvalResult(feature_id, rub.name, rows, summary)
    result.eval_id = db.add_evaluation(
        run_id,
        kind=f"{KIND}:{rub.name}",
        feature_id=feature_id,
        config={
            **asdict(cfg),
            "alphas": list(alphas),
            "n_prompts": len(prompts),
            "s_max": s_max,
            "source": vectors.source,
            "judge": judge.name,
            "judge_version": judge.prompt_version,
            "rubric_version": RUBRIC_VERSION,
        },
        result={"summary": summary.to_dict(orient="records"), "rows": rows},
    )
    return result


def _rate(
    judge: SteeringJudge,
    rub: Rubric,
    model: str,
    steered_with: str,
    prompt: str,
    texts: dict[float, str],
) -> list[dict[str, Any]]:
    """One rated row per strength."""
    rows = []
    for alpha, text in sorted(texts.items()):
        rating = judge.rate(rub, prompt, text)
        rows.append(
            {
                "model": model,
                "steered_with": steered_with,
                "prompt": prompt,
                "alpha": alpha,
                "response": text,
                **{m.lower(): rating.scores.get(m) for m in rub.metrics},
                "reasoning": rating.reasoning,
            }
        )
    return rows


def aggregate(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and 95% CI of each metric per model and strength (missing ratings left out)."""
    frame = pd.DataFrame(list(rows))
    out = []
    for (model, alpha), group in frame.groupby(["model", "alpha"], sort=True):
        for metric in metrics:
            values = group[metric.lower()].dropna().astype(float).tolist()
            low, mid, high = mean_ci(values)
            out.append(
                {
                    "model": model,
                    "steered_with": group["steered_with"].iloc[0],
                    "alpha": float(alpha),
                    "metric": metric,
                    "n": len(values),
                    "mean": mid,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pd.DataFrame(
        out, columns=["model", "steered_with", "alpha", "metric", "n", "mean", "ci_low", "ci_high"]
    )


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, ...]:
    """(low, mean, high) of a Student-t confidence interval; NaNs for no values, and a
    zero-width interval for one value."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mid = sum(values) / n
    if n == 1:
        return (mid, mid, mid)
    from scipy.stats import t

    sd = math.sqrt(sum((v - mid) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (mid - half, mid, mid + half)


def summary_of(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The summary frame of a stored evaluation row."""
    return pd.DataFrame(evaluation["result"]["summary"])


def evaluation_figure(summary: pd.DataFrame, behaviour: str, title: str = ""):
    """Figure 6 style: `behaviour` (solid) and coherence (dotted) in % per strength, one
    colour per steered model, 95% CI shaded."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colours = {"a": "#d4a017", "b": "#7b3fa0"}
    for (model, metric), group in summary.groupby(["model", "metric"], sort=True):
        if metric not in ("COHERENCE", behaviour):
            continue
        group = group.sort_values("alpha").dropna(subset=["mean"])
        if group.empty:  # nothing rated (e.g. a score this judge cannot give)
            continue
        colour = colours.get(model, "#444")
        label = f"{group['steered_with'].iloc[0]} - {metric.lower().replace('_', ' ')}"
        dash = "dot" if metric == "COHERENCE" else "solid"
        x = group["alpha"].tolist()
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=(group["ci_high"] * 20).tolist() + (group["ci_low"] * 20).tolist()[::-1],
                fill="toself",
                fillcolor=_rgba(colour, 0.15),
                mode="lines",
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=(group["mean"] * 20).tolist(),
                mode="lines+markers",
                name=label,
                line={"color": colour, "dash": dash},
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="steering strength (x s_max)",
        yaxis_title="score (%)",
        yaxis_range=[0, 105],
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    """`#rrggbb` with transparency, for CI bands."""
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"
