"""`modeldiff demo`: the whole pipeline on the demo models, every stage cached.

harvest -> train -> analyze -> evaluate -> explain -> score -> stitch -> exclusivity ->
effects -> steer-eval -> dashboard, on SmolLM2-135M-Instruct (A) and Gemma-3-270m (B) from
their PyPI packages and the offline text mixture, sized by the `demo` preset for a 2-core CPU. Each
stage checks what is already on disk and skips or resumes, so a second run (or a run after
an interruption) only does what is missing. Stage timings go to `<out>/timings.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine import stages
from engine.config import RunConfig, load_preset
from engine.errors import ConfigError
from engine.files import atomic_write_text

RUN_ID = "demo"


@dataclass
class DemoSettings:
    """What the demo runs beyond the preset: how much to explain and verify."""

    preset: str = "demo"
    explain_limit: int = 1000  # exclusive features first, then the strongest shared ones
    # The exclusivity stage runs the Figure-5 calibration: this many A-exclusive,
    # B-exclusive and shared features and random directions (the paper samples hundreds),
    # one sampled generation of 32 new tokens per prompt (the paper: 200) at every other
    # strength (0, 2, ..., 10; the paper: 0, 1, ..., 10), so that it takes about a minute
    # and a half on a 2-core CPU (three minutes at every strength).
    calibration_per_category: int = 3
    exclusivity_samples: int = 1
    exclusivity_tokens: int = 32
    exclusivity_alphas: tuple[float, ...] = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)
    # The judge-free effect measure of the same features, against this many random
    # directions per model (32 in all; the measure's default is 32 per model), measured
    # once per run and stitch.
    effects_nulls: int = 16
    eval_rubric: str = "harmless_refusal"
    eval_prompts: int = 8
    eval_alphas: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)
    eval_tokens: int = 32
    # Least squares only: the Adam phase with the inversion penalty lowers the demo's A->B
    # held-out FVE from 0.64 to about 0.54 (docs/verification.md, "Stitch quality").
    stitch_steps: int = 0
    evaluate_windows: int = 24  # held-out windows for CE loss recovered (the run has 7)
    progress: bool = True
    # Consent to paid Claude requests when ANTHROPIC_API_KEY is set (else each paid stage
    # shows its estimate and asks; with no terminal to ask, it runs offline).
    yes: bool = False
    max_cost: float | None = None  # USD per paid stage
    # Replacements for preset values, per section, e.g. {"harvest": {"max_pairs": 3000}}.
    overrides: dict[str, dict] = field(default_factory=dict)


@dataclass
class Demo:
    """The demo's files and the stage timings of this invocation."""

    out: Path
    settings: DemoSettings = field(default_factory=DemoSettings)
    timings: dict[str, dict] = field(default_factory=dict)
    claude_declined: bool = False  # once declined, no later stage asks again

    @property
    def store(self) -> Path:
        return self.out / "store"

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def db(self) -> Path:
        return self.out / "results.duckdb"

    @property
    def stitch(self) -> Path:
        return self.out / "stitch.safetensors"

    def config(self, dims: tuple[int, int] | None = None) -> RunConfig:
        """The preset's run config with the settings' overrides applied."""
        cfg = load_preset(self.settings.preset, dims)
        for section, values in self.settings.overrides.items():
            if getattr(cfg, section, None) is None:
                raise ConfigError(f"the {self.settings.preset!r} preset has no [{section}]")
            setattr(cfg, section, replace(getattr(cfg, section), **values))
        return cfg


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> Demo:
    """Run every stage (skipping finished ones) and return the demo with its timings."""
    demo = Demo(Path(out), settings or DemoSettings())
    demo.out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Callable[[Demo], str]]] = [
        ("harvest", stage_harvest),
        ("train", stage_train),
        ("analyze", stage_analyze),
        ("evaluate", stage_evaluate),
        ("explain", stage_explain),
        ("score", stage_score),
        ("stitch", stage_stitch),
        ("exclusivity", stage_exclusivity),
        ("effects", stage_effects),
        ("steer-eval", stage_steer_eval),
    ]
    started = time.perf_counter()
    for i, (name, stage) in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {name}", flush=True)
        t0 = time.perf_counter()
        note = stage(demo)
        seconds = time.perf_counter() - t0
        demo.timings[name] = {"seconds": round(seconds, 1), "note": note}
        print(f"      {note} ({_duration(seconds)})", flush=True)
    demo.timings["total"] = {"seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(demo.out / "timings.json", json.dumps(demo.timings, indent=2) + "\n")
    return demo


def stage_harvest(demo: Demo) -> str:
    """Paired activations of the two demo models (resumes a partial store)."""
    from engine.activations import ActivationStore, StoreError
    from engine.harvest.pipeline import summary

    cfg = demo.config().harvest
    try:
        have = len(ActivationStore(demo.store))
    except (StoreError, FileNotFoundError):
        have = 0
    if have >= cfg.max_pairs:
        return f"cached: {have:,} pairs in {demo.store}"
    return summary(stages.harvest(cfg, demo.store, progress=demo.settings.progress))


def stage_train(demo: Demo) -> str:
    """A DFC on the store (resumes from its last checkpoint)."""
    if (demo.run_dir / "crosscoder.safetensors").is_file():
        return f"cached: {demo.run_dir}"
    data = stages.training_data(store=demo.store)
    cfg = demo.config(data.dims)
    result = stages.train(cfg, data, demo.run_dir, progress=demo.settings.progress)
    fve = ", ".join(f"{k} {v:.3f}" for k, v in result.final.items() if k.startswith("fve"))
    return f"{cfg.train.steps:,} steps; {fve}"


def stage_analyze(demo: Demo) -> str:
    """Feature statistics, contexts and geometry into the results database."""
    if _has_run(demo.db):
        return f"cached: run {RUN_ID!r} in {demo.db}"
    result = stages.analyze(
        demo.run_dir, demo.store, demo.db, run_id=RUN_ID, progress=demo.settings.progress
    )
    return result.summary()


def stage_evaluate(demo: Demo) -> str:
    """CE loss recovered: the reconstruction spliced into both models on held-out windows."""
    from engine.analysis.evaluate import EVALUATION_FILE, read_evaluation, summary

    result = read_evaluation(demo.run_dir)
    if result is not None:
        return f"cached: {demo.run_dir / EVALUATION_FILE}\n" + summary(result)
    # A run trained before validation existed held nothing out: measured on training
    # windows, and the summary says so.
    result = stages.evaluate(
        demo.run_dir, demo.store, max_windows=demo.settings.evaluate_windows, allow_trained=True
    )
    return summary(result)


def stage_explain(demo: Demo) -> str:
    """Explanations and harmful flags, exclusive partitions first (resumable)."""
    from engine.results import Database

    with Database(demo.db) as db:
        explainer = _paid_or_offline(
            demo,
            lambda kind: stages.explainer(kind, db, RUN_ID),
            lambda ex: stages.explain_cost(ex, demo.settings.explain_limit),
        )
        run = stages.explain(
            db, RUN_ID, explainer, limit=demo.settings.explain_limit,
            progress=demo.settings.progress,
        )  # fmt: skip
    return f"{explainer.name}: {run.summary()}"


def stage_score(demo: Demo) -> str:
    """Detection scores of the explanations (resumable)."""
    from engine.interp.run import to_score
    from engine.results import Database

    with Database(demo.db) as db:
        judge = _paid_or_offline(
            demo,
            stages.detection_judge,
            lambda j: stages.score_cost(j, len(to_score(db, RUN_ID, j, None, None))),
        )
        run = stages.score(db, RUN_ID, judge, progress=demo.settings.progress)
    return f"{judge.name}: {run.summary()}"


def stage_stitch(demo: Demo) -> str:
    """Affine maps between the models, fitted on the store without the crosscoder."""
    from engine.steering.stitching import Stitch

    if demo.stitch.is_file():
        fve = Stitch.load(demo.stitch).fve
        return f"cached: {demo.stitch} (held-out FVE {_fve(fve)})"
    stitch, _ = stages.fit_stitch(demo.store, demo.stitch, steps=demo.settings.stitch_steps)
    return f"held-out FVE {_fve(stitch.fve)}"


def stage_exclusivity(demo: Demo) -> str:
    """The exclusivity calibration (paper Figure 5, small): a few features per category and
    random directions, scored; each category's mean and 95% interval (resumable)."""
    from engine.results import Database
    from engine.steering.calibration import CalibrationConfig, pending
    from engine.steering.stitching import Stitch

    s = demo.settings
    cfg = stages.exclusivity_config(
        alphas=s.exclusivity_alphas,
        max_new_tokens=s.exclusivity_tokens,
        samples=s.exclusivity_samples,
    )
    calibration = CalibrationConfig(per_category=s.calibration_per_category, exclusivity=cfg)
    with Database(demo.db) as db:
        stitch = Stitch.load(demo.stitch)
        judge = _paid_or_offline(
            demo,
            stages.steering_judge,
            lambda j: stages.exclusivity_cost(
                j, len(pending(db, RUN_ID, j.name, calibration, stitch)), cfg
            ),
        )
        frame = stages.calibrate(db, RUN_ID, demo.stitch, judge, calibration)
    figure = demo.out / "exclusivity-figure5.html"
    stages.calibration_figure(frame, figure, "demo: exclusivity by category")
    short = (
        f"demo settings: {s.calibration_per_category} per category, {s.exclusivity_tokens} "
        f"new tokens (paper: 200), {s.exclusivity_samples} sample(s) per prompt, strengths "
        f"{_strengths(s.exclusivity_alphas)} (paper: 0, 1, ..., 10)"
    )
    lines = "; ".join(stages.calibration_lines(frame))
    return f"{judge.name} ({short}): {lines} -> {figure}"


def stage_effects(demo: Demo) -> str:
    """The judge-free effect measure of the calibration's features, against random
    directions from each model's activation covariance (the null, measured once)."""
    from engine.results import Database
    from engine.steering.effects.reading import categorised, effects_figure, summary_lines

    s = demo.settings
    cfg = stages.effects_config(nulls=s.effects_nulls)
    with Database(demo.db) as db:
        items = db.calibration(RUN_ID)
        features = sorted({int(f) for f in items["feature_id"].dropna()}) if len(items) else []
        if not features:
            return "no calibration features to measure"
        stages.effects(db, RUN_ID, demo.stitch, features, cfg, progress=s.progress)
        frame = categorised(db.effects(RUN_ID), db.features(RUN_ID))
    figure = demo.out / "effects.html"
    effects_figure(frame, "demo: judge-free effect exclusivity").write_html(figure)
    return f"{'; '.join(summary_lines(frame))} -> {figure}"


def stage_steer_eval(demo: Demo) -> str:
    """A small steering evaluation of the most exclusive scored feature."""
    from engine.results import Database
    from engine.steering.exclusivity import pick_features
    from engine.steering.rubrics import rubric

    s = demo.settings
    rub = rubric(s.eval_rubric)
    with Database(demo.db) as db:
        # The most exclusive scored feature; if none passed the interpretability filter,
        # the strongest exclusive one, so the demo still shows an evaluation.
        feature = _most_exclusive(db)
        if feature is None:
            picked = pick_features(db, RUN_ID, 1)
            if not picked:
                return "no live exclusive feature to evaluate"
            feature = picked[0]
        kind = f"steer-eval:{rub.name}"
        if not db.evaluations(RUN_ID, kind=kind, feature_id=feature).empty:
            return f"cached: feature {feature} on {rub.name}"
        cfg = stages.eval_config(
            rub.name, alphas=s.eval_alphas, limit=s.eval_prompts, max_new_tokens=s.eval_tokens
        )
        judge = _paid_or_offline(
            demo, stages.steering_judge, lambda j: stages.steer_eval_cost(j, cfg)
        )
        result = stages.steer_eval(db, RUN_ID, demo.stitch, feature, judge, cfg)
    figure = demo.out / f"steer-eval-{feature}-{rub.name}.html"
    stages.eval_figure(result, feature, figure)
    return (
        f"feature {feature} on {rub.name} ({s.eval_prompts} prompts, {s.eval_tokens} new "
        f"tokens: demo settings, the paper's limit is {rub.tokens}) -> {figure}"
    )


def dashboard_url(host: str, port: int) -> str:
    """Where the dashboard will be."""
    return f"http://{host}:{port}/?run={RUN_ID}"


# -- helpers ---------------------------------------------------------------------------------


def _strengths(alphas: tuple[float, ...]) -> str:
    """Strengths as a short list: "0, 2, 4, 6, 8, 10"."""
    return ", ".join(f"{a:g}" for a in alphas)


def _has_run(db_path: Path) -> bool:
    """Whether the results database already holds the demo run."""
    if not db_path.is_file():
        return False
    from engine.results import Database

    with Database(db_path, read_only=True) as db:
        return RUN_ID in set(db.runs()["run_id"])


def _most_exclusive(db) -> int | None:
    """The scored feature with the highest exclusivity (ties: lowest id)."""
    scores = db.scores(RUN_ID, metric="exclusivity").dropna(subset=["value"])
    if scores.empty:
        return None
    best = scores.sort_values(["value", "feature_id"], ascending=[False, True])
    return int(best["feature_id"].iloc[0])


def _paid_or_offline(demo: Demo, make: Callable[[str], Any], cost: Callable[[Any], str]):
    """Claude (`make("anthropic")`) when a key is set and the user accepts the estimate
    `cost` gives (or the settings' yes / max_cost), else the offline backend. A refusal, no
    answer or no terminal to ask sends nothing, and later stages do not ask again."""
    from engine.interp.anthropic.client import SpendingRefused

    if not os.environ.get("ANTHROPIC_API_KEY") or demo.claude_declined:
        return make(stages.DEFAULT_BACKEND)
    backend = make("anthropic")
    s = demo.settings
    try:
        if stages.consent(backend, cost(backend), yes=s.yes, max_cost=s.max_cost):
            return backend
    except SpendingRefused as err:
        print(f"{err}; running offline")
    demo.claude_declined = True
    print("using the offline backends")
    return make(stages.DEFAULT_BACKEND)


def _fve(fve: dict[str, float]) -> str:
    """Held-out FVE per direction."""
    return ", ".join(f"{k} {v:.2f}" for k, v in fve.items() if k in ("a_to_b", "b_to_a"))


def _duration(seconds: float) -> str:
    """1 min 05 s / 12.3 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
