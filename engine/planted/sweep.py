"""The planted-concept sweep: planted model x strength x rate x seed x crosscoder variant.

Each (model, strength, rate, seed) is one planting; every variant trains a crosscoder on it
and `evaluate_planted` scores it. Rows go to ``results.csv`` after every run (a rerun skips
the rows it holds, so an interrupted sweep resumes), then ``results.json``,
``summary.csv`` and ``figure.html`` (where each variant puts the concept, by strength).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from engine.activations import ActivationStore
from engine.config import CrosscoderConfig, TrainConfig, preset_names
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.files import atomic_write_text
from engine.planted import KINDS, PlantedError
from engine.planted.evaluate import evaluate_planted
from engine.planted.pairs import (
    PlantedPairs,
    check_model,
    load_store_pairs,
    open_store,
    residual_plant,
)
from engine.planted.triggers import DEFAULT_RANKS, choose_triggers, pair_tokens, trigger_labels
from engine.planted.variants import (
    DEFAULT_VARIANTS,
    KNOWN_VARIANTS,
    Variant,
    base_configs,
    check_variant,
    split_overrides,
    variant_configs,
)
from engine.sweep_results import append_row, json_records, load_results, write_csv

KEYS = ["kind", "into", "strength", "rate", "seed", "variant"]
# Residual strengths are in units of the model's median activation norm, embedding
# strengths in units of its median embedding-row norm.
DEFAULT_STRENGTHS = {
    "residual": [0.05, 0.1, 0.2, 0.4, 0.8],
    "token": [0.05, 0.1, 0.2, 0.4, 0.8],
    "embedding": [0.25, 0.5, 1, 2, 4],
}
OUTCOME_COLOURS = {
    "right partition": "#2ca02c",
    "wrong partition": "#ff7f0e",
    "not learned": "#999999",
}
# Settings that only select which runs to do; the others must match the results on disk.
_SELECTION_FIELDS = {
    "into", "strengths", "rates", "seeds", "variants", "out_dir", "device", "keep_models",
    "keep_runs",
}  # fmt: skip

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class PlantedConfig:
    """What to plant, which crosscoders to train on it, and where the results go."""

    store: str
    out_dir: str = "runs/planted"
    kind: str = "residual"
    into: list[str] = field(default_factory=lambda: ["a", "b"])
    strengths: list[float] | None = None  # None: DEFAULT_STRENGTHS of the kind
    rates: list[float] = field(default_factory=lambda: [0.03])
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: dict[str, Variant] = field(
        default_factory=lambda: {n: KNOWN_VARIANTS[n] for n in DEFAULT_VARIANTS}
    )
    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # every variant, KEY -> VALUE
    steps: int | None = None  # None: the preset's
    batch_size: int | None = None
    device: str | None = None
    max_pairs: int | None = None  # pairs used (residual) or harvested (embedding)
    holdout: float = 0.0  # share of pairs (the last ones) kept out of training, evaluated on
    threshold: float = 0.8  # F1 at which the concept counts as learned
    low: float = 0.2  # relative-norm labels of features without a partition
    high: float = 0.8
    ranks: tuple[int, int] = DEFAULT_RANKS  # trigger tokens' frequency ranks (embedding)
    keep_models: bool = False  # keep planted models (GBs each for real models)
    keep_runs: bool = False  # keep each crosscoder's run directory

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlantedError(f"unknown kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if self.strengths is None:
            self.strengths = list(DEFAULT_STRENGTHS[self.kind])
        self.into = [check_model(m) for m in dict.fromkeys(self.into)]
        _check_list("into", self.into, lambda v: True, "a or b")
        _check_list("strengths", self.strengths, lambda v: 0 <= v < math.inf, "numbers >= 0")
        _check_list("rates", self.rates, lambda v: 0 < v < 1, "fractions in (0, 1)")
        _check_list("seeds", self.seeds, lambda v: isinstance(v, int) and v >= 0, "integers >= 0")
        if not self.variants:
            raise PlantedError("no variants to train; name at least one (e.g. standard dfc)")
        self.variants = {n: check_variant(n, v) for n, v in self.variants.items()}
        split_overrides(self.overrides)  # refuse unknown keys now, not after a harvest
        if self.preset not in preset_names():
            raise PlantedError(
                f"unknown preset {self.preset!r}; choose one of: {', '.join(preset_names())}"
            )
        for name in ("steps", "batch_size", "max_pairs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PlantedError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.holdout < 1:
            raise PlantedError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        if not (0 < self.threshold <= 1 and 0 <= self.low < self.high <= 1):
            raise PlantedError("need 0 < threshold <= 1 and 0 <= low < high <= 1")
        if not 0 <= self.ranks[0] < self.ranks[1]:
            raise PlantedError(f"ranks must be (lo, hi) with 0 <= lo < hi, got {self.ranks}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


def _check_list(name: str, values: list, ok: Callable[[Any], bool], what: str) -> None:
    """Refuse an empty list or one with a bad value."""
    bad = [v for v in values if not ok(v)]
    if not values or bad:
        raise PlantedError(f"{name} must be {what}, got {bad or values}")


# -- running ----------------------------------------------------------------------------


def run_configs(
    cfg: PlantedConfig, dims: tuple[int, int], variant: str, seed: int
) -> tuple[CrosscoderConfig, TrainConfig]:
    """Configs of one run: preset, then steps/batch, common overrides, seed, the variant."""
    base = base_configs(cfg.preset, dims, cfg.steps, cfg.batch_size)
    run: dict[str, Any] = {"seed": seed}
    if cfg.device is not None:
        run["device"] = cfg.device
    return variant_configs(base, split_overrides(cfg.overrides), ({}, run), cfg.variants[variant])


def check_runs(cfg: PlantedConfig, dims: tuple[int, int]) -> None:
    """Build every variant's configs now, so a bad value fails before any work is done."""
    for variant in cfg.variants:
        try:
            run_configs(cfg, dims, variant, cfg.seeds[0])
        except ConfigError as err:
            raise PlantedError(f"variant {variant!r}: {err}") from None


