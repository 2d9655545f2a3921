"""Trained runs on the Hugging Face Hub: where a run argument points, pushing a run, its card.

Every command that reads a run directory also reads a run on the Hub. The rule, which
no local path can match by accident: a location starting with ``hf://`` is a Hub model
repository, anything else is a local path::

    hf://OWNER/NAME                   the repository's main branch
    hf://OWNER/NAME@REVISION          a branch, tag or commit
    hf://OWNER/NAME[@REVISION]/PATH   a run stored in a folder of the repository

A Hub run is downloaded once into the Hugging Face cache (``HF_HOME``, by default
``~/.cache/huggingface``) and read from there; with ``HF_HUB_OFFLINE=1`` the cached copy is
used. `resolve_run` is the one place that turns a location into a directory.

`push_run` uploads a run directory's final files (weights, description, feature statistics)
with a generated model card (`model_card`). Importing this module loads nothing of the
engine but its errors (so the checkpoint module can use `resolve_run`); `push_run` reads the
run through `engine.crosscoder.checkpoint`, and `huggingface_hub` is imported only when the
Hub is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from engine.errors import UserError

HUB_SCHEME = "hf://"
# A repository owner or name as the Hub accepts them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LIBRARY_NAME = "modeldiff"
CARD_FILE = "README.md"
# Text sources of a harvest that are Hub datasets (engine.harvest.text's names).
HUB_DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "lmsys": "lmsys/lmsys-chat-1m"}


class HubError(UserError, RuntimeError):
    """A Hub location is malformed, or the Hub refused or could not serve a request."""


@dataclass(frozen=True)
class HubRef:
    """A run on the Hub: repository, revision (None: main) and folder in it ("": root)."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{HUB_SCHEME}{self.repo_id}{revision}{'/' + self.path if self.path else ''}"

    @property
    def name(self) -> str:
        """The run's name: its folder's, else the repository's."""
        return self.path.rsplit("/", 1)[-1] if self.path else self.repo_id.split("/")[1]


def parse_ref(location: str | Path) -> HubRef | None:
    """The Hub run `location` names, or None for a local path (no ``hf://`` prefix)."""
    text = str(location) if isinstance(location, str) else None
    if text is None or not text.startswith(HUB_SCHEME):
        return None  # a Path object is always local (and would have folded "//" anyway)
    rest = text[len(HUB_SCHEME) :]
    owner, _, tail = rest.partition("/")
    name, _, path = tail.partition("/")
    name, _, revision = name.partition("@")
    path = path.strip("/")
    if (
        not _NAME.fullmatch(owner)
        or not _NAME.fullmatch(name)
        or (_, revision) == ("@", "")
        or ".." in path.split("/")
    ):
        raise HubError(
            f"{text!r} is not a Hub location; write hf://OWNER/NAME, optionally with "
            "@REVISION after the name and /FOLDER after that"
        )
    return HubRef(f"{owner}/{name}", revision or None, path)


def repo_id(text: str) -> str:
    """`text` checked as a Hub repository id OWNER/NAME (an ``hf://`` prefix is allowed)."""
    bare = text.removeprefix(HUB_SCHEME)
    owner, _, name = bare.partition("/")
    if not (_NAME.fullmatch(owner) and _NAME.fullmatch(name)):
        raise HubError(f"{text!r} is not a Hub repository id; write OWNER/NAME")
    return bare


def run_name(location: str | Path) -> str:
    """The name a run at `location` goes by (its folder's, or its Hub repository's)."""
    ref = parse_ref(location)
    return ref.name if ref else Path(location).resolve().name


