"""Sources mixed by weight, streams shuffled through a buffer, and exact duplicates dropped.

`Mixture` interleaves sources so that each one's share of the content characters emitted
tracks its weight (the paper mixes pretraining text and chat 50/50).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence

from engine.errors import ConfigError
from engine.harvest.text_documents import Document, TextSource


class Mixture:
    """Sources interleaved so each one's share of content characters tracks its weight.

    Deterministic: the next document always comes from the source with the fewest characters
    emitted per unit of weight (ties go to the earlier source). An exhausted source drops out
    and the others go on, or starts over with `cycle`. `shuffle_buffer` > 0 shuffles each
    source's stream through a buffer of that many documents, seeded by `seed`.
    """

    def __init__(
        self,
        sources: Sequence[TextSource],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        cycle: bool = False,
        shuffle_buffer: int = 0,
        max_chars: int | None = None,
        name: str = "mixture",
    ) -> None:
        self.sources = list(sources)
        self.weights = _normalized(weights, len(self.sources))
        self.seed, self.cycle, self.shuffle_buffer = seed, cycle, shuffle_buffer
        # A harvest that truncates documents reads at most this much of each: count only that.
        self.max_chars = max_chars
        self.name = name
        self.chars = [0] * len(self.sources)  # content characters emitted, latest pass

    def documents(self) -> Iterator[Document]:
        """The interleaved documents, until every source is exhausted."""
        streams = [self._stream(i) for i in range(len(self.sources))]
        self.chars = [0] * len(self.sources)
        alive = list(range(len(self.sources)))
        while alive:
            i = min(alive, key=lambda k: self.chars[k] / self.weights[k])
            doc = next(streams[i], None)
            if doc is None:
                alive.remove(i)
                continue
            self.chars[i] += min(doc.n_chars, self.max_chars or doc.n_chars)
            yield doc

    @property
    def shares(self) -> list[float]:
        """Each source's share of the characters emitted so far (0 before any)."""
        total = sum(self.chars)
        return [c / total if total else 0.0 for c in self.chars]

    def _stream(self, i: int) -> Iterator[Document]:
        """Source i's documents (shuffled if asked), started over when cycling."""
        while True:
            empty = True
            docs = self.sources[i].documents()
            for doc in shuffled(docs, self.shuffle_buffer, self.seed + i):
                empty = False
                yield doc
            if not self.cycle or empty:
                return


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights checked (one positive number per source) and scaled to sum to 1."""
    if n == 0:
        raise ConfigError("a mixture needs at least one source")
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise ConfigError(f"a mixture of {n} sources needs {n} weights, got {len(weights)}")
    ok = all(isinstance(w, int | float) and math.isfinite(w) and w > 0 for w in weights)
    if not ok:
        raise ConfigError(f"mixture weights must be positive numbers, got {weights}")
    return [w / sum(weights) for w in weights]


def shuffled(documents: Iterable[Document], buffer: int, seed: int = 0) -> Iterator[Document]:
    """Documents shuffled through a buffer of `buffer` (0: in order), deterministic per seed."""
    if buffer <= 0:
        yield from documents
        return
    rng = random.Random(seed)
    pool: list[Document] = []
    for doc in documents:
        if len(pool) < buffer:
            pool.append(doc)
            continue
        k = rng.randrange(buffer)
        yield pool[k]
        pool[k] = doc
    rng.shuffle(pool)
    yield from pool


def content_hash(doc: Document) -> bytes:
    """A 16-byte digest of a document's content: its text, or its messages with their roles."""
    digest = hashlib.blake2b(digest_size=16)
    if doc.messages is not None:
        digest.update(b"chat\0" + json.dumps([[m.role, m.content] for m in doc.messages]).encode())
    else:
        digest.update(b"text\0" + (doc.text or "").encode("utf-8", "surrogatepass"))
    return digest.digest()


class Dedupe:
    """Documents without exact repeats of earlier content; `dropped` counts the repeats.

    Only the 16-byte content digests are kept, so a long stream costs little memory.
    """

    def __init__(self, documents: Iterable[Document]) -> None:
        self._documents = documents
        self.dropped = 0

    def __iter__(self) -> Iterator[Document]:
        seen: set[bytes] = set()
        self.dropped = 0
        for doc in self._documents:
            key = content_hash(doc)
            if key in seen:
                self.dropped += 1
                continue
            seen.add(key)
            yield doc


def dedupe(documents: Iterable[Document]) -> Dedupe:
    """Iterate `documents` without exact duplicates; the result's `dropped` counts them."""
    return Dedupe(documents)
