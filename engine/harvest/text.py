"""Text to harvest: the source a config names (a demo corpus, a hub dataset, a local path, or
a table of options).

The parts live beside it:

    text_documents   Document, Message, the TextSource protocol, records -> documents
    text_files       local .txt, .jsonl (.jsonl.gz) and parquet files
    text_hub         Hugging Face datasets, streamed
    text_demo        the offline demo corpora (chitchat, pydoc, kjv) and their mix
    text_mixture     sources mixed by weight, shuffled, and deduplicated
    chat             a Document rendered as the text one model reads (chat templates)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.errors import ConfigError
from engine.harvest.text_demo import DEMO_SOURCES
from engine.harvest.text_documents import SPEC_FORMS, TextSource
from engine.harvest.text_files import file_source
from engine.harvest.text_hub import HubDataset
from engine.harvest.text_mixture import Mixture

HUB = {
    "fineweb": {"dataset": "HuggingFaceFW/fineweb", "config": "sample-10BT", "text_field": "text"},
    "lmsys": {"dataset": "lmsys/lmsys-chat-1m", "messages_field": "conversation"},
}
PATH_KEYS = ("path", "text_field", "messages_field", "name")
DATASET_KEYS = ("dataset", "config", "split", "text_field", "messages_field", "name")


def source_from_spec(spec: str | dict[str, Any]) -> TextSource:
    """The source a config names: a demo or hub shorthand, a path, or a table of options."""
    if isinstance(spec, dict):
        return _source_from_dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"a text source is {SPEC_FORMS}; got {spec!r}")
    if spec.startswith("demo:"):
        kind = spec.removeprefix("demo:")
        if kind not in DEMO_SOURCES:
            choices = ", ".join(f"demo:{k}" for k in DEMO_SOURCES)
            raise ConfigError(f"unknown demo source {spec!r}; choose one of {choices}")
        return DEMO_SOURCES[kind]()
    if spec in HUB:
        return HubDataset(name=spec, **HUB[spec])
    return file_source(spec)


def mixture_of(
    specs: Sequence[str | dict[str, Any]], weights: Sequence[float] | None, check: bool = False
) -> Mixture:
    """The Mixture of the sources `specs` name; with `check`, a local source that holds no
    text is refused now (before models load), not found to give 0 pairs later."""
    mixture = Mixture([source_from_spec(s) for s in specs], weights)
    for source in mixture.sources if check else ():
        if hasattr(source, "check"):
            source.check()
    return mixture


def _source_from_dict(spec: dict[str, Any]) -> TextSource:
    """A source from {path = ...} or {dataset = ...} options."""
    if "path" in spec:
        _check_keys(spec, PATH_KEYS)
        return file_source(**spec)
    if "dataset" in spec:
        _check_keys(spec, DATASET_KEYS)
        return HubDataset(**spec)
    raise ConfigError(f"a text source table needs 'path' or 'dataset'; a source is {SPEC_FORMS}")


def _check_keys(spec: dict[str, Any], valid: Sequence[str]) -> None:
    """Reject unknown keys (a typo must not become a default) and non-string values."""
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(f"unknown text source option(s) {unknown}; valid: {', '.join(valid)}")
    for key, value in spec.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"text source option {key!r} must be a string, got {value!r}")