def resolve_run(
    location: str | Path,
    files: Sequence[str] | None = None,
    marker: str | None = None,
) -> Path:
    """The local directory of the run at `location`: the path itself, or the Hub run
    downloaded to (or already in) the Hugging Face cache.

    Only `files` (names or patterns in the run's folder; default: a modeldiff run's
    crosscoder.json, weights and feature statistics) are downloaded, never the whole
    repository, and only once `marker` (default crosscoder.json) is found there: a
    repository that is not a run is refused after one small file."""
    ref = parse_ref(location)
    if ref is None:
        return Path(location)
    if files is None:
        from engine.crosscoder.checkpoint import HEADER_FILE, RUN_FILES

        files, marker = RUN_FILES, HEADER_FILE
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(
            f"reading {ref} needs the huggingface_hub package: pip install huggingface_hub"
        ) from None
    prefix = f"{ref.path}/" if ref.path else ""

    def download(names: Sequence[str]) -> Path:
        patterns = [prefix + name for name in names]
        with _hub_errors(ref):
            root = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
        return Path(root) / ref.path if ref.path else Path(root)

    if marker is not None and not (download([marker]) / marker).is_file():
        raise HubError(
            f"{ref} is not a modeldiff run (no {marker} in it); give the repository, or "
            "hf://OWNER/NAME/FOLDER of the folder, that holds a pushed run"
        )
    folder = download(files)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(
            f"{ref.repo_id} has no folder {ref.path!r} with a run's files; give the folder "
            "that holds the run's crosscoder.json"
        )
    return folder


