"""The pipeline's stages, one function each, and the explainer and judge factories.

harvest -> train -> analyze -> explain -> score -> stitch -> exclusivity -> steer-eval: the
`modeldiff` sub-commands and the demo both call these, so the stages are wired once.

Every option a caller leaves at None keeps the library's own default (the config dataclass
field or the function parameter), so each default has one home; the command-line flags
default to None for that reason. Heavy modules are imported inside the functions, so
importing this module (and building the CLI parser) stays cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.config import HarvestConfig, RunConfig
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.results import Database
    from engine.steering.steer import GenerationConfig

# Who explains and judges: "offline" needs no key and is deterministic.
BACKENDS = ("offline", "anthropic")
DEFAULT_BACKEND = "offline"

T = TypeVar("T")


def given(**values: Any) -> dict[str, Any]:
    """The values that are not None: the options a caller set."""
    return {name: value for name, value in values.items() if value is not None}


def with_options(cfg: T, options: Mapping[str, Any]) -> T:
    """`cfg` (a config dataclass) with every field that `options` sets (not None) replaced.

    The dataclass validates the result, so a bad value fails as it would in a config file.
    """
    changes = {f.name: options[f.name] for f in fields(cfg) if options.get(f.name) is not None}  # type: ignore[arg-type]
    return replace(cfg, **changes)  # type: ignore[type-var]


def parameter_defaults(func: Callable) -> dict[str, Any]:
    """The defaults of `func`'s parameters that have one."""
    params = inspect.signature(func).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


# -- harvest -> train -> analyze --------------------------------------------------------------


def harvest(
    cfg: HarvestConfig,
    out: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
):
    """Harvest aligned activation pairs of the two models into the store at `out`."""
    from engine.harvest.pipeline import harvest as run
    from engine.models.loading import quiet_transformers

    quiet_transformers()  # harvest prints one line per loaded model instead
    return run(cfg, out, fresh=fresh, progress=progress, rank=rank, world_size=world_size)


@dataclass
class TrainingData:
    """Paired activations to train on, their widths, and the store's median norms (None for
    a pairs file: the trainer estimates them from its first batches)."""

    source: Any
    dims: tuple[int, int]
    median_norms: tuple[float, float] | None = None


def training_data(store: str | Path | None = None, pairs: str | Path | None = None):
    """The activations of an activation store or a pairs file (exactly one of them)."""
    if (store is None) == (pairs is None):
        raise ConfigError("give exactly one of --store (activation store) or --pairs (file)")
    if store is not None:
        from engine.activations import ActivationStore

        acts = ActivationStore(store)
        # The store's statistics cover every pair, not just the first batches.
        return TrainingData(acts, (acts.d_a, acts.d_b), acts.median_norms())
    from engine.crosscoder.pairs import load_pairs

    x_a, x_b = load_pairs(pairs)
    return TrainingData((x_a, x_b), (x_a.shape[1], x_b.shape[1]))


def stream_run(
    config: str | Path,
    out: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    fresh: bool = False,
    progress: bool = True,
):
    """The data side of a streamed training run into `out` (engine.streaming.run.StreamRun):
    the [harvest] and [stream] settings of the TOML file or preset `config` (the flags in
    `options` override them), checked against the run directory, and the models loaded.
    `.dims` gives the widths; `.open(batch_size)` harvests the analysis store and returns
    the live source (`streaming_data` wraps it for `train`)."""
    from engine.config import load_data_config
    from engine.models.loading import quiet_transformers
    from engine.streaming.run import StreamRun

    harvest_cfg, stream_cfg = load_data_config(config)
    harvest_cfg = with_options(harvest_cfg, options or {})
    stream_cfg = with_options(stream_cfg, options or {})
    quiet_transformers()  # one line per loaded model instead
    return StreamRun(harvest_cfg, stream_cfg, out, fresh=fresh, progress=progress)


def streaming_data(run: Any, batch_size: int) -> TrainingData:
    """A streamed run's training data: its analysis store harvested (or resumed), then the
    live source. Normalisation is fitted on the stream's first rows, as for a pairs file."""
    source = run.open(batch_size)
    return TrainingData(source, run.dims)


