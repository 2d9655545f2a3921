"""Sharded, resumable, crash-safe store of paired residual-stream activations.

A store is a directory::

    manifest.json                  models, data config, shards, progress, statistics
    shards/shard-000000.safetensors

A harvest split across N processes (ranks) writes one manifest per rank instead of
`manifest.json`, and prefixes its files with the rank, so no two ranks write the same file::

    ranks/manifest-000-of-002.json     rank 0's manifest (the same format)
    shards/rank-000-shard-000000.safetensors
    documents/rank-000-part-000000.jsonl

Readers (`read_manifest`, `ActivationStore`) merge the rank manifests into one view.

This package's top level is the store's public face; the parts live in its modules:

    manifest   the manifest: format, one file per rank, checks on loading and resuming
    layout     where a harvest may write, and what --fresh clears
    shards     what a shard holds (windows and their tensors), and its SHA256 check
    stats      windows done (intervals), counters and activation statistics
    writer     StoreWriter: one atomic shard at a time, crash-safe and resumable
    merge      the rank manifests of a split harvest merged into one
    reader     read_manifest and ActivationStore: batches, shards, window contexts
"""

from engine.activations.manifest import StoreError
from engine.activations.reader import ActivationStore, read_manifest
from engine.activations.writer import StoreWriter

__all__ = ["ActivationStore", "StoreError", "StoreWriter", "read_manifest"]
