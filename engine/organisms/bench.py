"""The factorial organism benchmark: the behaviour in A only, in B only, in both, in neither.

Each cell harvests the demo text plus the behaviour's trigger and control prompts (as chats
with the same neutral answer for every model, answer headers paired), trains crosscoders
(the default DFC and the standard one, several seeds) and screens them on held-out prompts
(engine.organisms.screen). The question per cell: does what the analyst browses as "A has,
B lacks" (A-exclusive and A-leaning features, sorted by maximum activation, first page)
hold a feature that separates triggers from controls (AUROC >= 0.9), exactly where the
behaviour is A's alone, and likewise for B?
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.categories import A_EXCLUSIVE, A_LEANING, B_EXCLUSIVE, B_LEANING, LABELS
from engine.config import load_preset
from engine.files import atomic_write_text
from engine.organisms.behaviours import behaviour
from engine.organisms.cells import CELLS
from engine.organisms.screen import Hit, best_per_category, prompt_chats, prompt_codes

# What the analyst browses as one model's own: its exclusive and leaning features.
VIEWS = {"a": (A_EXCLUSIVE, A_LEANING), "b": (B_EXCLUSIVE, B_LEANING)}
FIRST_PAGE = 50  # rows on the features browser's first page (dashboard PAGE_SIZE)
FOUND_AUROC = 0.9


@dataclass
class BenchSettings:
    """How big each cell is."""

    behaviour: str = "copyright-refusal"
    preset: str = "demo"
    max_pairs: int = 30_000
    steps: int = 1_500
    prompts: int = 400  # train-split trigger and control prompts each, in the harvest
    prompt_weight: float = 0.15  # their share of the harvested characters
    screen_prompts: int = 60  # held-out prompts of each kind for the screen
    seeds: tuple[int, ...] = (0, 1, 2)
    architectures: tuple[str, ...] = ("dfc", "standard")
    cells: tuple[str, ...] = tuple(CELLS)
    n_features: int | None = None  # None: the preset's
    overrides: dict[str, Any] = field(default_factory=dict)  # of the train section


def run_cell(cell: str, models: tuple[str, str], out: Path, settings: BenchSettings,
             log: Any = print) -> list[dict[str, Any]]:
    """Harvest, train and screen one cell; one result row per architecture and seed."""
    from engine import stages
    from engine.models.loading import load_model

    chosen = behaviour(settings.behaviour)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    records = prompt_chats(chosen, settings.prompts)
    random.Random(0).shuffle(records)
    atomic_write_text(prompts, "".join(json.dumps(r) + "\n" for r in records))
    base = load_preset(settings.preset)
    demo_sources = list(base.harvest.sources)
    weights = [(1 - settings.prompt_weight) * w for w in (base.harvest.weights or
               [1 / len(demo_sources)] * len(demo_sources))]
    harvest_cfg = replace(
        base.harvest, model_a=models[0], model_b=models[1], max_pairs=settings.max_pairs,
        sources=[*demo_sources, str(prompts)], weights=[*weights, settings.prompt_weight],
        answer_pairs=True,
    )  # fmt: skip
    store = out / "store"
    log(f"[{cell}] harvest -> {store}")
    stages.harvest(harvest_cfg, store, progress=False)
    data = stages.training_data(store=store)
    loaded = (load_model(models[0], dtype="float32"), load_model(models[1], dtype="float32"))
    triggers = chosen.prompts("trigger", "heldout", settings.screen_prompts)
    controls = chosen.prompts("control", "heldout", settings.screen_prompts)
    rows = []
    for arch in settings.architectures:
        for seed in settings.seeds:
            run_dir = out / f"{arch}-{seed}"
            cfg = _run_config(base, arch, seed, settings, data.dims)
            log(f"[{cell}] train {arch} seed {seed} -> {run_dir}")
            stages.train(cfg, data, run_dir, progress=False)
            rows.append(screen_run(cell, arch, seed, run_dir, store, loaded, triggers, controls))
            log(f"[{cell}] {arch} seed {seed}: {format_row(rows[-1])}")
    return rows


def _run_config(base: Any, arch: str, seed: int, settings: BenchSettings, dims: tuple[int, int]):
    """The preset's crosscoder and schedule for one architecture and seed."""
    cc = replace(base.crosscoder, d_a=dims[0], d_b=dims[1], architecture=arch,
                 n_features=settings.n_features or base.crosscoder.n_features)
    if arch == "standard":
        cc = replace(cc, a_exclusive=0, b_exclusive=0)
    train = replace(base.train, steps=settings.steps, seed=seed,
                    checkpoint_every=settings.steps, **settings.overrides)
    return replace(base, crosscoder=cc, train=train)