def train(
    cfg: RunConfig, data: TrainingData, out: str | Path, *, resume: bool = True, progress=True
):
    """Train the crosscoder `cfg` describes on `data` into the run directory `out`."""
    from engine.crosscoder.normalize import Normalizer
    from engine.crosscoder.training import train as run

    normalizer = None
    if data.median_norms is not None:
        normalizer = Normalizer.from_median_norms(*data.median_norms, *data.dims)
    return run(
        cfg.crosscoder, cfg.train, data.source, out_dir=out, resume=resume,
        normalizer=normalizer, progress=progress,
    )  # fmt: skip


def run_store(run_dir: str | Path, store: str | Path | None) -> str | Path:
    """`store`, or when it is None the analysis store a streamed run recorded."""
    if store is not None:
        return store
    from engine.hub import resolve_run
    from engine.streaming.run import recorded_store

    recorded = recorded_store(resolve_run(run_dir))
    if recorded is None:
        raise ConfigError(
            f"{run_dir} was not trained with --stream, so it records no store of its own; "
            "give the activation store it trained on with --store"
        )
    if not recorded.is_dir():  # e.g. a streamed run downloaded from the Hub
        raise ConfigError(
            f"the analysis store of the streamed run {run_dir} is not at {recorded}; give "
            "it with --store"
        )
    return recorded


def analyze(
    run_dir: str | Path,
    store: str | Path | None,
    db: str | Path,
    *,
    run_id: str | None = None,
    top_k: int | None = None,
    segment_pairs: int | None = None,
    n_random: int | None = None,
    progress: bool = True,
):
    """Analyse every feature of a trained crosscoder (a run directory, or a Hub location
    hf://OWNER/NAME: see `engine.hub`) into the results database `db`: `top_k`
    max-activating contexts of `segment_pairs` aligned tokens and `n_random` non-activating
    ones per feature. `store` None: the analysis store of a streamed run."""
    from engine.analysis.analyze import analyze as run
    from engine.analysis.examples import ExampleConfig
    from engine.analysis.scan import ScanConfig
    from engine.hub import resolve_run, run_name

    # A Hub run is analysed from its cached copy, named after its repository.
    run_id = run_id or run_name(run_dir)
    return run(
        resolve_run(run_dir), run_store(run_dir, store), db, run_id=run_id, progress=progress,
        scan_cfg=ScanConfig(**given(top_k=top_k, segment_pairs=segment_pairs)),
        example_cfg=ExampleConfig(**given(n_random=n_random)),
    )  # fmt: skip