def train_and_evaluate(
    cfg: PlantedConfig,
    pairs: PlantedPairs,
    eval_rows: torch.Tensor,
    shift: torch.Tensor,
    into: str,
    seed: int,
    variant: str,
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train variant `variant` on the planted pairs and return its report."""
    from engine.crosscoder.training import train

    dims = (pairs.x_a.shape[1], pairs.x_b.shape[1])
    cc_cfg, train_cfg = run_configs(cfg, dims, variant, seed)
    # Fitted on every pair rather than the trainer's first batches.
    normalizer = Normalizer.from_median_norms(*pairs.median_norms(), *dims)
    result = train(
        cc_cfg, train_cfg, pairs, out_dir=run_dir, normalizer=normalizer, progress=progress
    )
    report = evaluate_planted(
        result.crosscoder, result.normalizer, pairs, eval_rows, into, shift, result.final,
        cfg.threshold, cfg.low, cfg.high,
    )  # fmt: skip
    return {"architecture": cc_cfg.architecture, "steps": train_cfg.steps, **report}


def planted_pairs(
    cfg: PlantedConfig,
    store: ActivationStore,
    into: str,
    strength: float,
    rate: float,
    seed: int,
    clean: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[PlantedPairs, torch.Tensor]:
    """The pairs of one planting (training source with labels) and its shift in raw units.

    `clean` (the store's activations, for the residual kind) saves reading them again.
    """
    if cfg.kind in ("residual", "token"):
        x_a, x_b = clean if clean is not None else load_store_pairs(store, cfg.max_pairs)
        mask = None
        if cfg.kind == "token":  # the pairs where the planted model reads a trigger token
            tokens = pair_tokens(store, into, len(x_a))
            mask = trigger_labels(tokens, choose_triggers(tokens, rate, seed, tuple(cfg.ranks)))
        plant = residual_plant(x_a if into == "a" else x_b, into, strength, rate, seed, mask)
        return _with_holdout(cfg, x_a, x_b, plant.mask, plant, store.manifest), plant.vector
    from engine.planted.embedding import prepare_embedding_plant

    folder = Path(cfg.out_dir) / "planted" / f"{into}-s{strength:g}-r{rate:g}-seed{seed}"
    plant = prepare_embedding_plant(
        cfg.store, folder, into, strength, rate, seed, cfg.max_pairs, tuple(cfg.ranks),
        cfg.keep_models, progress,
    )  # fmt: skip
    planted = ActivationStore(plant.store)
    x_a, x_b = load_store_pairs(planted)
    labels = trigger_labels(pair_tokens(planted, into), plant.triggers)
    return _with_holdout(cfg, x_a, x_b, labels, None, planted.manifest), plant.shift


def _with_holdout(cfg: PlantedConfig, x_a, x_b, labels, plant, manifest) -> PlantedPairs:
    """PlantedPairs training on all but the last `holdout` share of the pairs."""
    n_train = len(labels) - round(cfg.holdout * len(labels))
    return PlantedPairs(x_a, x_b, labels, plant, torch.arange(n_train), manifest)


def eval_rows(cfg: PlantedConfig, pairs: PlantedPairs) -> torch.Tensor:
    """Global indices evaluated: the held-out pairs, or every pair without a holdout."""
    n, n_train = len(pairs), len(pairs.train_rows)
    return torch.arange(n_train if n_train < n else 0, n)


def run_planted(cfg: PlantedConfig, progress: bool = True, log: Log = _stderr) -> pd.DataFrame:
    """Run every missing (model, strength, rate, seed, variant) and write all outputs."""
    out = Path(cfg.out_dir)
    store = open_store(cfg.store)
    check_runs(cfg, (store.d_a, store.d_b))
    out.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, cfg)
    results = load_results(out, KEYS)
    done = {_key(r) for r in results[KEYS].itertuples(index=False)} if len(results) else set()
    todo: dict[tuple, list[str]] = {}
    for seed in cfg.seeds:
        for into in cfg.into:
            for rate in cfg.rates:
                for strength in cfg.strengths or []:
                    group = (into, float(strength), float(rate), seed)
                    names = [v for v in cfg.variants if _key((cfg.kind, *group, v)) not in done]
                    if names:
                        todo[group] = names
    total = sum(len(v) for v in todo.values())
    if total:
        log(f"planted ({cfg.kind}): {total} runs to do in {out}")
    clean = load_store_pairs(store, cfg.max_pairs) if todo and cfg.kind != "embedding" else None
    count = 0
    for (into, strength, rate, seed), names in todo.items():
        pairs, shift = planted_pairs(cfg, store, into, strength, rate, seed, clean, progress)
        rows = eval_rows(cfg, pairs)
        for variant in names:
            count += 1
            start = time.perf_counter()
            key = {"kind": cfg.kind, "into": into, "strength": strength, "rate": rate}
            key.update(seed=seed, variant=variant)
            run_dir = out / "runs" / _run_name(key) if cfg.keep_runs else None
            row = {**key, **train_and_evaluate(
                cfg, pairs, rows, shift, into, seed, variant, run_dir, progress
            )}  # fmt: skip
            row["seconds"] = time.perf_counter() - start
            results = append_row(results, row)
            # Written after every run so an interruption loses at most the current one.
            write_csv(results, out / "results.csv")
            log(f"[{count}/{total}] {describe(row)}")
    # Read back, so fresh and resumed sweeps return the same column types.
    selected = _select(load_results(out, KEYS), cfg)
    write_outputs(selected, cfg, out)
    return selected


def describe(row: dict[str, Any]) -> str:
    """One line about a finished run."""
    right = row.get("right_f1")
    right_text = "n/a" if right is None or _isnan(right) else f"{right:.2f}"
    verdict = "right partition" if row["correct"] else (
        "wrong partition" if row["learned"] else "not learned"
    )  # fmt: skip
    return (
        f"{row['variant']} into {row['into'].upper()} strength {row['strength']:g} rate "
        f"{row['rate']:g} seed {row['seed']}: best F1 {row['best_f1']:.2f} "
        f"({row['best_role']}, rel. norm {row['best_rel_norm']:.2f}), best F1 labelled "
        f"{row['into'].upper()} {right_text} -> {verdict} ({row['seconds']:.0f} s)"
    )


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _key(values) -> tuple:
    """A run's identity, with numbers normalised so CSV round trips compare equal."""
    kind, into, strength, rate, seed, variant = values
    return (str(kind), str(into), float(strength), float(rate), int(seed), str(variant))


def _run_name(key: dict[str, Any]) -> str:
    return f"{key['variant']}-{key['into']}-s{key['strength']:g}-r{key['rate']:g}-seed{key['seed']}"


def _select(results: pd.DataFrame, cfg: PlantedConfig) -> pd.DataFrame:
    """Rows of the runs this configuration asks for, in a stable order."""
    if not len(results):
        return results
    mask = (
        (results["kind"] == cfg.kind)
        & results["into"].isin(cfg.into)
        & results["strength"].isin([float(s) for s in cfg.strengths or []])
        & results["rate"].isin([float(r) for r in cfg.rates])
        & results["seed"].isin(cfg.seeds)
        & results["variant"].isin(list(cfg.variants))
    )
    return results[mask].sort_values(KEYS).reset_index(drop=True)


def _check_same_sweep(out: Path, cfg: PlantedConfig) -> None:
    """Refuse to mix results made with other settings, or another variant under a name."""
    path = out / "sweep_config.json"
    current = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_FIELDS}
    current["store"] = str(Path(cfg.store).resolve())
    current = json.loads(json.dumps(current))  # tuples as lists, as read back
    variants = json.loads(json.dumps(cfg.variants))
    if path.exists():
        saved = json.loads(path.read_text())
        known = saved.pop("variants", {})
        diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        diffs += [f"variant {n!r}" for n in variants if n in known and known[n] != variants[n]]
        if diffs:
            raise PlantedError(
                f"{out} holds a planted sweep made with different settings ({', '.join(diffs)});"
                " use another --out directory or delete it to start over"
            )
        variants = {**known, **variants}
    atomic_write_text(path, json.dumps({**current, "variants": variants}, indent=2))


# -- outputs ----------------------------------------------------------------------------

GROUP = ["variant", "into", "strength", "rate"]
_MEANS = ["best_f1", "right_f1", "best_rel_norm", "best_cosine", "fve_a", "fve_b"]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per variant, model, strength and rate: runs, how many learned / right, mean scores."""
    frame = results.copy()
    for name in ("learned", "correct"):
        frame[name] = frame[name].astype(str).str.lower() == "true"
    grouped = frame.groupby(GROUP, sort=True)
    summary = grouped[_MEANS].mean()
    summary["runs"] = grouped.size()
    summary["learned"] = grouped["learned"].sum()
    summary["correct"] = grouped["correct"].sum()
    summary["best_label"] = grouped["best_label"].agg(lambda s: s.mode().iloc[0])
    dead = [c for c in ("dead_frac_a_exclusive", "dead_frac_b_exclusive") if c in frame]
    for column in dead:
        summary[column] = grouped[column].mean()
    return summary.reset_index()


def format_table(summary: pd.DataFrame) -> str:
    """Compact plain-text table of the summary."""
    header = (
        f"{'variant':<12}{'into':<5}{'strength':>9}{'rate':>7}{'runs':>5}  {'best F1':>7}  "
        f"{'label':<6}{'rel':>5}{'cos':>6}  {'F1 right':>8}  {'right':>5}  {'FVE A':>6}"
        f"{'FVE B':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in summary.to_dict(orient="records"):
        lines.append(
            f"{r['variant']:<12}{r['into'].upper():<5}{r['strength']:>9g}{r['rate']:>7g}"
            f"{r['runs']:>5}  {_num(r['best_f1'], 7)}  {r['best_label']:<6}"
            f"{_num(r['best_rel_norm'], 5, 2)}{_num(r['best_cosine'], 6, 2)}  "
            f"{_num(r['right_f1'], 8)}  {int(r['correct']):>2}/{int(r['runs']):<2}  "
            f"{_num(r['fve_a'], 6)}{_num(r['fve_b'], 7)}"
        )
    return "\n".join(lines)


def _num(value: Any, width: int, digits: int = 3) -> str:
    if value is None or _isnan(value):
        return "–".rjust(width)
    return f"{value:.{digits}f}".rjust(width)


def write_outputs(results: pd.DataFrame, cfg: PlantedConfig, out: Path) -> None:
    """Write results.json, summary.csv and figure.html for the selected runs."""
    if not len(results):
        return
    summary = summarize(results)
    write_csv(summary, out / "summary.csv")
    payload = {
        "config": cfg.to_dict(),
        "results": json_records(results),
        "summary": json_records(summary),
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    figure(results, cfg).write_html(out / "figure.html", include_plotlyjs=True)


def outcome(row: dict[str, Any]) -> str:
    """'right partition', 'wrong partition' (learned elsewhere) or 'not learned'."""
    if str(row["correct"]).lower() == "true":
        return "right partition"
    return "wrong partition" if str(row["learned"]).lower() == "true" else "not learned"


def figure(results: pd.DataFrame, cfg: PlantedConfig):
    """Plotly grid (planted model x variant): best F1 against strength, coloured by where
    the concept landed; a dashed line is the best F1 among features labelled right."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    variants = [v for v in cfg.variants if v in set(results["variant"])]
    intos = [m for m in cfg.into if m in set(results["into"])]
    fig = make_subplots(
        rows=len(intos),
        cols=len(variants),
        subplot_titles=[f"{v}: planted into {m.upper()}" for m in intos for v in variants],
        shared_yaxes=True,
    )
    shown: set[str] = set()
    for r, into in enumerate(intos, start=1):
        for c, variant in enumerate(variants, start=1):
            part = results[(results["into"] == into) & (results["variant"] == variant)]
            _add_runs(fig, part, r, c, shown, go)
            _add_right_line(fig, part, r, c, shown, go)
    fig.update_xaxes(type="log", title_text="strength")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="best feature F1", col=1)
    fig.update_layout(
        title=f"Planted concept ({cfg.kind}): where each crosscoder puts it",
        template="plotly_white",
    )
    return fig


