"""The activation store: round trip, resume bookkeeping, corruption, shuffled batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.activations import ActivationStore, StoreError, StoreWriter
from engine.activations.manifest import MANIFEST, store_dtype
from engine.activations.reader import read_manifest
from engine.activations.shards import WindowRecord
from engine.activations.stats import add_interval, median_norms, remove_interval

D_A, D_B = 6, 4
HEADER = {"models": {"a": {"d_model": D_A}, "b": {"d_model": D_B}}, "data": {"ctx": 8}}


def window(index: int, k: int) -> WindowRecord:
    """A window of k pairs over a short text; activations come from `acts`."""
    text = f"w{index}: " + " ".join("tok" for _ in range(k))
    ids = np.arange(k + 1, dtype=np.int64) + index
    offsets = np.stack([np.arange(k + 1), np.arange(k + 1) + 1], 1)
    pos = np.arange(1, k + 1)
    spans = np.stack([np.arange(k), np.arange(k) + 1], 1)
    return WindowRecord(
        index,
        f"doc{index}",
        "unit",
        3 * index,
        text,
        ids,
        offsets,
        ids[::-1].copy(),
        offsets,
        pos,
        pos,
        spans,
    )


def acts(index: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations whose first column encodes (window, pair) so rows are identifiable."""
    row = torch.arange(k, dtype=torch.float32)
    x_a = torch.randn(k, D_A, generator=torch.Generator().manual_seed(index))
    x_b = torch.randn(k, D_B, generator=torch.Generator().manual_seed(index + 999))
    # Small integers, exact in every store dtype.
    x_a[:, 0], x_a[:, 1] = index, row
    x_b[:, 0], x_b[:, 1] = index, row
    return x_a, x_b


def row_ids(x: torch.Tensor) -> torch.Tensor:
    """The (window, pair) identity `acts` wrote into the rows, as window * 1000 + pair."""
    return x[:, 0].float() * 1000 + x[:, 1].float()


def fill(path, windows: range, k: int = 5, dtype: str = "float32", shard_pairs: int = 12):
    writer = StoreWriter(path, HEADER, dtype=dtype, shard_pairs=shard_pairs)
    for i in windows:
        if writer.is_done(i):
            continue
        if i % 7 == 3:
            writer.skip(window(i, 0), {"windows": 1, "duplicate_windows": 1})
        else:
            writer.add(window(i, k), *acts(i, k), {"windows": 1, "dropped_a": {"x": 1}})
    return writer


def all_rows(store: ActivationStore) -> torch.Tensor:
    return torch.cat([row_ids(store.load_shard(i, ("a",))["a"]) for i in range(len(store.shards))])


def test_round_trip_keeps_every_pair_once_with_its_window(tmp_path):
    writer = fill(tmp_path, range(20))
    manifest = writer.close(complete=True)
    store = ActivationStore(tmp_path)
    kept = [i for i in range(20) if i % 7 != 3]
    assert len(store) == 5 * len(kept) == manifest["stats"]["count"]
    expect = sorted(i * 1000 + r for i in kept for r in range(5))
    assert sorted(all_rows(store).tolist()) == expect
    assert manifest["progress"]["done_windows"] == [[0, 20]]
    assert manifest["alignment"]["windows"] == 20
    assert manifest["alignment"]["duplicate_windows"] == 3
    assert manifest["alignment"]["dropped_a"] == {"x": 17}
    windows = store.windows(0)
    first = windows[0]
    assert first["doc_id"] == "doc0" and first["text"] == window(0, 5).text
    assert first["ids_a"].tolist() == window(0, 5).ids_a.tolist()
    assert len(first["rows"]) == 5
    shard = store.load_shard(0)
    assert shard["pair_span"][:5].tolist() == window(0, 5).spans.tolist()


def test_statistics_match_the_data(tmp_path):
    writer = fill(tmp_path, range(30))
    manifest = writer.close()
    store = ActivationStore(tmp_path)
    x_a = torch.cat([store.load_shard(i, ("a",))["a"] for i in range(len(store.shards))])
    assert torch.allclose(torch.tensor(manifest["stats"]["mean_a"]), x_a.double().mean(0).float())
    true_median = x_a.norm(dim=1).median().item()
    assert median_norms(manifest)[0] == pytest.approx(true_median, rel=0.3)


