"""Offset alignment vs the paper's Algorithm 1 on the same offline texts.

Texts: Python's documentation topics (technical prose, cut into chunks at paragraph breaks)
and chitchat-dataset conversations as plain transcripts filling the rest, plus a few
hand-written hard cases. Both algorithms get
the same tokenizations (SmolLM2 and Gemma 3 demo tokenizers); tokenizing is timed apart.

    python benchmarks/align.py --docs 2000
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from engine.harvest.align import Alignment, Tokenized, align, align_windows, tokenize
from engine.models.tokenizers import load_tokenizer

# Characters the paper names as Algorithm 1's failure cases, in short snippets.
HARD = [
    "She said “like this” and ‘that’ — didn’t she…",
    "Shipped it 👩‍💻🎉 at last 🎉🎉 👍🏽",
    "┌─┐\n│x│\n└─┘",
    "안녕하세요, 세계! 반갑습니다.",
    "中文字符测试，日本語のテキスト。",
    "x → y ⇒ z, ∀ε>0 ∃δ",
    "See https://example.com/a/b?q=1&r=%20x#frag, 1989\t  x",
    "é vs é (combining), ﬁ ligature, ½, 𝔘",
]


def prose_docs(n: int, max_chars: int) -> list[str]:
    """Chunks of at most `max_chars` of pydoc topics, split at blank lines."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        chunk = ""
        for para in topics[key].split("\n\n"):
            if chunk and len(chunk) + len(para) + 2 > max_chars:
                docs.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{para}" if chunk else para[:max_chars]
        if chunk:
            docs.append(chunk)
    return docs[:n]


def chat_docs(n: int, max_chars: int) -> list[str]:
    """Chitchat conversations as 'A: ... / B: ...' transcripts of at most `max_chars`."""
    import chitchat_dataset

    docs = []
    for conv in itertools.islice(chitchat_dataset.ConversationDataset(), n):
        lines = [f"{'AB'[k % 2]}: {m}" for k, m in enumerate(conv)]
        docs.append("\n".join(lines)[:max_chars])
    return docs


def diverged(ref: Alignment, primary: Alignment, a: Tokenized, b: Tokenized) -> str | None:
    """How Algorithm 1 went wrong without failing, if it did.

    Its pairs must end at the same character, and each token must be the last to end there
    (an earlier one has read only some bytes of a character that a '\ufffd' match let through).
    """
    if np.any(a.offsets[ref.idx_a, 1] != b.offsets[ref.idx_b, 1]):
        return "different ends"
    if pair_set(ref) - pair_set(primary):
        return "mid-character"
    return None


def pair_set(al: Alignment) -> set[tuple[int, int]]:
    """Aligned pairs as a set of (i, j)."""
    return set(zip(al.idx_a.tolist(), al.idx_b.tolist(), strict=True))


def main() -> None:
    """Run both algorithms over the corpus and print rates, failures and agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000, help="documents in all (half chat)")
    parser.add_argument("--max-chars", type=int, default=1000, help="characters per document")
    args = parser.parse_args()

    tok_a, tok_b = load_tokenizer("smollm2"), load_tokenizer("gemma3")
    prose = prose_docs(args.docs // 2, args.max_chars)
    chat = chat_docs(args.docs - len(prose) - len(HARD), args.max_chars)
    docs = [(t, "prose") for t in prose] + [(t, "chat") for t in chat] + [(t, "hard") for t in HARD]

    start = time.perf_counter()
    toks = [(tokenize(tok_a, t), tokenize(tok_b, t)) for t, _ in docs]
    t_tok = time.perf_counter() - start

    start = time.perf_counter()
    primary = [align(a, b) for a, b in toks]
    t_primary = time.perf_counter() - start

    start = time.perf_counter()
    ref = [align_windows(a, b, tok_a, tok_b) for a, b in toks]
    t_ref = time.perf_counter() - start

    n = len(docs)
    n_tokens = sum(len(a) + len(b) for a, b in toks)
    print(f"{n} documents ({len(prose)} prose, {len(chat)} chat, {len(HARD)} hard cases), "
          f"{n_tokens:,} tokens")  # fmt: skip
    print(f"{'':28}{'docs/s':>12}{'ms/doc':>10}")
    for name, secs in [("tokenize (both models)", t_tok), ("offsets (intersect1d)", t_primary),
                       ("Algorithm 1 (windows)", t_ref)]:  # fmt: skip
        print(f"{name:28}{n / secs:12,.0f}{1000 * secs / n:10.3f}")
    print(f"speed-up of offsets over Algorithm 1: {t_ref / t_primary:,.0f}x")

    for kind in ("prose", "chat", "hard", "all"):
        rows = [i for i, (_, k) in enumerate(docs) if kind in ("all", k)]
        failed = [i for i in rows if ref[i].failure]
        div = [i for i in rows if not ref[i].failure and diverged(ref[i], primary[i], *toks[i])]
        both = [i for i in rows if not ref[i].failure and i not in div]
        shared = sum(len(pair_set(ref[i]) & pair_set(primary[i])) for i in both)
        n_ref = sum(len(ref[i]) for i in both)
        n_pri = sum(len(primary[i]) for i in both)
        print(
            f"{kind:5}: Algorithm 1 fails on {len(failed)}/{len(rows)} "
            f"({100 * len(failed) / max(len(rows), 1):.1f}%), diverges on {len(div)} "
            f"({100 * len(div) / max(len(rows), 1):.1f}%); where both succeed, "
            f"{100 * shared / max(n_ref, 1):.2f}% of its pairs are offset pairs, which cover "
            f"{100 * shared / max(n_pri, 1):.1f}% of the offset pairs"
        )
    examples = [r.failure for r in ref if r.failure][:5]
    examples += [
        f"diverged ({why}): {docs[i][0][:50]!r}"
        for i in range(n)
        if not ref[i].failure and (why := diverged(ref[i], primary[i], *toks[i]))
    ][:5]
    for failure in examples:
        print(f"  e.g. {failure}")


if __name__ == "__main__":
    main()