def _add_runs(fig: Any, part: pd.DataFrame, row: int, col: int, shown: set[str], go) -> None:
    """One marker per run, coloured by outcome, with the details on hover."""
    rows = part.to_dict(orient="records")
    for name, colour in OUTCOME_COLOURS.items():
        mine = [r for r in rows if outcome(r) == name]
        if not mine:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r["strength"] for r in mine],
                y=[r["best_f1"] for r in mine],
                mode="markers",
                marker={"color": colour, "size": 10, "line": {"width": 1, "color": "#333"}},
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                text=[_hover(r) for r in mine],
                hoverinfo="text",
            ),
            row=row,
            col=col,
        )
        shown.add(name)


def _add_right_line(fig: Any, part: pd.DataFrame, row: int, col: int, shown: set[str], go):
    """Mean best F1 among features labelled with the planted model, per strength."""
    if part["right_f1"].isna().all():
        return
    mean = part.groupby("strength")["right_f1"].mean().sort_index()
    name = "best F1 labelled with the planted model (mean)"
    fig.add_trace(
        go.Scatter(
            x=mean.index.tolist(),
            y=mean.tolist(),
            mode="lines",
            line={"dash": "dash", "color": "#2ca02c"},
            name=name,
            legendgroup=name,
            showlegend=name not in shown,
        ),
        row=row,
        col=col,
    )
    shown.add(name)


def _hover(r: dict[str, Any]) -> str:
    """Hover text of one run."""
    f = {k: _num(r.get(k), 0).strip() for k in ("best_f1", "best_cosine", "fve_a", "fve_b")}
    return (
        f"seed {r['seed']}, rate {r['rate']:g}<br>best F1 {f['best_f1']} "
        f"(P {r['best_precision']:.2f}, R {r['best_recall']:.2f})<br>{r['best_role']}, "
        f"rel. norm {r['best_rel_norm']:.2f}, cos {f['best_cosine']}<br>"
        f"FVE A {f['fve_a']}, B {f['fve_b']}"
    )
