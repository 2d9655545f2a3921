"""Crosscoder files on disk: safetensors weights plus a JSON description, written atomically.

A training run directory looks like::

    run/
      crosscoder.safetensors   final weights (what analysis and steering load)
      crosscoder.json          config, partition, normalisation factors, metrics
      feature_stats.safetensors relative decoder norm, per-model decoder norms, firing stats
      checkpoints/
        latest                 name of the newest complete checkpoint
        step-00001000/         model.safetensors, optimizer.safetensors, state.safetensors,
                               checkpoint.json

Every file is written to a temporary name and renamed into place, and a checkpoint
directory is complete before `latest` points to it, so a crash at any moment leaves the
previous checkpoint usable.

A header may record the models the crosscoder was trained on under "models" (the activation
store manifest's "models" entry); analysis and matching then refuse a store or a run of
another model pair (`check_models`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.partition import Partition
from engine.files import atomic_save_tensors, atomic_write_text

FORMAT = "modeldiff.crosscoder"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what was asked for."""


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}; {_fix(path)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is corrupt or not a safetensors file ({_first_line(err)}); {_fix(path)}"
        ) from None


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}; {_fix(path)}")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({_first_line(err)}); {_fix(path)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a modeldiff crosscoder file; {_fix(path)}")
    return header


