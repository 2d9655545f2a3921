"""Loading the demo models' files needs no network, and says so per call
(local_files_only), not by switching the whole process offline: a later Hub download in
the same process (an hf:// run, a dataset) still works."""

from __future__ import annotations

import os

import pytest


def test_converting_a_demo_tokenizer_leaves_the_process_online(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from engine.models.tokenizers import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tokenizer = load_tokenizer("smollm2", cache_dir=tmp_path / "smollm2")  # from its GGUF
    assert tokenizer("a river")["input_ids"]
    assert "HF_HUB_OFFLINE" not in os.environ
