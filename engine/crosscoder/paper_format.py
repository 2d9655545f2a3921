"""Crosscoders in the format of the paper's published code (`dictionary_learning`'s DFC fork).

That code keeps one hidden size `d` for both models and stores a crosscoder as stacked,
masked tensors over the whole dictionary of F features::

    encoder.weight [2, d, F]   encoder.bias [F]       (index 0 = model A, 1 = model B)
    decoder.weight [2, F, d]   decoder.bias [2, d]
    threshold      []          one inference threshold on relu(pre) x (|d_A| + |d_B|)
    k              []          BatchTopK's k
    code_normalization_id []   how features are ranked (CROSSCODER = sum of decoder norms)
    activation_mean/std [2, d], activation_global_scale [2], target_rms []
                               optional input normalisation (NaN mean/std: none)

Its `FeaturePartition` orders features [A-exclusive | B-exclusive | shared], the order of
`engine.partition` too, and sizes the blocks as int(F x percentage). Forbidden weights (B's
columns of an A-exclusive feature and the reverse) are zeros kept at zero by gradient
masks; here they are absent parameters, so importing drops them after checking they are
zero, and exporting writes zeros. Both sum the two models' encoder outputs before BatchTopK
and rank by relu(pre) x (|d_A| + |d_B|), which is our "sum" score weighting.

Normalisation differs: the paper's code has none by default (imported with unit scale
factors), or an optional mean/global-scale normaliser, x' = (x - mean) x scale. A scalar
scale per model is our `Normalizer`; the mean is folded into the encoder and decoder biases,
which gives the same features and the same reconstructions in raw units. Exporting writes
our scale factors as that normaliser with a zero mean.

Files read: a `torch.save` state dict (`model_final.pt`, `checkpoint_N.pt`, loaded with
`weights_only=True`, so no code runs) or `model.safetensors`, each with the `config.json`
beside it (the training config, {"trainer": {...}}, or the constructor arguments the
Hugging Face mixin writes). Files written: `model.safetensors` and `config.json` holding
the constructor arguments, which `DedicatedFeatureBatchTopKCrossCoder(**config)` plus
`load_state_dict` (or its Hub mixin) reads, and `modeldiff.json` with what this project
knows about the run (models, partition, normalisation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.crosscoder.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    clear_run,
    has_crosscoder,
    load_crosscoder,
    save_crosscoder,
)
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import UserError
from engine.files import atomic_save_tensors, atomic_write_text, load_pickled_tensors
from engine.hub import parse_ref, resolve_run
from engine.partition import Partition

PAPER_FORMAT = "dfc_learning"
PAPER_CLASS = "DedicatedFeatureBatchTopKCrossCoder"
STANDARD_CLASS = "BatchTopKCrossCoder"
# The files of an exported folder (the Hugging Face mixin's names) ...
PAPER_WEIGHTS_FILE = "model.safetensors"
PAPER_CONFIG_FILE = "config.json"
PROVENANCE_FILE = "modeldiff.json"
# ... and the state dicts the paper's training writes (read only: they are pickles).
PAPER_TORCH_FILES = ("model_final.pt", "ae.pt")
# The paper's CodeNormalization enum (auto() numbering): only CROSSCODER is a ranking we have.
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
CROSSCODER_NORMALIZATION = 1
# Largest |weight| accepted where the partition forbids one (the paper keeps them at 0.0).
FORBIDDEN_TOLERANCE = 1e-6


class PaperFormatError(UserError, ValueError):
    """A file is not a crosscoder of the paper's code, or a run cannot be written as one."""