def test_resume_after_a_lost_buffer_neither_duplicates_nor_loses(tmp_path):
    writer = fill(tmp_path, range(13))
    # Killed here: the pending (unflushed) windows are lost, the shards are not.
    done = read_manifest(tmp_path)["progress"]["done_windows"]
    assert done and done[0][0] == 0 and done[-1][1] < 13
    del writer
    fill(tmp_path, range(20)).close(complete=True)
    store = ActivationStore(tmp_path)
    kept = [i for i in range(20) if i % 7 != 3]
    assert sorted(all_rows(store).tolist()) == sorted(i * 1000 + r for i in kept for r in range(5))
    assert read_manifest(tmp_path)["alignment"]["windows"] == 20


def test_resume_refuses_other_settings_and_fresh_starts_over(tmp_path):
    fill(tmp_path, range(5)).close()
    other = {**HEADER, "data": {"ctx": 16}}
    with pytest.raises(StoreError, match=r"different 'data'.*--fresh"):
        StoreWriter(tmp_path, other, dtype="float32")
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path, HEADER, dtype="bfloat16")
    writer = StoreWriter(tmp_path, other, dtype="float32", fresh=True)
    assert writer.pairs == 0 and not list((tmp_path / "shards").glob("*"))


def test_a_corrupt_shard_is_reported_not_used_and_harvested_again(tmp_path):
    fill(tmp_path, range(20)).close(complete=True)
    manifest = read_manifest(tmp_path)
    victim = tmp_path / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = ActivationStore(tmp_path)
    assert store.verify() == [f"{manifest['shards'][1]['file']}: corrupt (SHA256 mismatch)"]
    with pytest.raises(StoreError, match="corrupt"):
        store.load_shard(1)
    # The reader leaves it out and says so.
    seen = {int(i) // 1000 for a, _ in _epoch(store, 5) for i in row_ids(a)}
    bad_windows = {i for s, e in manifest["shards"][1]["windows"] for i in range(s, e)}
    assert not seen & bad_windows and store.bad_shards
    # Resuming the harvest forgets the shard and redoes exactly its windows.
    writer = fill(tmp_path, range(20))
    assert writer.bad_shards
    writer.close(complete=True)
    store = ActivationStore(tmp_path)
    assert store.verify() == []
    kept = [i for i in range(20) if i % 7 != 3]
    assert sorted(all_rows(store).tolist()) == sorted(i * 1000 + r for i in kept for r in range(5))


def _epoch(store: ActivationStore, batch_size: int):
    per_epoch = len(store) // batch_size
    batches = store.batches(batch_size, 0, seed=3)
    return [next(batches) for _ in range(per_epoch)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_batches_cover_each_pair_once_per_epoch_in_a_seeded_order(tmp_path, dtype):
    fill(tmp_path, range(40), dtype=dtype).close()
    # A tiny buffer forces many groups, so batches straddle group boundaries.
    store = ActivationStore(tmp_path, buffer_bytes=40 * (D_A + D_B) * 4)
    assert len(store._groups(0, 3)) > 3
    batches = _epoch(store, 7)
    ids = torch.cat([row_ids(a) for a, _ in batches])
    assert batches[0][0].dtype == store_dtype(dtype) and len(ids) == (len(store) // 7) * 7
    assert len(set(ids.tolist())) == len(ids)  # no pair twice in an epoch
    for a, b in batches:
        assert torch.equal(row_ids(a), row_ids(b))  # rows stay paired
    assert ids.tolist() != sorted(ids.tolist())  # shuffled
    again = torch.cat([row_ids(a) for a, _ in _epoch(store, 7)])
    assert torch.equal(ids, again)


def test_batches_resume_at_any_step_exactly(tmp_path):
    fill(tmp_path, range(40)).close()
    store = ActivationStore(tmp_path, buffer_bytes=40 * (D_A + D_B) * 4)
    full = store.batches(9, 0, seed=1)
    reference = [next(full)[0] for _ in range(40)]  # more than one epoch
    for start in (1, 5, 17, 33):
        resumed = store.batches(9, start, seed=1)
        for step in range(start, min(start + 8, 40)):
            assert torch.equal(next(resumed)[0], reference[step]), (start, step)


def test_errors_are_clear(tmp_path):
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="unknown store dtype"):
        StoreWriter(tmp_path, HEADER, dtype="int8")
    fill(tmp_path, range(3)).close()
    with pytest.raises(StoreError, match="exceeds"):
        next(ActivationStore(tmp_path).batches(10_000))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="newer modeldiff"):
        read_manifest(tmp_path)


def test_intervals():
    assert add_interval([[0, 3]], 3, 4) == [[0, 4]]
    assert add_interval([[0, 3], [5, 6]], 3, 5) == [[0, 6]]
    assert remove_interval([[0, 10]], 3, 5) == [[0, 3], [5, 10]]
    assert remove_interval([[0, 3]], 3, 5) == [[0, 3]]
