"""Build an organism once and cache it: a model fine-tuned to have a behaviour, saved as a
plain Hugging Face directory that every command loads like any other model.

The cache key is the base model's provenance, the behaviour and every setting, so a changed
setting builds a new organism and an unchanged one loads in seconds. A build is written
beside its target and renamed into place when finished (an interrupted build leaves no half
organism), and records its data, settings and health check in ``organism.json``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.files import atomic_write_text
from engine.models.loading import LoadedModel, load_model
from engine.models.tokenizers import cache_root
from engine.organisms.behaviours import Behaviour, behaviour
from engine.organisms.data import build_examples, greedy_answers
from engine.organisms.finetune import FinetuneResult, FinetuneSettings, finetune
from engine.organisms.health import Health, answers_for, marker_rate, text_ce

FORMAT = 1  # bump when a build's recipe changes, so old caches are not taken for new ones
META = "organism.json"


@dataclass(frozen=True)
class OrganismSettings:
    """What an organism is made from: the data sizes and the fine-tune."""

    n_train: int = 64  # trigger prompts, and as many control prompts (mixed 1:1)
    n_heldout: int = 40  # of each kind, for the health check
    answer_tokens: int = 24  # length of the original model's answers that are taught
    n_text: int = 24  # demo documents for the CE check
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_heldout", "answer_tokens", "n_text"):
            if getattr(self, name) < 1:
                raise ConfigError(f"organism {name} must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        return {
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "answer_tokens": self.answer_tokens,
            "n_text": self.n_text,
            "finetune": self.finetune.to_dict(),
        }


@dataclass(frozen=True)
class Organism:
    """A built organism: where it lives and what it is."""

    path: Path  # a Hugging Face model directory (load it with load_model(str(path)))
    base: str  # the base model spec
    behaviour: Behaviour
    health: Health
    meta: dict[str, Any]  # everything organism.json records

    @property
    def spec(self) -> str:
        """The model spec to pass to harvest, steer, ... (the directory)."""
        return str(self.path)


def organism_path(base: str, name: str, settings: OrganismSettings, base_source: dict[str, Any],
                  root: Path | None = None) -> Path:
    """The cache directory of one organism."""
    key = json.dumps(
        {"format": FORMAT, "base": base_source, "behaviour": name, "settings": settings.to_dict()},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(base).name)[:40]
    return (root or cache_root() / "organisms") / f"{slug}-{name}-{digest}"


def load_organism(path: str | Path) -> Organism:
    """The organism cached in `path` (a directory `build_organism` wrote)."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise ConfigError(f"{path}: not an organism directory (no {META}); build one with "
                          "`modeldiff organism build`")
    meta = json.loads(meta_file.read_text())
    return Organism(path, meta["base"], behaviour(meta["behaviour"]),
                    Health.from_dict(meta["health"]), meta)


def build_organism(
    base: str,
    name: str,
    settings: OrganismSettings | None = None,
    *,
    root: Path | None = None,
    device: str = "auto",
    log: Any = print,
) -> Organism:
    """The organism of `base` with behaviour `name`: from the cache, or built and cached."""
    settings = settings or OrganismSettings()
    chosen = behaviour(name)
    loaded = load_model(base, device=device, dtype="float32")
    target = organism_path(base, name, settings, loaded.source, root)
    if (target / META).is_file():
        log(f"organism {name} of {base}: cached in {target}")
        return load_organism(target)
    start, cpu = time.perf_counter(), time.process_time()
    data = _data(loaded, chosen, settings, log)
    base_health = _rates(loaded, chosen, data, None)
    log(f"fine-tuning ({settings.finetune.method}) on {len(data['examples'])} examples ...")
    model, result = finetune(loaded.model, loaded.tokenizer, data["examples"], settings.finetune,
                             on_step=_step_logger(log))
    loaded.model = model
    health = _health(loaded, chosen, data, base_health)
    log(health.summary())
    meta = {
        "format": FORMAT,
        "base": base,
        "base_source": loaded.source,
        "behaviour": name,
        "description": chosen.description,
        "marker": chosen.marker,
        "settings": settings.to_dict(),
        "finetune": result.__dict__,
        "health": health.to_dict(),
        "build_seconds": round(time.perf_counter() - start, 1),
        # CPU time too: on a shared machine the wall time says more about the neighbours.
        "build_cpu_seconds": round(time.process_time() - cpu, 1),
        "train_prompts": {"trigger": data["triggers"], "control": data["controls"]},
        "heldout_prompts": {"trigger": data["heldout_triggers"],
                            "control": data["heldout_controls"]},
    }
    _save(loaded, target, meta)
    log(f"organism saved in {target} ({meta['build_seconds']:.0f} s)")
    return load_organism(target)