@dataclass
class PaperCrosscoder:
    """A crosscoder as the paper's code holds it: stacked [2, ...] tensors over F features."""

    encoder_weight: torch.Tensor  # [2, d, F]
    encoder_bias: torch.Tensor  # [F]
    decoder_weight: torch.Tensor  # [2, F, d]
    decoder_bias: torch.Tensor  # [2, d]
    threshold: float
    k: int
    n_a_exclusive: int = 0
    n_b_exclusive: int = 0
    activation_mean: torch.Tensor | None = None  # [2, d], None: no normaliser
    activation_global_scale: torch.Tensor | None = None  # [2]
    config: dict[str, Any] = field(default_factory=dict)  # the config.json beside it

    @property
    def d(self) -> int:
        return self.encoder_weight.shape[1]

    @property
    def n_features(self) -> int:
        return self.encoder_weight.shape[2]

    @property
    def partition(self) -> Partition:
        n_shared = self.n_features - self.n_a_exclusive - self.n_b_exclusive
        return Partition(self.n_a_exclusive, self.n_b_exclusive, n_shared)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the paper's state-dict names."""
        d = self.d
        if self.activation_mean is None:
            mean = torch.full((2, d), math.nan)
            std = torch.full((2, d), math.nan)
            scale = torch.ones(2)
        else:
            mean = self.activation_mean.float()
            scale = self.activation_global_scale.float()
            # Any std whose total variance gives that scale with target_rms 1: the code
            # applies activation_global_scale as stored.
            std = (1.0 / (scale * math.sqrt(d))).unsqueeze(1).expand(2, d).contiguous()
        return {
            "encoder.weight": self.encoder_weight.float().contiguous(),
            "encoder.bias": self.encoder_bias.float().contiguous(),
            "decoder.weight": self.decoder_weight.float().contiguous(),
            "decoder.bias": self.decoder_bias.float().contiguous(),
            "threshold": torch.tensor(float(self.threshold), dtype=torch.float32),
            "k": torch.tensor(int(self.k), dtype=torch.int32),
            "code_normalization_id": torch.tensor(CROSSCODER_NORMALIZATION, dtype=torch.int64),
            "target_rms": torch.tensor(1.0),
            "activation_mean": mean,
            "activation_std": std,
            "activation_global_scale": scale,
        }

    def constructor_config(self) -> dict[str, Any]:
        """The constructor arguments of the paper's class (its config.json)."""
        config: dict[str, Any] = {
            "activation_dim": self.d,
            "dict_size": self.n_features,
            "num_layers": 2,
            "k": int(self.k),
            "code_normalization": CODE_NORMALIZATIONS[CROSSCODER_NORMALIZATION],
        }
        if self.n_a_exclusive or self.n_b_exclusive:
            config["model_a_exclusive_pct"] = _percentage(self.n_a_exclusive, self.n_features)
            config["model_b_exclusive_pct"] = _percentage(self.n_b_exclusive, self.n_features)
        return config


def _percentage(count: int, n_features: int) -> float:
    """A share p with int(n_features x p) == count, as the paper's partition rounds down."""
    share = count / n_features
    if int(n_features * share) != count:
        share = (count + 0.5) / n_features
    return share


def _partition_size(n_features: int, share: Any, what: str) -> int:
    """int(n_features x share), the paper's rounding, from a number or its string."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise PaperFormatError(f"{what} is {share!r}, not a number") from None
    if not 0 <= value < 1:
        raise PaperFormatError(f"{what} is {value}, not a share between 0 and 1")
    return int(n_features * value)


# -- reading the paper's files ----------------------------------------------------------


def read_paper(source: str | Path) -> PaperCrosscoder:
    """The crosscoder in a file or folder the paper's code wrote (see the module doc)."""
    source = Path(source)
    weights = _weights_file(source)
    config = _read_config(weights.parent / PAPER_CONFIG_FILE)
    state = _read_state(weights)
    partition_config = state.pop("_partition_config", None)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile'd
    for name in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"):
        if not isinstance(state.get(name), torch.Tensor):
            raise PaperFormatError(
                f"{weights} has no {name!r} tensor: not a crosscoder of the paper's code "
                "(dictionary_learning's CrossCoder classes)"
            )
    enc, dec = state["encoder.weight"].float(), state["decoder.weight"].float()
    if enc.dim() != 3 or enc.shape[0] != 2 or dec.shape != (2, enc.shape[2], enc.shape[1]):
        raise PaperFormatError(
            f"{weights} holds encoder.weight {tuple(enc.shape)} and decoder.weight "
            f"{tuple(dec.shape)}; a crosscoder of two models has [2, d, F] and [2, F, d]"
        )
    _check_code_normalization(state, config, weights)
    n_features = enc.shape[2]
    n_a, n_b = _paper_partition(partition_config, config, enc, dec, weights)
    try:
        Partition(n_a, n_b, n_features - n_a - n_b)
    except ValueError as err:
        raise PaperFormatError(f"{weights}: its partition is unusable ({err})") from None
    mean, scale = _paper_normaliser(state, config, weights)
    d = enc.shape[1]
    _check_tensors(
        weights,
        {"encoder.weight": (enc, None), "decoder.weight": (dec, None),
         "encoder.bias": (state["encoder.bias"], (n_features,)),
         "decoder.bias": (state["decoder.bias"], (2, d)),
         "activation_mean": (mean, (2, d)), "activation_global_scale": (scale, (2,))},
    )  # fmt: skip
    return PaperCrosscoder(
        encoder_weight=enc,
        encoder_bias=state["encoder.bias"].float(),
        decoder_weight=dec,
        decoder_bias=state["decoder.bias"].float(),
        threshold=_scalar(state.get("threshold"), -1.0, "threshold", weights),
        k=int(_scalar(state.get("k"), _config_value(config, "k") or 0, "k", weights)),
        n_a_exclusive=n_a,
        n_b_exclusive=n_b,
        activation_mean=mean,
        activation_global_scale=scale,
        config=config,
    )