def screen_run(cell: str, arch: str, seed: int, run_dir: Path, store: Path, loaded: tuple,
               triggers: list[str], controls: list[str]) -> dict[str, Any]:
    """The best feature of each category, and whether each model's view finds the behaviour."""
    from engine.crosscoder.checkpoint import load_crosscoder, trained_on

    crosscoder, normalizer, _ = load_crosscoder(run_dir)
    pair = trained_on(crosscoder)
    layers = (pair.a.layer, pair.b.layer)
    codes = prompt_codes(loaded, layers, crosscoder, normalizer, triggers, controls)
    max_act = store_max_act(crosscoder, normalizer, store)
    hits = best_per_category(codes, crosscoder, max_act)
    row: dict[str, Any] = {"cell": cell, "architecture": arch, "seed": seed,
                           "hits": {c: asdict(h) for c, h in hits.items()}}
    for model, view in VIEWS.items():
        row[f"found_{model}"] = first_page_hit(codes, crosscoder, max_act, view, hits)
    return row


def first_page_hit(codes, crosscoder, max_act: np.ndarray, view: tuple[str, ...],
                   hits: dict[str, Hit]) -> dict[str, Any] | None:
    """The best-separating feature on the first page of one model's view (its exclusive and
    leaning features by maximum activation), if it reaches FOUND_AUROC."""
    from engine.categories import category
    from engine.organisms.screen import auroc

    rel = crosscoder.relative_decoder_norm().cpu().numpy()
    cats = np.asarray([category(p, r) for p, r in
                       zip(crosscoder.partition.roles(), rel, strict=True)])
    members = np.flatnonzero(np.isin(cats, view))
    page = members[np.argsort(-max_act[members], kind="stable")][:FIRST_PAGE]
    if not len(page):
        return None
    best = np.maximum(auroc(codes.answer[:, page], codes.is_trigger),
                      auroc(codes.request[:, page], codes.is_trigger))
    top = int(np.argmax(best))
    return {"feature": int(page[top]), "auroc": float(best[top]), "rank": top + 1,
            "category": str(cats[page[top]]), "found": bool(best[top] >= FOUND_AUROC)}


@torch.no_grad()
def store_max_act(crosscoder, normalizer, store: Path, max_rows: int = 200_000) -> np.ndarray:
    """Each feature's largest activation over the store (the browser's default order)."""
    from engine.activations import ActivationStore

    acts = ActivationStore(store)
    best = torch.zeros(crosscoder.partition.n_features)
    seen = 0
    for i in range(len(acts.shards)):
        shard = acts.load_shard(i, ("a", "b"))
        for lo in range(0, shard["a"].shape[0], 4096):
            x_a = shard["a"][lo : lo + 4096].float()
            x_b = shard["b"][lo : lo + 4096].float()
            f = crosscoder.encode(*normalizer.apply(x_a, x_b))
            best = torch.maximum(best, f.max(dim=0).values.cpu())
            seen += x_a.shape[0]
            if seen >= max_rows:
                return best.numpy()
    return best.numpy()


def format_row(row: dict[str, Any]) -> str:
    """One line: each view's first-page best AUROC and the best per category."""
    parts = []
    for model in VIEWS:
        hit = row[f"found_{model}"]
        shown = f"{hit['auroc']:.3f}" if hit else "-"
        parts.append(f"{model.upper()}-view {shown}")
    for cat, hit in row["hits"].items():
        parts.append(f"{LABELS[cat]} {hit['auroc']:.3f} (#{hit['feature']}, {hit['position']}, "
                     f"rel {hit['rel_norm']:.2f}, rank {hit['rank']}/{hit['n_in_category']})")
    return "; ".join(parts)


