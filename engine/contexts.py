"""A feature's activations on one window of text, independent of either tokenizer.

The text is split into the aligned spans of the window (each span ends where both models'
tokens end), and the feature has one activation per span. Either model's own tokenization
can be shown on top from the window's token offsets, kept in the database.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

KINDS = ("top", "quantile", "random")


@dataclass(frozen=True)
class Context:
    """A window of text with one feature's activation on each aligned span."""

    text: str
    spans: np.ndarray  # int [k, 2]: (start, end) characters of `text`, in order
    acts: np.ndarray  # float [k]: the feature's activation on each span (0 = inactive)
    window_id: int = -1  # the window's index in the activation store
    doc_id: str = ""
    kind: str = "top"  # top | quantile | random
    rank: int = 0  # 0 = highest within its kind (and quantile bin)
    quantile: int | None = None  # bin index for kind "quantile" (0 = lowest activations)

    @property
    def max_act(self) -> float:
        """The largest activation in the window (0 for an empty one)."""
        return float(self.acts.max()) if len(self.acts) else 0.0

    def segment(self) -> Context:
        """The same context cut to the text its spans cover (for prompts and compact views)."""
        if not len(self.spans):
            return self
        lo, hi = int(self.spans[0, 0]), int(self.spans[-1, 1])
        return replace(self, text=self.text[lo:hi], spans=self.spans - lo)

    def pieces(self) -> list[tuple[str, float]]:
        """The text cut at span boundaries as (piece, activation) pairs covering all of it;
        text outside any span gets activation 0."""
        out: list[tuple[str, float]] = []
        pos = 0
        for (start, end), act in zip(self.spans.tolist(), self.acts.tolist(), strict=True):
            if start > pos:
                out.append((self.text[pos:start], 0.0))
            out.append((self.text[start:end], float(act)))
            pos = max(pos, end)
        if pos < len(self.text):
            out.append((self.text[pos:], 0.0))
        return out