def _check_tensors(
    source: Path, tensors: dict[str, tuple[torch.Tensor | None, tuple[int, ...] | None]]
) -> None:
    """Refuse a tensor of the wrong shape (a [1] bias would silently broadcast) or with
    NaN or infinite values; None tensors (no normaliser) and shapes pass."""
    for name, (tensor, shape) in tensors.items():
        if tensor is None:
            continue
        if shape is not None and tuple(tensor.shape) != shape:
            raise PaperFormatError(
                f"{source}: {name} has shape {list(tensor.shape)}, expected {list(shape)}; "
                "give the crosscoder file the paper's code wrote"
            )
        if not bool(torch.isfinite(tensor.float()).all()):
            raise PaperFormatError(
                f"{source}: {name} holds NaN or infinite values; give a crosscoder whose "
                "training finished with finite weights"
            )


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise PaperFormatError(
            f"{source} does not exist; give the folder the paper's code saved to (with "
            f"{PAPER_TORCH_FILES[0]} or {PAPER_WEIGHTS_FILE}) or one of its .pt files"
        )
    for name in (PAPER_WEIGHTS_FILE, *PAPER_TORCH_FILES):
        if (source / name).is_file():
            return source / name
    checkpoints = sorted(
        source.glob("checkpoint_*.pt"), key=lambda p: int("0" + p.stem.split("_")[-1])
    )
    if checkpoints:
        return checkpoints[-1]
    raise PaperFormatError(
        f"{source} holds no crosscoder of the paper's code ({PAPER_WEIGHTS_FILE}, "
        f"{', '.join(PAPER_TORCH_FILES)} or checkpoint_N.pt)"
    )