def _fix(path: Path) -> str:
    """What to do about a missing or damaged file of a run directory."""
    step, root = path.parent, path.parent.parent
    if root.name == "checkpoints":
        earlier = sorted(p.name for p in root.glob("step-*") if p.name < step.name)
        if not earlier:
            return "no earlier checkpoint is left: run `modeldiff train` with --fresh to start over"
        return (
            f"delete {step} and run the same `modeldiff train` command again: it resumes "
            f"from {earlier[-1]} (--fresh starts over)"
        )
    # The final files are rewritten from the last checkpoint when training is rerun.
    return (
        f"run the `modeldiff train` command that made {path.parent} again (it rewrites the "
        "file from the last checkpoint), or train it anew with --fresh"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- crosscoder description ------------------------------------------------------------


def describe(crosscoder: Crosscoder, normalizer: Normalizer, **extra: Any) -> dict[str, Any]:
    """JSON-able header that identifies a crosscoder's architecture and scaling."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": crosscoder.partition.architecture.value,
        "d_a": crosscoder.d_a,
        "d_b": crosscoder.d_b,
        "partition": crosscoder.partition.to_dict(),
        "score_weighting": crosscoder.score_weighting,
        "normalizer": normalizer.to_dict(),
        **extra,
    }


def check_header(header: dict[str, Any], source: Path) -> None:
    """Refuse files of another format or a newer version."""
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a modeldiff crosscoder file")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} was written by a newer modeldiff (format {version}, this version reads "
            f"up to {FORMAT_VERSION}); upgrade modeldiff"
        )


def check_models(
    trained_on: dict[str, Any] | None, models: dict[str, Any] | None, what: str, fix: str
) -> None:
    """Refuse `what` (a store, another run) holding another model pair or layers than a
    crosscoder was trained on; `trained_on` / `models` are store-manifest "models" entries,
    and nothing is checked where either is unknown (runs that do not record them)."""
    if not trained_on or not models:
        return
    for side in ("a", "b"):
        ours, theirs = trained_on.get(side, {}), models.get(side, {})
        if _model_key(ours) != _model_key(theirs):
            raise CheckpointError(
                f"the crosscoder was trained on model {side.upper()} {_model_text(ours)} but "
                f"{what} has {_model_text(theirs)}; {fix}"
            )


def _model_key(model: dict[str, Any]) -> tuple:
    """What identifies a captured model: where its weights come from, layer and width."""
    src = model.get("source") or {}
    if src.get("sha256"):
        weights = src["sha256"]
    elif src.get("kind") == "hub":
        weights = f"{src.get('id')}@{src.get('revision')}"
    else:
        weights = src.get("path") or src.get("id") or model.get("name")
    return weights, model.get("layer"), model.get("d_model")


def _model_text(model: dict[str, Any]) -> str:
    return f"{model.get('name')!r} (layer {model.get('layer')}, d {model.get('d_model')})"


def crosscoder_from_header(header: dict[str, Any]) -> Crosscoder:
    """An (untrained) crosscoder with the shape a header describes."""
    return Crosscoder(
        header["d_a"],
        header["d_b"],
        Partition(**header["partition"]),
        score_weighting=header.get("score_weighting", "sum"),
    )


def save_crosscoder(
    directory: Path, crosscoder: Crosscoder, normalizer: Normalizer, **extra: Any
) -> None:
    """Write the final crosscoder.safetensors + crosscoder.json + feature_stats.safetensors."""
    directory = Path(directory)
    atomic_save_tensors(directory / "crosscoder.safetensors", crosscoder.state_dict())
    norm_a, norm_b = crosscoder.decoder_norms()
    stats = {
        "relative_decoder_norm": crosscoder.relative_decoder_norm(),
        "decoder_norm_a": norm_a.detach(),
        "decoder_norm_b": norm_b.detach(),
    }
    stats.update(extra.pop("feature_stats", {}))
    atomic_save_tensors(directory / "feature_stats.safetensors", stats)
    header = describe(crosscoder, normalizer, **extra)
    atomic_write_text(directory / "crosscoder.json", json.dumps(header, indent=2))


def load_crosscoder(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[Crosscoder, Normalizer, dict[str, Any]]:
    """Load a trained crosscoder; returns (model, normalizer, header)."""
    directory = Path(directory)
    if not (directory / "crosscoder.json").is_file():
        raise CheckpointError(
            f"no trained crosscoder in {directory} (crosscoder.json missing); run "
            f"`modeldiff train` first or point to the run directory"
        )
    header = _load_json(directory / "crosscoder.json")
    check_header(header, directory / "crosscoder.json")
    model = crosscoder_from_header(header)
    _load_state(model, _load_tensors(directory / "crosscoder.safetensors"), directory)
    # The models it was trained on, where the run records them (see check_models).
    model.trained_on = header.get("models")
    return model.to(device), Normalizer(**header["normalizer"]), header


def _load_state(model: Crosscoder, tensors: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {source} do not match the architecture in its JSON "
            f"({_first_line(err)}); {_fix(source / 'crosscoder.safetensors')}"
        ) from None


# -- clearing a run directory ----------------------------------------------------------

# The files training writes in a run directory (a leading dot and a tail: the temporary
# files of an atomic write), and in its checkpoints/ folder.
_RUN_FILES = re.compile(
    r"\.?(crosscoder\.json|crosscoder\.safetensors|feature_stats\.safetensors)(\..+)?"
)
_CHECKPOINT_ENTRIES = re.compile(r"\.?(latest|step-\d+)(\..+)?")


def clear_run(run_dir: Path, remove: bool = True) -> None:
    """Remove a run directory's crosscoder and checkpoints (so no checkpoint of an old run
    outlives a new one's), refusing a folder that is not a training run. With
    `remove=False` only check (ranks other than 0 of a distributed run)."""
    out = Path(run_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"refusing to clear {out}: it is a file, not a run directory")
    checkpoints = out / "checkpoints"
    own = [e for e in out.iterdir() if _RUN_FILES.fullmatch(e.name) and e.is_file()]
    if checkpoints.is_dir():
        own += [e for e in checkpoints.iterdir() if _CHECKPOINT_ENTRIES.fullmatch(e.name)]
    foreign = [e for e in out.iterdir() if e not in own and e != checkpoints]
    if checkpoints.is_dir():
        foreign += [e for e in checkpoints.iterdir() if e not in own]
    if foreign and not _is_run(out):
        shown = ", ".join(str(e.relative_to(out)) for e in sorted(foreign)[:3])
        raise CheckpointError(
            f"refusing to clear {out}: it is not a training run directory (it holds "
            f"{shown}{', ...' if len(foreign) > 3 else ''}); choose a new or empty output folder"
        )
    if not remove:
        return
    for entry in own:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _is_run(out: Path) -> bool:
    """Whether `out` holds a training run: a crosscoder or a checkpoint of modeldiff's."""
    headers = [out / "crosscoder.json", *(out / "checkpoints").glob("step-*/checkpoint.json")]
    for file in headers:
        try:
            if json.loads(file.read_text()).get("format") == FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            continue  # damaged or foreign: look at the next one
    return False


# -- training checkpoints --------------------------------------------------------------


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    optimizer: torch.optim.Optimizer,
    state_tensors: dict[str, torch.Tensor],
    state_json: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_file(_cpu(crosscoder.state_dict()), str(tmp / "model.safetensors"))
        save_file(
            _cpu(_optimizer_tensors(crosscoder, optimizer)), str(tmp / "optimizer.safetensors")
        )
        save_file(_cpu(state_tensors), str(tmp / "state.safetensors"))
        header = describe(crosscoder, normalizer, step=step, **state_json)
        (tmp / "checkpoint.json").write_text(json.dumps(header, indent=2))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Directory of the newest complete checkpoint, or None if there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    path = pointer.parent / name
    if name.startswith("step-") and path.is_dir():
        return path
    # Its directory was deleted (e.g. because it was damaged): the newest one left.
    earlier = sorted(p for p in pointer.parent.glob("step-*") if (p / "checkpoint.json").is_file())
    if earlier:
        return earlier[-1]
    raise CheckpointError(
        f"{pointer} names {path.name}, which does not exist, and no other checkpoint is "
        "left; run `modeldiff train` with --fresh to start over"
    )


def read_checkpoint_header(path: Path) -> dict[str, Any]:
    """The JSON description of a training checkpoint, format-checked."""
    header = _load_json(path / "checkpoint.json")
    check_header(header, path / "checkpoint.json")
    return header


def load_training_checkpoint(
    path: Path, crosscoder: Crosscoder, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Restore weights and optimiser state in place; returns the state tensors."""
    device = next(crosscoder.parameters()).device
    _load_state(crosscoder, _load_tensors(path / "model.safetensors"), path)
    _restore_optimizer(crosscoder, optimizer, _load_tensors(path / "optimizer.safetensors"), device)
    return {k: v.to(device) for k, v in _load_tensors(path / "state.safetensors").items()}


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Adam moments and step counts keyed by parameter name."""
    out = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, device
) -> None:
    for name, param in model.named_parameters():
        keys = [k for k in tensors if k.rsplit(".", 1)[0] == name]
        if keys:
            optimizer.state[param] = {
                k.rsplit(".", 1)[1]: _state_to(tensors[k], device, k.endswith(".step"))
                for k in keys
            }


def _state_to(t: torch.Tensor, device, is_step: bool) -> torch.Tensor:
    # Adam keeps `step` on the CPU unless it runs fused/capturable on a GPU.
    return t if is_step and device.type == "cpu" else t.to(device)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # temp dirs of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