class _hub_errors:
    """Turns huggingface_hub's and the network's errors into a HubError naming the fix."""

    def __init__(self, ref: HubRef | str) -> None:
        self.ref = ref

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, UserError):
            return False
        from huggingface_hub import errors

        ref = self.ref
        repo = ref.repo_id if isinstance(ref, HubRef) else ref
        if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
            raise HubError(
                f"cannot reach the Hugging Face Hub for {repo} ({_first_line(err)}); check the "
                "network connection and run again"
            ) from None
        if isinstance(err, errors.RevisionNotFoundError):
            raise HubError(f"{repo} has no revision {getattr(ref, 'revision', None)!r}") from None
        if isinstance(err, errors.RepositoryNotFoundError):
            raise HubError(
                f"no model repository {repo} on the Hugging Face Hub, or it is private: check "
                "the name, or log in (`hf auth login` or HF_TOKEN) with access to it"
            ) from None
        if isinstance(err, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
            raise HubError(
                f"cannot reach the Hugging Face Hub for {repo} and it is not in the local "
                "cache; connect to the network (and unset HF_HUB_OFFLINE) and run again"
            ) from None
        if isinstance(err, errors.HfHubHTTPError):
            status = getattr(getattr(err, "response", None), "status_code", None)
            fix = (
                "log in with a token that may write to it (`hf auth login` or HF_TOKEN)"
                if status in (401, 403)
                else "check the repository and try again"
            )
            raise HubError(
                f"the Hub refused a request for {repo} ({_first_line(err)}); {fix}"
            ) from None
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- pushing ---------------------------------------------------------------------------


def publishable(value: Any) -> Any:
    """`value` (JSON: a run header, a store's data sources) with every local path cut to
    its last part: an absolute or home-relative path names the user's folders, which a
    published file must not carry. Hub ids, hf:// locations and plain names stay."""
    if isinstance(value, Mapping):
        return {key: publishable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [publishable(item) for item in value]
    if isinstance(value, str) and _local_path(value):
        return PurePath(value.replace("\\", "/")).name or "."
    return value


def _local_path(text: str) -> bool:
    """Whether `text` is an absolute or home-relative path of this or another machine."""
    return (
        text.startswith(("/", "~", "\\"))
        or bool(re.match(r"[A-Za-z]:[\\/]", text))
        or text.startswith(("./", "../"))
    )


def push_folder(
    folder: Path,
    files: Sequence[str],
    repo: str,
    card: str,
    *,
    private: bool = True,
    revision: str | None = None,
    message: str | None = None,
    contents: Mapping[str, bytes] | None = None,
) -> str:
    """Upload `files` (paths relative to `folder`), `contents` (name -> bytes, uploaded
    instead of a file of that name) and `card` as README.md to the model repository `repo`
    (created, private unless `private` is False, if missing) in one commit; returns the
    commit's URL. The token is HF_TOKEN's or the Hub login's (`hf auth login`)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    repo = repo_id(repo)
    api = HfApi(library_name=LIBRARY_NAME)
    contents = dict(contents or {})
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in files
        if name not in contents
    ]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        for name, data in contents.items()
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
    with _hub_errors(repo):
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:  # a commit to a branch that does not exist yet would be refused
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo,
            operations,
            commit_message=message or f"Upload {folder.name} with modeldiff",
            revision=revision,
            repo_type="model",
        )
    return commit.commit_url


def push_run(
    location: str | Path,
    repo: str,
    *,
    data: Mapping[str, Any] | None = None,
    private: bool = True,
    revision: str | None = None,
) -> str:
    """Upload the run at `location` (its crosscoder.json, crosscoder.safetensors and
    feature_stats.safetensors, not its training checkpoints) with a generated model card to
    the model repository `repo` (private unless `private` is False); `data` is the
    activation store's "data" entry for the card. crosscoder.json and the card carry no
    local paths (`publishable`). Returns the commit's URL."""
    import json

    from engine.crosscoder.checkpoint import HEADER_FILE, RUN_FILES, load_crosscoder

    repo = repo_id(repo)
    folder = resolve_run(location)
    _, _, header = load_crosscoder(folder)  # refuses a folder without a complete crosscoder
    files = [name for name in RUN_FILES if (folder / name).is_file()]
    header = publishable(header)
    card = model_card(header, repo, publishable(data) if data is not None else None)
    return push_folder(
        folder, files, repo, card, private=private, revision=revision,
        message=f"Upload crosscoder run {run_name(location)} with modeldiff",
        contents={HEADER_FILE: json.dumps(header, indent=2).encode()},  # as saved
    )  # fmt: skip


# -- the model card --------------------------------------------------------------------


def model_card(header: Mapping[str, Any], repo: str, data: Mapping[str, Any] | None = None) -> str:
    """README.md for a run pushed to `repo`: YAML metadata (library, tags, base models,
    datasets, the method) and a text naming the models, layers, partition sizes, method,
    metrics and the activation store's data sources (`data`: the store manifest's "data")."""
    from huggingface_hub import ModelCardData

    models = header.get("models") or {}
    partition = header.get("partition") or {}
    train = header.get("train_config") or {}
    imported = header.get("imported") or {}
    metrics = header.get("metrics") or {}
    method = _method(header)
    sources = list((data or {}).get("sources") or [])
    base_models = [
        m["name"]
        for m in (models.get("a") or {}, models.get("b") or {})
        if (m.get("source") or {}).get("kind") == "hub" and _is_repo_id(m.get("name"))
    ]
    datasets = [HUB_DATASETS[s] for s in sources if s in HUB_DATASETS]
    meta = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=["crosscoder", "model-diffing", "sparse-dictionary", "interpretability"]
        + (["dedicated-feature-crosscoder"] if header.get("architecture") == "dfc" else []),
        base_model=base_models or None,
        datasets=datasets or None,
        modeldiff=_without_none(
            {
                "architecture": header.get("architecture"),
                "method": method,
                "d_a": header.get("d_a"),
                "d_b": header.get("d_b"),
                "partition": dict(partition),
                "score_weighting": header.get("score_weighting"),
                "k": train.get("k", imported.get("k")),
                "models": {
                    side: {key: spec.get(key) for key in ("name", "class", "layer", "d_model")}
                    for side, spec in models.items()
                },
                "data_sources": sources or None,
            }
        ),
    )
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"A {_ARCH.get(str(header.get('architecture')), 'crosscoder')} made with modeldiff "
        "for cross-architecture model diffing: one sparse dictionary of features over the "
        "paired residual-stream activations of two language models, each feature exclusive "
        "to one model or shared by both.",
        "",
        "## Models",
        "",
        "| | model | layer | width |",
        "| --- | --- | --- | --- |",
    ]
    for side in ("a", "b"):
        spec = models.get(side) or {}
        width = spec.get("d_model") or header.get(f"d_{side}")
        layer = spec.get("layer")
        name = spec.get("name") or _paper_model(imported, side)
        lines.append(
            f"| {side.upper()} | {name or 'not recorded'} | "
            f"{'not recorded' if layer is None else layer} | {width} |"
        )
    lines += ["", "## Method", "", *_method_lines(header, method), "", "## Metrics", ""]
    shown = [(label, metrics[key]) for key, label in _METRICS if key in metrics]
    if shown:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {_number(value)} |" for label, value in shown]
    else:
        lines.append("Not recorded with the run.")
    lines += ["", "## Training data", ""]
    if sources:
        lines.append("Activations were harvested from these text sources:")
        lines.append("")
        lines += [f"- `{s}`" for s in sources]
        extra = {k: data[k] for k in ("weights", "context_length", "alignment") if data.get(k)}
        if extra:
            lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items())]
    else:
        lines.append("The activation store's data sources were not given when this was pushed.")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"modeldiff analyze --run hf://{repo} --store STORE --db results.duckdb",
        f"modeldiff export-paper hf://{repo} --out paper-format/   # the paper's code's format",
        "```",
        "",
        "`crosscoder.json` describes the crosscoder (partition, normalisation factors, training "
        "settings and metrics), `crosscoder.safetensors` holds its weights and "
        "`feature_stats.safetensors` per-feature decoder norms.",
        "",
    ]
    return "\n".join(lines)


