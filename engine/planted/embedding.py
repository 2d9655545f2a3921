"""The embedding planting: a direction added to the input embeddings of trigger tokens.

`prepare_embedding_plant` does the whole job for one (model, strength, rate, seed): choose
triggers from the clean store, plant them into a copy of the model, save it as a Hugging
Face directory, measure the shift it causes at the captured layer, and harvest the pair
again with the planted model in its slot. Each step is skipped when its output exists, so
an interrupted sweep resumes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.activations import ActivationStore, read_manifest
from engine.config import HarvestConfig
from engine.files import atomic_save_tensors, atomic_write_text
from engine.models.capture import capture_residual
from engine.models.loading import LoadedModel, load_model
from engine.planted import PlantedError
from engine.planted.pairs import check_model, random_direction
from engine.planted.triggers import DEFAULT_RANKS, choose_triggers, pair_tokens

PLANT_FILE = "plant.json"
SHIFT_FILE = "shift.safetensors"


@dataclass(frozen=True)
class EmbeddingPlant:
    """A planted model's harvest: where it is, its triggers and the shift they cause."""

    model: str  # "a" or "b": the planted slot
    store: Path  # the planted pair's activation store
    model_dir: Path  # the planted model (removed after harvesting unless kept)
    triggers: torch.Tensor  # int64 trigger token ids
    shift: torch.Tensor  # [d] mean planted - clean activation on trigger positions
    info: dict[str, Any]


def untie_lm_head(model: nn.Module) -> bool:
    """Give the LM head its own copy of tied input embeddings; True if they were tied."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    # Saved untied and loaded untied, so the planting never reaches the output layer.
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def plant_embeddings(
    model: nn.Module, token_ids: torch.Tensor, direction: torch.Tensor, strength: float
) -> torch.Tensor:
    """Add strength x median row norm x `direction` to the trigger rows; returns that vector."""
    untie_lm_head(model)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        scale = weight.float().norm(dim=1).median()
        vector = (strength * scale * direction.float()).to(weight.dtype)
        weight[token_ids.to(weight.device)] += vector.to(weight.device)
    return vector.cpu()


def store_model_spec(manifest: dict[str, Any], model: str) -> str:
    """How to load a store's model `model` again: a path for directories and GGUF files,
    else the demo name or hub id."""
    entry = manifest["models"][check_model(model)]
    source = entry.get("source") or {}
    if source.get("kind") in ("dir", "gguf") and source.get("path"):
        return str(source["path"])
    return str(source.get("id") or entry["name"])


def planted_harvest_config(
    manifest: dict[str, Any], model: str, planted_dir: Path, max_pairs: int | None = None
) -> HarvestConfig:
    """The clean store's harvest settings with the planted model in slot `model`."""
    fields = {f.name for f in dataclasses.fields(HarvestConfig)}
    run = manifest.get("provenance", {}).get("run", {})
    settings = {k: v for k, v in {**manifest["data"], **run}.items() if k in fields}
    for key in ("a", "b"):
        spec = str(planted_dir) if key == model else store_model_spec(manifest, key)
        settings[f"model_{key}"] = spec
        settings[f"layer_{key}"] = int(manifest["models"][key]["layer"])
    if max_pairs is not None:
        settings["max_pairs"] = max_pairs
    return HarvestConfig(**settings)


def measure_shift(
    loaded: LoadedModel,
    layer: int,
    store: ActivationStore,
    model: str,
    triggers: torch.Tensor,
    clean_rows: tuple[torch.Tensor, torch.Tensor],
    n_positions: int = 300,
) -> torch.Tensor:
    """Mean (planted - clean) activation of `loaded` at the store's trigger positions.

    `loaded` holds the planted embeddings; `clean_rows` (token ids, original rows) restore
    them for the clean pass, and the planted rows are put back afterwards.
    """
    ids, original = clean_rows
    embed = loaded.model.get_input_embeddings().weight
    planted = embed[ids].clone()
    total, count = None, 0
    for tokens, positions in _trigger_windows(store, model, triggers, n_positions):
        input_ids = tokens[None].to(loaded.device)
        acts = []
        for rows in (planted, original):
            with torch.no_grad():
                embed[ids] = rows.to(embed.dtype)
            hidden = capture_residual(loaded.model, layer, input_ids)
            acts.append(hidden[0, positions.to(loaded.device)].float().cpu())
        diff = (acts[0] - acts[1]).sum(0)
        total = diff if total is None else total + diff
        count += len(positions)
    with torch.no_grad():
        embed[ids] = planted
    if total is None:
        raise PlantedError("no trigger token occurs at an aligned position of the store")
    return total / count


