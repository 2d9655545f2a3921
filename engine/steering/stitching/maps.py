"""The stitch object: affine maps A->B and B->A between two models' activation spaces, how
a steering vector is translated through them, and their safetensors file (see the package
docstring for units and the translation)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from engine.errors import ConfigError
from engine.files import atomic_write_bytes
from engine.specs import SIDES, PairSpec
from engine.steering.transfer import other_model

FORMAT = "modeldiff-stitch"
VERSION = 1
TENSORS = ("w_ab", "b_ab", "w_ba", "b_ba")
TRANSLATIONS = ("linear", "affine")  # how `Stitch.map` translates a steering vector


@dataclass
class Stitch:
    """Affine maps A->B and B->A; parameters live in median-norm-scaled units."""

    w_ab: torch.Tensor  # [d_b, d_a]
    b_ab: torch.Tensor  # [d_b]
    w_ba: torch.Tensor  # [d_a, d_b]
    b_ba: torch.Tensor  # [d_a]
    scale_a: float  # raw A activations x scale_a = the units the maps are stored in
    scale_b: float
    fve: dict[str, float] = field(default_factory=dict)  # held-out, per direction
    info: dict[str, Any] = field(default_factory=dict)  # training settings (provenance)
    # The models and layers fitted for: {"a": {"name", "layer", "d_model"}, "b": ...};
    # empty when unknown (fitted on tensors rather than an activation store).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    translation: str = "linear"  # what `map` does: the linear part, or eq. 18 with the bias

    def __post_init__(self) -> None:
        check_translation(self.translation)

    @property
    def d_a(self) -> int:
        return self.w_ab.shape[1]

    @property
    def fingerprint(self) -> str:
        """A short digest of what the stitch does (maps, scales, translation): equal for
        the same fit, different for another."""
        digest = hashlib.sha256(f"{self.scale_a!r} {self.scale_b!r} {self.translation}".encode())
        for t in (self.w_ab, self.b_ab, self.w_ba, self.b_ba):
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def d_b(self) -> int:
        return self.w_ab.shape[0]

    def a_to_b(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-A activations [..., d_a] to model-B activations [..., d_b]."""
        return self._apply(x, "a", bias=True)

    def b_to_a(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw model-B activations [..., d_b] to model-A activations [..., d_a]."""
        return self._apply(x, "b", bias=True)

    def map(
        self, vector: torch.Tensor, source: str, translation: str | None = None
    ) -> torch.Tensor:
        """Translate a steering vector (or rows of them) from `source` to the other model.

        `translation` (default: the stitch's own) is "linear": W v, the translation of a
        displacement (T(x + v) - T(x) = W v for an affine T, so the bias cancels); or
        "affine": W v + b, the paper's eq. 18, which treats the vector as a point and adds
        the bias (see the module docstring for why that is not a direction).
        """
        other_model(source)
        mode = check_translation(self.translation if translation is None else translation)
        return self._apply(vector, source, bias=mode == "affine")

    def _apply(self, x: torch.Tensor, source: str, bias: bool) -> torch.Tensor:
        w, b = (self.w_ab, self.b_ab) if source == "a" else (self.w_ba, self.b_ba)
        s_in, s_out = (
            (self.scale_a, self.scale_b) if source == "a" else (self.scale_b, self.scale_a)
        )
        if x.ndim == 0 or x.shape[-1] != w.shape[1]:
            raise ConfigError(
                f"model {source.upper()} input has shape {tuple(x.shape)}; its last dimension "
                f"must be {w.shape[1]} (the width this stitch was trained on)"
            )
        w = w.to(x.device)
        out = (x.float() * s_in) @ w.T
        if bias:
            out = out + b.to(x.device)
        return out / s_out

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file; settings and FVE go in its JSON metadata header."""
        path = Path(path)
        check_stitch_target(path)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "scale_a": self.scale_a,
            "scale_b": self.scale_b,
            "fve": self.fve,
            "info": self.info,
            "models": self.models,
            "translation": self.translation,
        }
        tensors = {
            name: getattr(self, name).detach().float().cpu().contiguous() for name in TENSORS
        }
        atomic_write_bytes(path, save(tensors, metadata={FORMAT: json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Stitch:
        """Read a stitch written by `save` (safetensors + JSON header, no pickle)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no stitch file at {path}; train one with train_stitch first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{path} is corrupt or not a safetensors file ({err})") from None
        header = _check_header(meta, tensors, path)
        return cls(
            **{k: tensors[k] for k in TENSORS},
            scale_a=float(header["scale_a"]),
            scale_b=float(header["scale_b"]),
            fve=header.get("fve", {}),
            info=header.get("info", {}),
            models=header.get("models") or {},
            translation=header.get("translation", "linear"),
        )

    def check_run(self, run: dict[str, Any], run_id: str) -> None:
        """A ConfigError unless the stitch was fitted for the run's models at its layers
        (a stitch that records none is checked only by width, when the models load)."""
        fitted, used = PairSpec.from_dict(self.models), PairSpec.from_run(run)
        for m in SIDES:
            ours, theirs = fitted[m], used[m]  # an unrecorded model conflicts with none
            if ours.conflicts_with(theirs):
                raise ConfigError(
                    f"the stitch was fitted for model {m.upper()} {ours.where}, but run "
                    f"{run_id!r} uses {theirs.where}; fit one on this run's store with "
                    "`modeldiff stitch --store STORE --out FILE`"
                )


def check_translation(translation: str) -> str:
    """`translation` if it is one `Stitch.map` knows, else a ConfigError naming them."""
    if translation not in TRANSLATIONS:
        raise ConfigError(
            f"translation must be one of {', '.join(TRANSLATIONS)}, got {translation!r}"
        )
    return translation


def check_stitch_target(path: Path) -> None:
    """Refuse a path a stitch cannot be saved to: not .safetensors, a directory, or an
    existing file that is not a stitch (only an earlier stitch is replaced)."""
    if path.suffix != ".safetensors":
        raise ConfigError(f"stitch files are .safetensors; got {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name like stitch.safetensors")
    if not path.exists():
        return
    try:
        with safe_open(str(path), framework="pt") as fh:
            ours = FORMAT in (fh.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        ours = False
    if not ours:
        raise ConfigError(
            f"refusing to replace {path}: it is not a stitch file; remove it yourself or "
            "choose another --out"
        )


def _check_header(meta: dict[str, str], tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Parsed JSON header, after checking the file really is a complete stitch."""
    if FORMAT not in meta:
        raise ConfigError(f"{path} is a safetensors file but not a stitch (no {FORMAT} header)")
    try:
        header = json.loads(meta[FORMAT])
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} has a corrupt stitch header ({err}); retrain it") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise ConfigError(f"{path} has an unknown stitch format; expected version {VERSION}")
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise ConfigError(f"{path} lacks tensors {missing}; it is incomplete, retrain it")
    d_b, d_a = tensors["w_ab"].shape
    shapes = {"b_ab": (d_b,), "w_ba": (d_a, d_b), "b_ba": (d_a,)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, not {shape}")
    return header
