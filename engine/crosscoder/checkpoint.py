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

The file names are defined once, below (HEADER_FILE, WEIGHTS_FILE, ...).

A header may record the models the crosscoder was trained on under "models" (the activation
store manifest's "models" entry, an `engine.specs.PairSpec`); analysis and matching then
refuse a store or a run of another model pair (`check_models`, `trained_on`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.tracking import TENSORBOARD_DIR
from engine.errors import UserError
from engine.files import atomic_save_tensors, atomic_write_text, fsync_path
from engine.hub import resolve_run
from engine.partition import Partition
from engine.specs import PairSpec

FORMAT = "modeldiff.crosscoder"
FORMAT_VERSION = 1

# The files of a run directory ...
HEADER_FILE = "crosscoder.json"
WEIGHTS_FILE = "crosscoder.safetensors"
STATS_FILE = "feature_stats.safetensors"
# What reading a run needs: all that is downloaded of a run on the Hub (engine.hub).
RUN_FILES = (HEADER_FILE, WEIGHTS_FILE, STATS_FILE)
CHECKPOINTS_DIR = "checkpoints"
# ... and of its checkpoints/ folder: `latest` names the newest step-NNNNNNNN/ folder.
LATEST_FILE = "latest"
STEP_PREFIX = "step-"
CHECKPOINT_HEADER_FILE = "checkpoint.json"
CHECKPOINT_WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.safetensors"


def step_name(step: int) -> str:
    """The folder name of the checkpoint at `step` (step-00001000)."""
    return f"{STEP_PREFIX}{step:08d}"


def has_crosscoder(directory: str | Path) -> bool:
    """Whether `directory` holds a trained crosscoder's description (cheap: nothing is read)."""
    return (Path(directory) / HEADER_FILE).is_file()


class CheckpointError(UserError, RuntimeError):
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
    if root.name == CHECKPOINTS_DIR:
        earlier = sorted(p.name for p in root.glob(f"{STEP_PREFIX}*") if p.name < step.name)
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


def check_models(trained_on: PairSpec | None, models: PairSpec | None, what: str, fix: str) -> None:
    """Refuse `what` (a store, another run) holding another model pair or layers than a
    crosscoder was trained on (by weights, layer and width); nothing is checked where either
    pair is unknown (runs that do not record them)."""
    if trained_on is None or models is None:
        return
    found = trained_on.difference(models)
    if found:
        side, ours, theirs = found
        raise CheckpointError(
            f"the crosscoder was trained on model {side.upper()} {ours.label} but {what} has "
            f"{theirs.label}; {fix}"
        )


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
    atomic_save_tensors(directory / WEIGHTS_FILE, crosscoder.state_dict())
    norm_a, norm_b = crosscoder.decoder_norms()
    stats = {
        "relative_decoder_norm": crosscoder.relative_decoder_norm(),
        "decoder_norm_a": norm_a.detach(),
        "decoder_norm_b": norm_b.detach(),
    }
    stats.update(extra.pop("feature_stats", {}))
    atomic_save_tensors(directory / STATS_FILE, stats)
    header = describe(crosscoder, normalizer, **extra)
    atomic_write_text(directory / HEADER_FILE, json.dumps(header, indent=2))


def load_crosscoder(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[Crosscoder, Normalizer, dict[str, Any]]:
    """Load a trained crosscoder from a run directory or a Hub location (hf://OWNER/NAME,
    see `engine.hub`); returns (model, normalizer, header). `trained_on(model)` then gives
    the models it was trained on (the header's "models")."""
    directory = resolve_run(directory)
    if not has_crosscoder(directory):
        raise CheckpointError(
            f"no trained crosscoder in {directory} ({HEADER_FILE} missing); run "
            f"`modeldiff train` first or point to the run directory (a run on the Hugging "
            f"Face Hub is hf://OWNER/NAME)"
        )
    header = _load_json(directory / HEADER_FILE)
    check_header(header, directory / HEADER_FILE)
    tensors = _load_tensors(directory / WEIGHTS_FILE)
    _check_shapes(header, tensors, directory)  # before the sizes the JSON states are allocated
    model = crosscoder_from_header(header)
    _load_state(model, tensors, directory)
    _TRAINED_ON[model] = header_models(header)
    return model.to(device), Normalizer(**header["normalizer"]), header


def weights_fingerprint(model: Crosscoder) -> str:
    """A short digest of the crosscoder's weights (every tensor's name, dtype, shape and
    bytes): equal for the same weights, different after retraining."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").reshape(-1).contiguous()
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def header_models(header: dict[str, Any]) -> PairSpec | None:
    """The models a crosscoder.json says the crosscoder was trained on; None where it does
    not record them (runs trained on tensors, and older runs)."""
    models = header.get("models")
    return PairSpec.from_dict(models) if models else None


# The models each crosscoder loaded by `load_crosscoder` was trained on, kept beside the
# module rather than on it (the entry goes when the crosscoder does).
_TRAINED_ON: weakref.WeakKeyDictionary[Crosscoder, PairSpec | None] = weakref.WeakKeyDictionary()


def trained_on(crosscoder: Crosscoder) -> PairSpec | None:
    """The models a crosscoder loaded by `load_crosscoder` was trained on; None where its
    run does not record them or it was not loaded from a run."""
    return _TRAINED_ON.get(crosscoder)


def _check_shapes(header: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a header whose sizes the weights file cannot hold, before a crosscoder of
    those sizes is allocated: a crosscoder.json cannot make us allocate what it claims.
    Every feature has an encoder and a decoder row in at least one model, so the weights
    hold at least 2 x features x the smaller width values."""
    try:
        d_a, d_b = int(header["d_a"]), int(header["d_b"])
        n_features = Partition(**header["partition"]).n_features
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{source / HEADER_FILE} describes no usable crosscoder ({_first_line(err)}); "
            f"{_fix(source / HEADER_FILE)}"
        ) from None
    stored = sum(t.numel() for t in tensors.values())
    if min(d_a, d_b) < 1 or 2 * n_features * min(d_a, d_b) > stored:
        raise CheckpointError(
            f"{source / HEADER_FILE} states {n_features:,} features of widths {d_a}/{d_b}, "
            f"which the {stored:,} values of {WEIGHTS_FILE} cannot hold; "
            f"{_fix(source / HEADER_FILE)}"
        )


def _load_state(model: Crosscoder, tensors: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {source} do not match the architecture in its JSON "
            f"({_first_line(err)}); {_fix(source / WEIGHTS_FILE)}"
        ) from None


# -- clearing a run directory ----------------------------------------------------------

# The files training writes in a run directory (a leading dot and a tail: the temporary
# files of an atomic write), and in its checkpoints/ folder.
_RUN_FILES = re.compile(
    rf"\.?({'|'.join(map(re.escape, (HEADER_FILE, WEIGHTS_FILE, STATS_FILE)))})(\..+)?"
)
_CHECKPOINT_ENTRIES = re.compile(
    rf"\.?({re.escape(LATEST_FILE)}|{re.escape(STEP_PREFIX)}\d+)(\..+)?"
)


def clear_run(run_dir: Path, remove: bool = True, keep: Collection[str] = ()) -> None:
    """Remove a run directory's crosscoder and checkpoints (so no checkpoint of an old run
    outlives a new one's), refusing a folder that is not a training run. With
    `remove=False` only check (ranks other than 0 of a distributed run). `keep` names
    entries of the run directory that belong to the run and stay (a streamed run's store
    and stream settings, written anew before training starts)."""
    out = Path(run_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"refusing to clear {out}: it is a file, not a run directory")
    checkpoints = out / CHECKPOINTS_DIR
    own = [e for e in out.iterdir() if _RUN_FILES.fullmatch(e.name) and e.is_file()]
    if (out / TENSORBOARD_DIR).is_dir():  # the old run's curves must not mix with the new
        own.append(out / TENSORBOARD_DIR)
    if checkpoints.is_dir():
        own += [e for e in checkpoints.iterdir() if _CHECKPOINT_ENTRIES.fullmatch(e.name)]
    kept = {out / name for name in keep}
    foreign = [e for e in out.iterdir() if e not in own and e != checkpoints and e not in kept]
    if checkpoints.is_dir():
        foreign += [e for e in checkpoints.iterdir() if e not in own]
    # Files with a run's names prove nothing (another tool may write a crosscoder.json or
    # checkpoints/step-*): anything is removed only from a folder holding modeldiff's own.
    if (foreign or own) and not _is_run(out):
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
    headers = [
        out / HEADER_FILE,
        *(out / CHECKPOINTS_DIR).glob(f"{STEP_PREFIX}*/{CHECKPOINT_HEADER_FILE}"),
    ]
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
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_file(_cpu(crosscoder.state_dict()), str(tmp / CHECKPOINT_WEIGHTS_FILE))
        save_file(_cpu(_optimizer_tensors(crosscoder, optimizer)), str(tmp / OPTIMIZER_FILE))
        save_file(_cpu(state_tensors), str(tmp / STATE_FILE))
        header = describe(crosscoder, normalizer, step=step, **state_json)
        (tmp / CHECKPOINT_HEADER_FILE).write_text(json.dumps(header, indent=2))
        for file in tmp.iterdir():  # on disk before `latest` may point at it
            fsync_path(file)
        fsync_path(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, name + "\n")
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Directory of the newest complete checkpoint, or None if there is none."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    path = pointer.parent / name
    if name.startswith(STEP_PREFIX) and path.is_dir():
        return path
    # Its directory was deleted (e.g. because it was damaged): the newest one left.
    earlier = sorted(
        p for p in pointer.parent.glob(f"{STEP_PREFIX}*") if (p / CHECKPOINT_HEADER_FILE).is_file()
    )
    if earlier:
        return earlier[-1]
    raise CheckpointError(
        f"{pointer} names {path.name}, which does not exist, and no other checkpoint is "
        "left; run `modeldiff train` with --fresh to start over"
    )


def read_checkpoint_header(path: Path) -> dict[str, Any]:
    """The JSON description of a training checkpoint, format-checked."""
    header = _load_json(path / CHECKPOINT_HEADER_FILE)
    check_header(header, path / CHECKPOINT_HEADER_FILE)
    return header


def load_training_checkpoint(
    path: Path, crosscoder: Crosscoder, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Restore weights and optimiser state in place; returns the state tensors."""
    device = next(crosscoder.parameters()).device
    _load_state(crosscoder, _load_tensors(path / CHECKPOINT_WEIGHTS_FILE), path)
    _restore_optimizer(crosscoder, optimizer, _load_tensors(path / OPTIMIZER_FILE), device)
    return {k: v.to(device) for k, v in _load_tensors(path / STATE_FILE).items()}


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
    done = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".{STEP_PREFIX}*"):  # temp dirs of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