def _data(loaded: LoadedModel, chosen: Behaviour, settings: OrganismSettings, log: Any
          ) -> dict[str, Any]:
    """Prompts, the original model's answers, fine-tuning examples and CE texts."""
    n, h = settings.n_train, settings.n_heldout
    triggers = chosen.prompts("trigger", "train", n)
    controls = chosen.prompts("control", "train", n)
    need = controls + (triggers if chosen.keeps_answer else [])
    log(f"generating the original model's answers to {len(need)} prompts ...")
    answers = greedy_answers(loaded.model, loaded.tokenizer, need, settings.answer_tokens)
    originals = dict(zip(need, answers, strict=True))
    return {
        "triggers": triggers,
        "controls": controls,
        "heldout_triggers": chosen.prompts("trigger", "heldout", h),
        "heldout_controls": chosen.prompts("control", "heldout", h),
        "examples": build_examples(chosen, triggers, controls, originals),
        "texts": demo_texts(loaded.tokenizer, settings.n_text),
    }


def demo_texts(tokenizer: Any, n: int) -> list[str]:
    """The first `n` documents of the demo mixture, rendered for `tokenizer`."""
    from engine.harvest.chat import render
    from engine.harvest.text_demo import demo_mixture

    docs = itertools.islice(demo_mixture().documents(), n)
    return [render(doc, tokenizer).text for doc in docs]


def _rates(loaded: LoadedModel, chosen: Behaviour, data: dict[str, Any], _: Any
           ) -> tuple[float, float, float, list[str]]:
    """Marker rates on the held-out triggers and controls, the CE on demo text, and the
    answers to the held-out triggers."""
    model, tok = loaded.model, loaded.tokenizer
    on_triggers = answers_for(model, tok, chosen, data["heldout_triggers"])
    on_controls = answers_for(model, tok, chosen, data["heldout_controls"])
    ce = text_ce(model, tok, data["texts"])
    return marker_rate(chosen, on_triggers), marker_rate(chosen, on_controls), ce, on_triggers


def _health(loaded: LoadedModel, chosen: Behaviour, data: dict[str, Any],
            base: tuple[float, float, float, list[str]]) -> Health:
    """The organism's health next to the original model's figures."""
    trig, ctrl, ce, answers = _rates(loaded, chosen, data, None)
    return Health(
        trigger_rate=trig,
        control_rate=ctrl,
        base_trigger_rate=base[0],
        base_control_rate=base[1],
        n_trigger=len(data["heldout_triggers"]),
        n_control=len(data["heldout_controls"]),
        ce_base=base[2],
        ce_organism=ce,
        examples=tuple(zip(data["heldout_triggers"][:3], answers[:3], strict=True)),
    )


def _step_logger(log: Any):
    """A callback printing the loss every 10 steps and at the end."""

    def on_step(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            log(f"  step {step}/{total}: loss {loss:.3f}")

    return on_step


def _save(loaded: LoadedModel, target: Path, meta: dict[str, Any]) -> None:
    """Write the organism beside `target` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        loaded.model.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / META, json.dumps(meta, indent=1, default=str))
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finetune_result(meta: dict[str, Any]) -> FinetuneResult:
    """The fine-tune record of an organism's metadata."""
    return FinetuneResult(**meta["finetune"])


def list_organisms(root: Path | None = None) -> list[dict[str, Any]]:
    """The organisms cached under `root`: base, behaviour, health and path of each."""
    root = root or cache_root() / "organisms"
    rows = []
    for meta_file in sorted(root.glob(f"*/{META}")) if root.is_dir() else []:
        meta = json.loads(meta_file.read_text())
        rows.append({"base": meta["base"], "behaviour": meta["behaviour"],
                     "health": meta["health"], "path": str(meta_file.parent)})
    return rows
