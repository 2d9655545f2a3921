"""Hugging Face datasets as sources, streamed with `datasets` (FineWeb, LMSYS-Chat-1M, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from engine.errors import ConfigError
from engine.harvest.text_documents import Document, chat_fields, record_document


class HubDataset:
    """A Hugging Face dataset streamed with `datasets` (e.g. FineWeb, LMSYS-Chat-1M)."""

    def __init__(
        self,
        dataset: str,
        config: str | None = None,
        split: str = "train",
        text_field: str | None = "text",
        messages_field: str | None = None,
        name: str | None = None,
    ) -> None:
        _import_datasets(dataset)  # fail at configuration time, not mid-harvest
        self.dataset, self.config, self.split = dataset, config, split
        self.text_field = text_field
        self.chat_fields = chat_fields(messages_field)
        self.name = name or dataset

    def documents(self) -> Iterator[Document]:
        """Documents in stream order (ids "<name>:<row index from 0>")."""
        rows = _hub_rows(self.dataset, self.config, self.split)
        for row, record in enumerate(rows):
            where = f"{self.dataset} row {row}"
            doc = record_document(
                record, f"{self.name}:{row}", self.name, self.text_field, self.chat_fields, where
            )
            if doc is not None:
                yield doc


def _import_datasets(dataset: str) -> Any:
    """The `datasets` module, or an error naming the install command."""
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise ConfigError(
            f"streaming {dataset} needs the datasets package; run: pip install datasets"
        ) from None


def _hub_rows(dataset: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a streamed hub dataset; unreachable or gated datasets raise a ConfigError."""
    datasets = _import_datasets(dataset)
    try:
        stream = iter(datasets.load_dataset(dataset, config, split=split, streaming=True))
        first = next(stream, None)  # streaming connects lazily: reach the hub here
    except Exception as err:  # offline, gated, unknown name or config all surface here
        raise ConfigError(
            f"cannot reach dataset {dataset!r} (config {config!r}) on the Hugging Face hub "
            f"({type(err).__name__}: {str(err)[:200]}); check the network and the name, and for "
            "a gated dataset accept its terms and log in (hf auth login); or use local files "
            "(a .txt/.jsonl/.parquet path) or the offline demo sources (demo:chitchat, "
            "demo:pydoc, demo:kjv)"
        ) from err
    if first is not None:
        yield first
        yield from stream