_ARCH = {
    "dfc": "Dedicated Feature Crosscoder (DFC)",
    "standard": "standard crosscoder",
    "dsf": "crosscoder with designated-shared features (DSF)",
}
_METRICS = (
    ("fve", "FVE (joint)"),
    ("fve_a", "FVE model A"),
    ("fve_b", "FVE model B"),
    ("l0", "L0 (active features per token)"),
    ("dead_frac", "dead features"),
    ("steps", "training steps"),
    ("tokens", "training tokens"),
)


def _method(header: Mapping[str, Any]) -> str:
    """How the partitions were trained: reassignment, paper mode, or imported."""
    imported = header.get("imported") or {}
    if imported:
        return f"imported from {imported.get('format', 'another format')}"
    train = header.get("train_config") or {}
    if header.get("architecture") != "dfc":
        return "batchtopk"
    if train.get("reassign_every", 0):
        adaptive = "adaptive partitions" if train.get("adapt_partitions") else "fixed sizes"
        return f"reassignment ({adaptive})"
    return "paper mode"


def _method_lines(header: Mapping[str, Any], method: str) -> list[str]:
    partition = header.get("partition") or {}
    train = header.get("train_config") or {}
    imported = header.get("imported") or {}
    normalizer = header.get("normalizer") or {}
    n = sum(partition.values()) or 1
    rows = [
        "| setting | value |",
        "| --- | --- |",
        f"| architecture | {header.get('architecture')} |",
        f"| method | {method} |",
        f"| features | {sum(partition.values())} |",
    ]
    for key, label in (
        ("n_a_exclusive", "A-exclusive"),
        ("n_b_exclusive", "B-exclusive"),
        ("n_shared", "shared"),
        ("n_designated", "designated-shared"),
    ):
        if partition.get(key):
            rows.append(f"| {label} | {partition[key]} ({partition[key] / n:.1%}) |")
    k = train.get("k", imported.get("k"))
    rows.append(f"| BatchTopK k | {k if k is not None else 'not recorded'} |")
    weighting = header.get("score_weighting", "sum")
    rows.append(f"| ranking | relu(pre) x {weighting} of decoder norms |")
    for key in ("steps", "batch_size", "lr", "reassign_every", "equal_score_steps"):
        if key in train:
            rows.append(f"| {key} | {train[key]} |")
    if normalizer:
        rows.append(
            f"| input scale factors | A {_number(normalizer.get('scale_a'))}, "
            f"B {_number(normalizer.get('scale_b'))} |"
        )
    return rows


def _paper_model(imported: Mapping[str, Any], side: str) -> str | None:
    """What an imported run's training config says about a model (its lm_name)."""
    trainer = (imported.get("config") or {}).get("trainer") or {}
    name = trainer.get("lm_name")
    return f"{name} (layer {trainer.get('layer')}, index {'01'[side == 'b']})" if name else None


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_repo_id(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    owner, _, rest = name.partition("/")
    return bool(_NAME.fullmatch(owner) and _NAME.fullmatch(rest))