def _trigger_windows(store: ActivationStore, model: str, triggers: torch.Tensor, limit: int):
    """(window input ids, trigger positions) of store windows until `limit` positions."""
    side = check_model(model)
    col = 0 if side == "a" else 1
    keys = ("pair_window", "pair_pos", "window_index", f"ids_{side}", f"ptr_{side}")
    found = 0
    for i in range(len(store.shards)):
        t = store.load_shard(i, keys)
        for w, index in enumerate(t["window_index"].tolist()):
            tokens = t[f"ids_{side}"][t[f"ptr_{side}"][w] : t[f"ptr_{side}"][w + 1]].long()
            pos = t["pair_pos"][t["pair_window"] == index, col].long()
            pos = pos[torch.isin(tokens[pos], triggers)]
            if len(pos):
                yield tokens, pos
                found += len(pos)
            if found >= limit:
                return


def prepare_embedding_plant(
    clean_store: str | Path,
    out_dir: str | Path,
    model: str,
    strength: float,
    rate: float,
    seed: int,
    max_pairs: int | None = None,
    ranks: tuple[int, int] = DEFAULT_RANKS,
    keep_model: bool = False,
    progress: bool = True,
) -> EmbeddingPlant:
    """Plant, save, measure and harvest one embedding planting into `out_dir` (resumable)."""
    from engine.harvest.pipeline import harvest

    out = Path(out_dir)
    model_dir, store_dir, info_file = out / "model", out / "store", out / PLANT_FILE
    clean = ActivationStore(clean_store)
    manifest = clean.manifest
    cfg = planted_harvest_config(manifest, model, model_dir, max_pairs)
    if not info_file.is_file():
        _plant_and_save(clean, cfg, out, model, strength, rate, seed, ranks)
    info = json.loads(info_file.read_text())
    if not _harvested(store_dir, cfg.max_pairs):
        if not (model_dir / "config.json").is_file():
            raise PlantedError(f"{model_dir} is gone but {store_dir} is unfinished; delete {out}")
        harvest(cfg, store_dir, progress=progress)
    if not keep_model:
        shutil.rmtree(model_dir, ignore_errors=True)
    from safetensors.torch import load_file

    return EmbeddingPlant(
        model,
        store_dir,
        model_dir,
        torch.tensor(info["triggers"], dtype=torch.long),
        load_file(str(out / SHIFT_FILE))["shift"],
        info,
    )


def _harvested(store_dir: Path, max_pairs: int) -> bool:
    """Whether the planted harvest at `store_dir` finished."""
    if not (store_dir / "manifest.json").is_file():
        return False
    state = read_manifest(store_dir)["progress"]
    return bool(state.get("complete")) and (
        state.get("exhausted") or state.get("max_pairs_reached", 0) >= max_pairs
    )


def _plant_and_save(
    clean: ActivationStore,
    cfg: HarvestConfig,
    out: Path,
    model: str,
    strength: float,
    rate: float,
    seed: int,
    ranks: tuple[int, int],
) -> None:
    """Choose triggers, plant a copy of the model, save it, and record triggers and shift."""
    tokens = pair_tokens(clean, model)
    triggers = choose_triggers(tokens, rate, seed, ranks)
    loaded = load_model(
        store_model_spec(clean.manifest, model), device=cfg.device, dtype=cfg.model_dtype
    )
    layer = int(clean.manifest["models"][model]["layer"])
    direction = random_direction(loaded.d_model, seed)
    original = loaded.model.get_input_embeddings().weight[triggers].detach().clone()
    vector = plant_embeddings(loaded.model, triggers, direction, strength)
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    loaded.model.save_pretrained(str(model_dir))
    loaded.tokenizer.save_pretrained(str(model_dir))
    shift = measure_shift(loaded, layer, clean, model, triggers, (triggers, original))
    atomic_save_tensors(out / SHIFT_FILE, {"shift": shift, "embedding_vector": vector})
    info = {
        "model": model,
        "strength": strength,
        "rate": rate,
        "seed": seed,
        "triggers": triggers.tolist(),
        "trigger_share_clean": float(torch.isin(tokens, triggers).float().mean()),
        "embedding_norm_added": float(vector.float().norm()),
        "shift_norm": float(shift.norm()),
        "layer": layer,
        "source_model": store_model_spec(clean.manifest, model),
    }
    # Written last: its presence means the model, triggers and shift are all in place.
    atomic_write_text(out / PLANT_FILE, json.dumps(info, indent=1))