def run_bench(out: Path, settings: BenchSettings, bases: tuple[str, str] = ("smollm2", "gemma3"),
              log: Any = print) -> list[dict[str, Any]]:
    """Every cell of `settings`, with the organisms each needs (built once, cached); the rows
    are also written to `out/results.json`, finished cells are not run again."""
    from engine.organisms.build import build_organism

    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {row["cell"] for row in rows}
    for cell in settings.cells:
        if cell in done:
            continue
        models = tuple(
            build_organism(base, settings.behaviour, log=log).spec if implanted else base
            for base, implanted in zip(bases, CELLS[cell], strict=True)
        )
        slug = cell.replace(" ", "-")
        new = run_cell(cell, models, out / slug, settings, log)  # type: ignore[arg-type]
        # Read again: another process may have finished another cell into the same folder.
        kept = json.loads(results_file.read_text()) if results_file.is_file() else []
        rows = [r for r in kept if r["cell"] != cell] + new
        atomic_write_text(results_file, json.dumps(rows, indent=1))
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per cell and architecture, each view's first-page AUROC over seeds."""
    lines = ["| cell | architecture | A's view: best AUROC on page 1 (seeds) | "
             "B's view: best AUROC on page 1 (seeds) |", "| --- | --- | --- | --- |"]
    keys = sorted({(r["cell"], r["architecture"]) for r in rows},
                  key=lambda k: (list(CELLS).index(k[0]), k[1]))
    for cell, arch in keys:
        mine = [r for r in rows if r["cell"] == cell and r["architecture"] == arch]
        views = []
        for model in VIEWS:
            hits = [r[f"found_{model}"] for r in mine]
            views.append(", ".join(f"{h['auroc']:.2f}" if h else "-" for h in hits))
        lines.append(f"| {cell} | {arch} | {views[0]} | {views[1]} |")
    return "\n".join(lines)


def steer_found(
    cell_dir: Path,
    run: str,
    feature: int,
    behaviour_name: str,
    models: tuple[str, str],
    n_prompts: int = 20,
    strengths: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0),
    log: Any = print,
    positions: str = "all",
    n_random: int = 0,
) -> dict[str, Any]:
    """Steer both models with one feature of a cell's run: A with its A decoder, B with that
    vector translated through a stitch fitted on the cell's store; marker rates on held-out
    control prompts at each strength (multiples of the feature's largest activation).

    With `n_random`, each model is also steered with that many random directions of the
    same norm at the same strengths, and `p` gives, per strength, the share of them whose
    marker rate reaches the feature's."""
    from engine import stages
    from engine.crosscoder.checkpoint import load_crosscoder, trained_on
    from engine.models.loading import load_model
    from engine.organisms.steer_check import marker_rates, random_marker_rates, share_at_least
    from engine.steering.steer import feature_vector
    from engine.steering.stitching import Stitch

    chosen = behaviour(behaviour_name)
    crosscoder, normalizer, _ = load_crosscoder(cell_dir / run)
    pair = trained_on(crosscoder)
    stitch_file = cell_dir / "stitch.safetensors"
    stitch = Stitch.load(stitch_file) if stitch_file.is_file() else \
        stages.fit_stitch(cell_dir / "store", stitch_file)[0]
    scale = float(store_max_act(crosscoder, normalizer, cell_dir / "store")[feature])
    vector_a = feature_vector(crosscoder, normalizer, feature, "a")
    vectors = {"a": vector_a, "b": stitch.map(vector_a, "a")}
    prompts = chosen.prompts("control", "heldout", n_prompts)
    out: dict[str, Any] = {
        "feature": feature, "scale": scale, "strengths": list(strengths), "positions": positions
    }
    for key, spec in zip(("a", "b"), models, strict=True):
        loaded = load_model(spec, dtype="float32")
        rates = marker_rates(loaded, pair[key].layer, vectors[key], scale, chosen, prompts,
                             strengths, positions=positions)
        out[key] = {"rates": list(rates.rates), "examples": list(rates.examples)}
        log(f"steer {key.upper()} with feature {feature}: marker rates {rates.rates}")
        if n_random:
            null = random_marker_rates(
                loaded, pair[key].layer, float(vectors[key].norm()), scale, chosen, prompts,
                strengths, n_random, positions=positions,
            )  # fmt: skip
            out[key].update(random=[list(r) for r in null], p=share_at_least(rates.rates, null))
            log(f"  {n_random} random directions: share at least as high {out[key]['p']}")
    return out