def _read_state(path: Path) -> dict[str, Any]:
    if path.suffix != ".safetensors":
        # Tensors and plain values only, on a torch where no code from the file can run.
        state = load_pickled_tensors(path, PaperFormatError)
        if not isinstance(state, dict):
            raise PaperFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        text = str(err).strip().splitlines()
        raise PaperFormatError(
            f"cannot read {path} as a state dict ({text[0] if text else type(err).__name__}); "
            "give the model_final.pt or model.safetensors the paper's code wrote"
        ) from None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PaperFormatError(f"{path} is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _config_value(config: dict[str, Any], key: str) -> Any:
    """`key` of the constructor config, or of the training config's trainer section (or
    its dict_class_kwargs)."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    kwargs = trainer.get("dict_class_kwargs") or {}
    for scope in (config, trainer, kwargs):
        if isinstance(scope, dict) and scope.get(key) is not None:
            return scope[key]
    return None


def _scalar(value: Any, default: float, name: str, source: Path) -> float:
    if value is None:
        return float(default)
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1:
        raise PaperFormatError(
            f"{source} has a {name} of shape {tuple(tensor.shape)}: one value per model "
            "(DECOUPLED code normalisation) has no counterpart here"
        )
    return float(tensor.item())


def _check_code_normalization(state: dict[str, Any], config: dict[str, Any], source: Path):
    if "code_normalization_id" in state:
        name = CODE_NORMALIZATIONS.get(int(state["code_normalization_id"]), "unknown")
    else:
        name = str(_config_value(config, "code_normalization") or "CROSSCODER").upper()
    if name != "CROSSCODER":
        raise PaperFormatError(
            f"{source} ranks features with code normalisation {name}; modeldiff ranks by the "
            "sum of the decoder norms (the paper's default, CROSSCODER) and cannot import it"
        )


def _paper_partition(
    saved: Any, config: dict[str, Any], enc: torch.Tensor, dec: torch.Tensor, source: Path
) -> tuple[int, int]:
    """(A-exclusive, B-exclusive) sizes from the state dict's or config's percentages,
    checked against the zero pattern of the weights; inferred from it if neither says."""
    n_features = enc.shape[2]
    shares = None
    if isinstance(saved, dict) and "model_a_exclusive_pct" in saved:
        shares = saved["model_a_exclusive_pct"], saved["model_b_exclusive_pct"]
    elif _config_value(config, "model_a_exclusive_pct") is not None:
        shares = (
            _config_value(config, "model_a_exclusive_pct"),
            _config_value(config, "model_b_exclusive_pct") or 0.0,
        )
    if shares is not None:
        n_a = _partition_size(n_features, shares[0], "model_a_exclusive_pct")
        n_b = _partition_size(n_features, shares[1], "model_b_exclusive_pct")
    else:
        n_a, n_b = _zero_blocks(enc, dec)
    worst = _forbidden_max(enc, dec, n_a, n_b)
    if worst > FORBIDDEN_TOLERANCE:
        raise PaperFormatError(
            f"{source}: weights its partition ({n_a} A-exclusive, {n_b} B-exclusive) forbids "
            f"are not zero (largest |w| = {worst:.3g}), so its exclusive features read or "
            "write the other model; it is not a DFC trained with that partition"
        )
    return n_a, n_b


def _zero_blocks(enc: torch.Tensor, dec: torch.Tensor) -> tuple[int, int]:
    """Leading features with no B weights (A-exclusive), then features with no A weights."""
    no_b = (enc[1].abs().amax(0) == 0) & (dec[1].abs().amax(1) == 0)
    no_a = (enc[0].abs().amax(0) == 0) & (dec[0].abs().amax(1) == 0)
    n_a = _leading_true(no_b)
    n_b = _leading_true(no_a[n_a:])
    return n_a, n_b


def _leading_true(mask: torch.Tensor) -> int:
    false = torch.nonzero(~mask)
    return int(false[0]) if false.numel() else mask.numel()


def _forbidden_max(enc: torch.Tensor, dec: torch.Tensor, n_a: int, n_b: int) -> float:
    """Largest |w| among the weights a partition forbids (B's of A-exclusive features and
    A's of B-exclusive ones)."""
    parts = [
        enc[1][:, :n_a],
        dec[1][:n_a],
        enc[0][:, n_a : n_a + n_b],
        dec[0][n_a : n_a + n_b],
    ]
    return max((float(p.abs().max()) for p in parts if p.numel()), default=0.0)


def _paper_normaliser(
    state: dict[str, Any], config: dict[str, Any], source: Path
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mean [2, d], global scale [2]) of the paper's input normaliser; (None, None) where the
    checkpoint has none (NaN mean or std, the default)."""
    mean, std = state.get("activation_mean"), state.get("activation_std")
    if mean is None or std is None or torch.isnan(mean).any() or torch.isnan(std).any():
        return None, None
    if _config_value(config, "keep_relative_variance") in (False, "False", "false"):
        raise PaperFormatError(
            f"{source} normalises each input dimension by its own std "
            "(keep_relative_variance=False); modeldiff scales each model by one factor and "
            "cannot import it"
        )
    scale = state.get("activation_global_scale")
    if scale is None:
        rms = float(state.get("target_rms", torch.tensor(1.0)))
        scale = rms / torch.sqrt((std.float() ** 2).sum(-1) + 1e-8)
    return mean.float(), scale.float().reshape(2)


# -- converting -------------------------------------------------------------------------


def to_crosscoder(paper: PaperCrosscoder) -> tuple[Crosscoder, Normalizer]:
    """Our crosscoder and normaliser with the same features as the paper's tensors (on raw
    inputs: `cc.encode(*normalizer.apply(x_a, x_b))`)."""
    p, d = paper.partition, paper.d
    cc = Crosscoder(d, d, p, score_weighting="sum")
    rows_a, rows_b = p.model_rows("a"), p.model_rows("b")
    enc, dec = paper.encoder_weight, paper.decoder_weight
    b_enc, b_dec = paper.encoder_bias.clone(), paper.decoder_bias.clone()
    if paper.activation_mean is None:
        normalizer = Normalizer.identity()
    else:
        # x' = (x - m) s: the encoder sees s x minus a constant, folded into its bias; the
        # decoder's output in raw units is x'/s + m, so s m joins its bias.
        m, s = paper.activation_mean, paper.activation_global_scale
        b_enc -= s[0] * (m[0] @ enc[0]) + s[1] * (m[1] @ enc[1])
        b_dec += s.unsqueeze(1) * m
        normalizer = Normalizer(float(s[0]), float(s[1]))
    with torch.no_grad():
        cc.w_enc_a.copy_(enc[0][:, rows_a].T)
        cc.w_enc_b.copy_(enc[1][:, rows_b].T)
        cc.w_dec_a.copy_(dec[0][rows_a])
        cc.w_dec_b.copy_(dec[1][rows_b])
        cc.b_enc.copy_(b_enc)
        cc.b_dec_a.copy_(b_dec[0])
        cc.b_dec_b.copy_(b_dec[1])
        cc.threshold.fill_(paper.threshold)
    return cc, normalizer


def from_crosscoder(
    cc: Crosscoder, normalizer: Normalizer, k: int, source: str = "the run"
) -> PaperCrosscoder:
    """The paper's tensors for our crosscoder (refused where the paper's code has no
    counterpart: two widths, designated-shared features, "mean" ranking)."""
    p = cc.partition
    if cc.d_a != cc.d_b:
        raise PaperFormatError(
            f"{source} pairs widths {cc.d_a} and {cc.d_b}; the paper's code has one hidden "
            "size for both models, so only runs with d_A == d_B can be exported"
        )
    if p.n_designated:
        raise PaperFormatError(
            f"{source} is a DSF crosscoder (designated-shared features with tied decoders); "
            "the paper's code has no such block"
        )
    if cc.score_weighting != "sum":
        raise PaperFormatError(
            f"{source} ranks features by the mean decoder norm (score_weighting = "
            f"{cc.score_weighting!r}); the paper's code ranks by the sum (CROSSCODER) only"
        )
    threshold = cc.threshold.detach().float()
    if threshold.numel() and not torch.all(threshold == threshold[0]):
        raise PaperFormatError(
            f"{source} has a different inference threshold per feature; the paper's code "
            "keeps one threshold"
        )
    d, n = cc.d_a, p.n_features
    with torch.no_grad():
        enc = torch.zeros(2, d, n)
        dec = torch.zeros(2, n, d)
        enc[0][:, p.model_rows("a")] = cc.w_enc_a.detach().float().cpu().T
        enc[1][:, p.model_rows("b")] = cc.w_enc_b.detach().float().cpu().T
        dec[0][p.model_rows("a")] = cc.w_dec_a.detach().float().cpu()
        dec[1][p.model_rows("b")] = cc.w_dec_b.detach().float().cpu()
        bias = torch.stack([cc.b_dec_a.detach(), cc.b_dec_b.detach()]).float().cpu()
    unit = normalizer.scale_a == 1.0 and normalizer.scale_b == 1.0
    return PaperCrosscoder(
        encoder_weight=enc,
        encoder_bias=cc.b_enc.detach().float().cpu().clone(),
        decoder_weight=dec,
        decoder_bias=bias,
        threshold=float(threshold[0]) if threshold.numel() else -1.0,
        k=int(k),
        n_a_exclusive=p.n_a_exclusive,
        n_b_exclusive=p.n_b_exclusive,
        activation_mean=None if unit else torch.zeros(2, d),
        activation_global_scale=None
        if unit
        else torch.tensor([normalizer.scale_a, normalizer.scale_b]),
    )


# -- the commands -----------------------------------------------------------------------


@dataclass
class Converted:
    """What an import or export wrote."""

    out: Path
    partition: Partition
    d: int
    k: int
    normalised: bool
    threshold: float = 0.0  # the inference threshold (negative: never learned)


def import_paper(
    source: str | Path, out: str | Path, *, models: dict[str, Any] | None = None
) -> Converted:
    """Write the paper-format crosscoder at `source` (a file, a folder, or a Hub location
    hf://OWNER/NAME of a folder) as a modeldiff run directory `out` (analyse it with
    `modeldiff analyze --run OUT`); `models` is a store's "models" entry (the pair it was
    trained on), recorded so analysis refuses another pair."""
    location = str(source) if parse_ref(source) else str(Path(source).resolve())
    # From the Hub only the paper's own files (read_paper refuses a folder without them).
    paper_files = (PAPER_WEIGHTS_FILE, PAPER_CONFIG_FILE, PROVENANCE_FILE, *PAPER_TORCH_FILES,
                   "checkpoint_*.pt")  # fmt: skip
    source, out = resolve_run(source, paper_files), Path(out)
    paper = read_paper(source)
    cc, normalizer = to_crosscoder(paper)
    # A folder `export_paper` wrote says which models it came from, and its scale factors
    # before the float32 of the paper's buffer rounded them.
    provenance = _read_config((source if source.is_dir() else source.parent) / PROVENANCE_FILE)
    models = models or provenance.get("models")
    _check_widths(models, paper.d, source)
    normalizer = _exact_scales(normalizer, provenance.get("normalizer"))
    clear_run(out)  # an old run's checkpoints must not outlive it; refuses foreign folders
    p = cc.partition
    save_crosscoder(
        out,
        cc,
        normalizer,
        crosscoder_config={
            "d_a": paper.d,
            "d_b": paper.d,
            "n_features": p.n_features,
            "architecture": p.architecture.value,
            "a_exclusive": p.n_a_exclusive,
            "b_exclusive": p.n_b_exclusive,
            "score_weighting": "sum",
        },
        imported={
            "format": PAPER_FORMAT,
            "source": location,
            "k": paper.k,
            "threshold": paper.threshold,
            "input_normaliser": paper.activation_mean is not None,
            "config": paper.config,
        },
        **({"models": models} if models else {}),
    )
    return Converted(out, p, paper.d, paper.k, paper.activation_mean is not None, paper.threshold)


def _check_widths(models: dict[str, Any] | None, d: int, source: Path) -> None:
    """Refuse a model pair (a store's) whose widths are not the crosscoder's."""
    for side, spec in (models or {}).items():
        width = (spec or {}).get("d_model")
        if width is not None and int(width) != d:
            raise PaperFormatError(
                f"{source} has width {d} but model {side.upper()} of the given store has "
                f"{width}; give the store of the model pair it was trained on"
            )


def _exact_scales(normalizer: Normalizer, recorded: Any) -> Normalizer:
    """`recorded` (a provenance file's scale factors) where they round to `normalizer`'s."""
    try:
        exact = Normalizer(float(recorded["scale_a"]), float(recorded["scale_b"]))
    except (TypeError, KeyError, ValueError):
        return normalizer
    as_stored = torch.tensor([exact.scale_a, exact.scale_b], dtype=torch.float32).tolist()
    return exact if as_stored == [normalizer.scale_a, normalizer.scale_b] else normalizer


def run_k(header: dict[str, Any]) -> int | None:
    """BatchTopK's k a run was trained with (imported runs: the paper's)."""
    k = (header.get("train_config") or {}).get("k")
    if k is None:
        k = (header.get("imported") or {}).get("k")
    return None if k is None else int(k)


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier `export_paper` (its provenance file says so)."""
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(provenance, dict) and "exported_from" in provenance


def export_paper(run_dir: str | Path, out: str | Path) -> Converted:
    """Write the crosscoder of run `run_dir` in the paper's format into the folder `out`."""
    out = Path(out)
    folder = resolve_run(run_dir)  # a Hub location (hf://OWNER/NAME) is downloaded first
    cc, normalizer, header = load_crosscoder(folder)
    k = run_k(header)
    if k is None:
        raise PaperFormatError(f"{run_dir} records no k (train_config.k); train it again")
    paper = from_crosscoder(cc, normalizer, k, source=str(run_dir))
    if out.exists() and (not out.is_dir() or has_crosscoder(out) or (out / WEIGHTS_FILE).exists()):
        raise CheckpointError(
            f"refusing to write into {out}: it is a file or a modeldiff run; choose a new folder"
        )
    # Replace only an earlier export's files, never another tool's model.safetensors or
    # config.json.
    taken = [
        name for name in (PAPER_WEIGHTS_FILE, PAPER_CONFIG_FILE, PROVENANCE_FILE)
        if (out / name).exists()
    ]  # fmt: skip
    if taken and not _is_export(out):
        raise CheckpointError(
            f"refusing to write into {out}: its {', '.join(taken)} was not written by "
            "`modeldiff export-paper`; choose a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out / PAPER_WEIGHTS_FILE, paper.state_dict())
    config = paper.constructor_config()
    atomic_write_text(out / PAPER_CONFIG_FILE, json.dumps(config, indent=2))
    provenance = {
        "exported_from": str(run_dir) if parse_ref(run_dir) else str(folder.resolve()),
        "class": PAPER_CLASS if (paper.n_a_exclusive or paper.n_b_exclusive) else STANDARD_CLASS,
        "layers": {"0": "model A", "1": "model B"},
        "partition": paper.partition.to_dict(),
        "normalizer": normalizer.to_dict(),
        **{key: header[key] for key in ("models", "metrics", "train_config") if key in header},
    }
    atomic_write_text(out / PROVENANCE_FILE, json.dumps(provenance, indent=2))
    return Converted(
        out, paper.partition, paper.d, k, paper.activation_mean is not None, paper.threshold
    )