def evaluate(
    run_dir: str | Path,
    store: str | Path | None,
    *,
    max_windows: int | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    allow_trained: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """CE loss recovered of both models with the run's reconstruction spliced in at the
    captured layer, on up to `max_windows` of the windows the run held out of training;
    written to `out` (default `<run_dir>/evaluation.json`); `store` None: the analysis
    store of a streamed run."""
    from engine.analysis.evaluate import evaluate as run

    return run(
        run_dir, run_store(run_dir, store), allow_trained=allow_trained, progress=progress,
        **given(max_windows=max_windows, out=out, device=device),
    )  # fmt: skip


# -- explain -> score -------------------------------------------------------------------------


# -- paid calls: every Claude explainer and judge sends nothing until `consent` approves it ---


def paid(backend: Any) -> bool:
    """Whether `backend` (an explainer or judge) sends paid Claude requests."""
    return hasattr(backend, "caller")


def consent(
    backend: Any,
    estimate: str,
    *,
    yes: bool = False,
    max_cost: float | None = None,
    ask: Callable[[str], str] | None = None,
    say: Callable[[str], Any] = print,
) -> bool:
    """Show `estimate` (a line) for a paid `backend` and record the user's answer on it.

    --max-cost approves spending up to that many USD, --yes approves it without asking;
    otherwise the user is asked (`ask`, default: standard input): "y" approves, any other
    answer sends nothing and returns False, and no answer at all (standard input closed or
    unreadable, as without a terminal) sends nothing and raises SpendingRefused. An
    offline backend costs nothing and needs no consent.
    """
    from engine.interp.anthropic.client import CONSENT_HINT, Spending, SpendingRefused

    if not paid(backend):
        return True
    say(estimate)
    if max_cost is not None:
        backend.caller.spending = Spending.agreed(max_cost)
        say(f"spending up to ${max_cost:,.2f} (--max-cost)")
        return True
    if yes:
        backend.caller.spending = Spending.agreed()
        return True
    try:
        answer = (ask or input)("proceed? [y/N] ")
    except (EOFError, OSError):  # nothing to read: not a yes
        raise SpendingRefused(
            f"no answer to the cost prompt (no terminal or input), so nothing was sent: paid "
            f"Claude requests need your consent; {CONSENT_HINT}"
        ) from None
    if answer.strip().lower() in ("y", "yes"):
        backend.caller.spending = Spending.agreed()
        return True
    say("nothing sent")
    return False


def explainer(kind: str, db: Database, run_id: str, *, model: str | None = None, batch=False):
    """The explainer `kind` names: "anthropic" (Claude `model`, optionally through the
    Message Batches API; it sends nothing until `consent`) or "offline" (n-grams against
    the run's own text)."""
    if kind == "anthropic":
        from engine.interp.anthropic.explainer import AnthropicExplainer

        return AnthropicExplainer(batch=batch, **given(model=model))
    from engine.interp.offline import OfflineExplainer, background_from

    return OfflineExplainer(background_from(db.window_texts(run_id)))


def explain_cost(explainer: Any, n_features: int) -> str:
    """What explaining `n_features` features with a Claude explainer would cost, as a line."""
    from engine.interp.anthropic.client import describe_cost, estimate_cost

    return describe_cost(estimate_cost(n_features, explainer.model, batch=explainer.batch))


def score_cost(judge: Any, n_features: int) -> str:
    """What detection-scoring `n_features` explanations with a Claude judge would cost."""
    from engine.interp.anthropic.client import EXAMPLE_CHARS, describe_requests, estimate_requests
    from engine.interp.detection import N_EACH
    from engine.interp.prompts import DETECTION_SYSTEM, DETECTION_TEMPLATE

    chars = len(DETECTION_TEMPLATE) + 2 * N_EACH * EXAMPLE_CHARS
    estimate = estimate_requests(
        "score", n_features, judge.model, prompt_chars=chars,
        prefix_chars=len(DETECTION_SYSTEM), output_tokens=100,
    )  # fmt: skip
    return describe_requests(estimate)


def exclusivity_cost(judge: Any, n_items: int, cfg: Any) -> str:
    """What scoring the exclusivity of `n_items` features (or random directions) with a
    Claude judge would cost: an interpretability and a similarity request per unit."""
    from engine.interp.anthropic.client import describe_requests, estimate_requests
    from engine.steering.judges import RESPONSE_CHARS, SIMILARITY_SYSTEM

    response = min(RESPONSE_CHARS, cfg.generation.max_new_tokens * 6)
    strengths = len(set(cfg.alphas) | {0.0})
    prompt = max(map(len, cfg.prompts), default=0)
    estimate = estimate_requests(
        "exclusivity", 2 * n_items * cfg.units, judge.model,
        prompt_chars=prompt + 2 * strengths * response,
        prefix_chars=len(SIMILARITY_SYSTEM), output_tokens=150,
    )  # fmt: skip
    return describe_requests(estimate)


def steer_eval_cost(judge: Any, cfg: Any) -> str:
    """What rating a steering evaluation's answers with a Claude judge would cost: one
    request per model x prompt x strength."""
    from engine.interp.anthropic.client import describe_requests, estimate_requests
    from engine.steering.rubrics import load_prompts, rubric

    rub = rubric(cfg.rubric)
    prompts = load_prompts(cfg.prompts or rub.prompt_set)[: cfg.limit]
    alphas = cfg.alphas if cfg.alphas is not None else rub.alphas
    response = cfg.generation.max_new_tokens * 6
    prompt = max(map(len, prompts), default=0)
    estimate = estimate_requests(
        "steer-eval", len(cfg.models) * len(prompts) * len(alphas), judge.model,
        prompt_chars=prompt + response, prefix_chars=len(rub.system_prompt()),
    )  # fmt: skip
    return describe_requests(estimate)


def explain(db: Database, run_id: str, explainer: Any, **options):
    """Explain features (exclusive partitions first) and flag potentially harmful ones;
    `options` are `explain_run`'s (partitions, limit, ledger, progress)."""
    from engine.interp.run import explain_run

    return explain_run(db, run_id, explainer, **options)


def detection_judge(kind: str, model: str | None = None):
    """The detection judge `kind` names: "anthropic" (Claude `model`; it sends nothing
    until `consent`) or "offline"."""
    if kind == "anthropic":
        from engine.interp.anthropic.judge import AnthropicJudge

        return AnthropicJudge(**given(model=model))
    from engine.interp.offline import OfflineJudge

    return OfflineJudge()


def score(db: Database, run_id: str, judge: Any, **options):
    """Detection-score the latest explanations; `options` are `score_run`'s (explainer,
    limit, progress)."""
    from engine.interp.run import score_run

    return score_run(db, run_id, judge, **options)


# -- stitch -> exclusivity -> steer-eval ------------------------------------------------------


def fit_stitch(
    store: str | Path, out: str | Path, *, announce: Callable[[str], Any] | None = None, **options
):
    """Fit the affine maps A->B and B->A on a store's pairs and save them to `out`.

    `options` are `train_stitch`'s (steps, batch_size, lr, holdout, seed, device, samples,
    ridge, outlier_norm, translation); `announce`, if given, gets a line before the fit.
    Returns (stitch, saved path); `stitching.stitch_warning(stitch)` says if it is poor.
    """
    from engine.activations import ActivationStore
    from engine.steering.stitching import check_stitch_target, train_stitch

    out = Path(out)
    check_stitch_target(out)  # before the fit, not after it
    acts = ActivationStore(store)
    settings = {**parameter_defaults(train_stitch), **given(**options)}
    settings["batch_size"] = min(settings["batch_size"], len(acts))  # a small store works too
    if announce is not None:
        announce(
            f"fitting a {acts.d_a} <-> {acts.d_b} stitch on {store} (least squares on up to "
            f"{min(settings['samples'], len(acts))} pairs, then {settings['steps']} Adam steps)"
        )
    stitch = train_stitch(acts, acts.d_a, acts.d_b, **settings)
    stitch.info["store"] = str(Path(store).resolve())
    return stitch, stitch.save(out)


def steering_judge(kind: str, model: str | None = None):
    """The steering judge `kind` names: "anthropic" (Claude `model`; it sends nothing until
    `consent`) or "offline" (MiniLM)."""
    from engine.steering.judges import steering_judge as make

    return make(kind, **given(model=model))


def generation(
    base: GenerationConfig,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    max_batch: int | None = None,
) -> GenerationConfig:
    """`base` decoding with the options set; temperature 0 means greedy decoding;
    `max_batch`: rows per batched generation (default: as many as fit memory)."""
    changes = given(max_new_tokens=max_new_tokens, seed=seed, max_batch=max_batch)
    if temperature is not None:
        changes.update(greedy=temperature == 0, temperature=temperature or base.temperature)
    return replace(base, **changes)


def _tuple(values: Sequence | None) -> tuple | None:
    return None if values is None else tuple(values)


def exclusivity_config(
    *,
    alphas: Sequence[float] | None = None,
    source: str | None = None,
    samples: int | None = None,
    **decoding,
):
    """The exclusivity settings (paper B.5) with the options set; `decoding` as in
    `generation` (plus `max_batch`)."""
    from engine.steering.exclusivity import ExclusivityConfig

    base = ExclusivityConfig()
    return replace(
        base,
        generation=generation(base.generation, **decoding),
        **given(alphas=_tuple(alphas), source=source, samples=samples),
    )


def exclusivity_line(result: Any) -> str:
    """One feature's exclusivity result as a line: the mean, its 95% interval over prompts
    x samples, and "(offline proxy)" for the offline judge."""
    from engine.steering.exclusivity import score_text

    what = "direction" if result.feature_id < 0 else "feature"
    if result.exclusivity is None:
        return (
            f"{what} {result.feature_id} ({result.source.upper()}): steering not "
            f"interpretable ({_fmt(result.interpretability)} < 3), no score"
        )
    score = score_text(result.exclusivity, result.ci_low, result.ci_high, result.judge)
    return (
        f"{what} {result.feature_id} ({result.source.upper()} -> {result.target.upper()}): "
        f"exclusivity {score} over {len(result.per_prompt)} prompt x sample units "
        f"(similarity {result.similarity:.2f}, interpretability "
        f"{_fmt(result.interpretability)})"
    )


def _fmt(value: float | None) -> str:
    """A score or 'n/a'."""
    return "n/a" if value is None else f"{value:.2f}"


def _open_pair(db: Database, run_id: str, stitch: Any, device: str | None):
    """The run's crosscoder, the stitch and both models, loaded for steering."""
    from engine.steering.pair import SteeringPair

    return SteeringPair.open(db, run_id, stitch, **given(device=device))


def exclusivity(
    db: Database,
    run_id: str,
    stitch: Any,
    judge: Any,
    features: Sequence[int],
    cfg: Any,
    *,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> list:
    """Score `features` by whether their steering transfers through the stitch (a path or
    a loaded stitch); features already scored are skipped unless `force`."""
    from engine.progress import ProgressBar
    from engine.steering.exclusivity import exclusivity_run

    pair = _open_pair(db, run_id, stitch, device)
    with ProgressBar("exclusivity", len(features), enabled=progress) as bar:
        return exclusivity_run(
            db, run_id, pair, judge, features, cfg, force=force,
            on_result=lambda r: bar.update(advance=1, status=exclusivity_line(r)),
        )  # fmt: skip


def calibrate(
    db: Database,
    run_id: str,
    stitch: Any,
    judge: Any,
    cfg: Any,
    *,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
):
    """Score the Figure-5 protocol's features per category and random directions (paper
    Figure 5); return the run's calibration rows of this judge."""
    from engine.progress import ProgressBar
    from engine.steering.calibration import pending, run_calibration
    from engine.steering.stitching import Stitch

    stitch = stitch if isinstance(stitch, Stitch) else Stitch.load(stitch)
    todo = len(pending(db, run_id, judge.name, cfg, stitch, force=force))
    if not todo:  # all scored: no need to load the models
        return db.calibration(run_id, protocol=cfg.protocol, judge=judge.name)
    pair = _open_pair(db, run_id, stitch, device)
    with ProgressBar(f"exclusivity {cfg.protocol}", todo, enabled=progress) as bar:
        return run_calibration(
            db, run_id, pair, judge, cfg, force=force,
            on_item=lambda item, r: bar.update(
                advance=1, status=f"{item.category}: {exclusivity_line(r)}"
            ),
        )  # fmt: skip


def calibration_lines(frame: Any) -> list[str]:
    """Per category: items, interpretable ones, mean and 95% interval; then a warning
    if exclusive features do not score above random directions."""
    from engine.steering.calibration import discrimination_warning, summary
    from engine.steering.exclusivity import is_proxy

    proxy = not frame.empty and bool(frame["judge"].map(is_proxy).any())
    lines = []
    for row in summary(frame).to_dict("records"):
        kept = (
            f"mean {row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            if row["kept"]
            else "no interpretable item"
        )
        raw = (
            f"; unfiltered {row['unfiltered_mean']:.2f} [{row['unfiltered_low']:.2f}, "
            f"{row['unfiltered_high']:.2f}]"
            if row["unfiltered_mean"] is not None
            else ""
        )
        lines.append(
            f"{row['label']}: {row['kept']} of {row['items']} interpretable, {kept}{raw}"
            + (" (offline proxy)" if proxy else "")
        )
    warning = discrimination_warning(frame)
    return [*lines, f"warning: {warning}"] if warning else lines


def calibration_figure(frame: Any, path: str | Path, title: str = "") -> None:
    """Write the Figure-5 plot of a calibration (HTML)."""
    from engine.files import atomic_write_text
    from engine.steering.calibration import calibration_figure as figure

    # Written beside and renamed: a reader never sees half a figure, an interrupt no loss.
    atomic_write_text(Path(path), figure(frame, title).to_html())


def effects_config(**options: Any):
    """The judge-free effect measure's settings, defaults kept for options given as None."""
    from engine.steering.effects.measure import EffectsConfig

    return with_options(EffectsConfig(), options)


def effects(
    db: Database,
    run_id: str,
    stitch: Any,
    features: Sequence[int],
    cfg: Any = None,
    *,
    store: str | Path | None = None,
    targets: Sequence[str] = (),
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> list:
    """Measure `features` with the judge-free effect measure against random directions
    (the null is measured once per run, stitch and settings, and stored); features
    already measured with these settings are skipped unless `force`."""
    from engine.progress import ProgressBar
    from engine.steering.effects.run import load_null, measure_features, open_session, pending
    from engine.steering.stitching import Stitch

    stitch = stitch if isinstance(stitch, Stitch) else Stitch.load(stitch)
    cfg = cfg or effects_config()
    if not force and not pending(db, run_id, stitch, features, cfg):
        return []  # all measured: no need to load the models
    pair = _open_pair(db, run_id, stitch, device)
    session = open_session(pair, cfg, store)
    todo = 2 * session.cfg.nulls - load_null(db, run_id, session) + len(features)
    with ProgressBar("effects (null first)", todo, enabled=progress) as bar:
        return measure_features(
            db, run_id, pair, features, session.cfg, targets=targets, force=force,
            session=session, on_item=lambda kind, i: bar.update(advance=1, status=f"{kind} {i}"),
        )  # fmt: skip


def stored_effect_lines(db: Database, run_id: str, features: Sequence[int]) -> list[str]:
    """The newest stored effect measurement of each of `features` that has one, as lines."""
    from engine.steering.effects.reading import effect_line

    frame = db.effects(run_id, kind="feature")
    if frame.empty:
        return []
    frame = frame[frame["settings"] == frame["settings"].iloc[-1]]
    newest = frame.drop_duplicates("item", keep="last").set_index("item")
    return [
        effect_line(int(f), newest.loc[int(f)].to_dict())
        for f in features
        if int(f) in newest.index
    ]


def effects_line(feature_id: int, effect: Any) -> str:
    """One measured feature as a line: exclusivity, z and what it means."""
    from engine.steering.effects.reading import effect_line

    row = {**effect.to_json(), "details": {"null_n": effect.null_n}}
    return effect_line(feature_id, row)


def eval_config(
    rubric: str,
    *,
    alphas: Sequence[float] | None = None,
    prompts: str | None = None,
    limit: int | None = None,
    source: str | None = None,
    models: Sequence[str] | None = None,
    **decoding,
):
    """The steering-evaluation settings for `rubric` with the options set; `decoding` as in
    `generation`."""
    from engine.steering.evaluate import EvalConfig

    base = EvalConfig.for_rubric(rubric)  # the paper's token limit for this rubric
    options = given(
        alphas=_tuple(alphas), prompts=prompts, limit=limit, source=source, models=_tuple(models)
    )
    return replace(base, generation=generation(base.generation, **decoding), **options)


def steer_eval(
    db: Database,
    run_id: str,
    stitch: Any,
    feature: int,
    judge: Any,
    cfg: Any,
    *,
    device: str | None = None,
    progress: bool = False,
):
    """Rate `feature`'s steered answers on `cfg`'s rubric per strength (paper B.5.2-6)."""
    from engine.progress import ProgressBar
    from engine.steering.evaluate import steer_eval as run
    from engine.steering.rubrics import load_prompts, rubric

    rub = rubric(cfg.rubric)
    pair = _open_pair(db, run_id, stitch, device)
    total = len(cfg.models) * len(load_prompts(cfg.prompts or rub.prompt_set)[: cfg.limit])
    with ProgressBar(f"steer-eval {rub.name}", total, enabled=progress) as bar:
        return run(
            db, run_id, pair, feature, judge, cfg,
            on_progress=lambda done, _total: bar.update(completed=done),
        )  # fmt: skip


def eval_figure(result: Any, feature: int, path: str | Path) -> None:
    """Write the Figure-6 plot of a steering evaluation (HTML)."""
    from engine.steering.evaluate import evaluation_figure
    from engine.steering.rubrics import rubric

    rub = rubric(result.rubric)
    from engine.files import atomic_write_text

    figure = evaluation_figure(result.summary, rub.metric, f"feature {feature}: {rub.title}")
    atomic_write_text(Path(path), figure.to_html())  # never half a figure in place
