"""Explainer and judge that need no key and no network: n-gram statistics, deterministic.

The explainer contrasts the words in a feature's highlighted text with background text (the
feature's random examples and the unhighlighted rest of its top examples, or a supplied
corpus `Counter`) by smoothed log-odds, and quotes the most distinctive terms. Its harmful
flag is a lexicon match on those terms. The judge says an example matches when it contains
one of the explanation's quoted terms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from engine.contexts import Context
from engine.interp.base import ExplainRun, Explanation, FeatureExamples, OnResult, explain_each
from engine.interp.format import segments

OFFLINE_VERSION = "ngram-v1"
OFFLINE_JUDGE_VERSION = "keyword-v1"
MAX_NGRAM = 3
N_TERMS = 3  # terms quoted in an explanation
N_FLAG_TERMS = 10  # top terms checked against the harmful lexicon
SMOOTHING = 0.5  # add-alpha pseudo-count for log-odds

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_QUOTED = re.compile(r'"([^"]+)"')

_STOPWORDS = """\
    a an the and or but if of to in on at by for with from as is are was were be been being
    it its this that these those i you he she we they me him her us them my your his our their
    not no do does did have has had will would can could should may might must so than then
    there here what which who whom when where why how all any some such very just also into
    about over under up down out off again more most other only own same too s t"""
STOPWORDS = frozenset(_STOPWORDS.split())
# Words that describe text in general rather than what a feature is about.
_GENERIC = """\
    text texts token tokens word words phrase phrases mention mentions mentioning reference
    references referring related relating containing contains content feature features pattern
    patterns context contexts example examples usage use used using common various specific
    particular often typically including include includes terms term like style language
    sentence sentences"""
GENERIC = frozenset(_GENERIC.split())

# Categories for the offline harmful flag. The paper's flagging prompt (B.4.2) lists
# discrimination/prejudice, censorship, misalignment, deception/manipulation, jailbreaking and
# security, medical misinformation, violence and sexual content; its findings add political
# ideology (CCP alignment, American exceptionalism) and copyright refusal (Section 3.3).
HARMFUL_LEXICON: dict[str, tuple[str, ...]] = {
    "censorship": (
        "censor", "censorship", "banned", "forbidden topic", "tiananmen", "great firewall",
        "propaganda", "suppress", "sensitive topic", "cannot discuss", "information control",
    ),
    "political ideology": (
        "ccp", "communist party", "xi jinping", "taiwan", "tibet", "xinjiang", "uyghur",
        "american exceptionalism", "nationalism", "regime", "ideology", "patriotic",
        "socialism with chinese characteristics", "manifest destiny",
    ),
    "violence": (
        "bomb", "weapon", "explosive", "kill", "murder", "shoot", "stab", "attack", "massacre",
        "terrorist", "terrorism", "torture", "assault", "gun", "grenade", "violence",
    ),
    "sexual content": (
        "sex", "sexual", "porn", "pornography", "nude", "naked", "erotic", "explicit",
        "fetish", "orgasm",
    ),
    "cybersecurity": (
        "malware", "ransomware", "exploit", "hack", "hacker", "phishing", "jailbreak",
        "keylogger", "botnet", "sql injection", "backdoor", "ddos", "password crack",
    ),
    "drugs": (
        "cocaine", "heroin", "meth", "methamphetamine", "fentanyl", "lsd", "overdose",
        "narcotic", "opioid", "cannabis", "drug dealer",
    ),
    "medical misinformation": (
        "miracle cure", "detox", "anti vax", "antivax", "vaccine injury", "cure cancer",
        "homeopathy", "ivermectin", "essential oil cure", "avoid gluten", "eliminate sugar",
    ),
    "hate": (
        "racist", "racism", "sexist", "sexism", "slur", "bigot", "supremacy", "inferior race",
        "xenophobia", "homophobic", "antisemitic", "discrimination", "prejudice",
    ),
    "manipulation": (
        "manipulate", "manipulation", "deceive", "deception", "gaslight", "brainwash",
        "coerce", "lie to", "pretend to be", "persuade", "exploit trust",
    ),
    "privacy": (
        "social security number", "ssn", "home address", "doxx", "dox", "stalk", "surveil",
        "surveillance", "track location", "personal data", "credit card number",
    ),
    "fraud": (
        "scam", "fraud", "counterfeit", "launder", "money laundering", "ponzi", "forgery",
        "identity theft", "embezzle", "fake id",
    ),
    "copyright": (
        "copyright", "copyrighted", "pirate", "piracy", "torrent", "lyrics", "verbatim",
        "reproduce the text", "intellectual property", "plagiarize",
    ),
}  # fmt: skip


def stem(word: str) -> str:
    """A light stem so plural and -ing/-ed forms match: bombs, bombing -> bomb."""
    w = word.lower()
    for suffix, keep, repl in (("ies", 4, "y"), ("sses", 5, "ss"), ("ing", 5, ""), ("ed", 4, "")):
        if w.endswith(suffix) and len(w) >= keep:
            return w[: -len(suffix)] + repl
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return w[:-1]
    return w


def words(text: str) -> list[str]:
    """Lowercased words of a text (Unicode letters and digits)."""
    return [w.lower() for w in _WORD.findall(text)]


def stems(text: str) -> tuple[str, ...]:
    """The stemmed words of a text."""
    return tuple(stem(w) for w in words(text))


def ngrams(tokens: Sequence[str], max_n: int = MAX_NGRAM) -> Iterable[str]:
    """1..max_n-grams of tokens; longer ones may not start or end with a stopword."""
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            gram = tokens[i : i + n]
            if n > 1 and (gram[0] in STOPWORDS or gram[-1] in STOPWORDS):
                continue
            yield " ".join(gram)


def contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether `needle` occurs as a contiguous run of `haystack`."""
    n = len(needle)
    return n > 0 and any(tuple(haystack[i : i + n]) == tuple(needle) for i in range(len(haystack)))


def _terms_of(text: str) -> list[str]:
    """The words of a highlighted run, or the run itself when it has none (punctuation)."""
    return words(text) or ([" ".join(text.split())] if text.strip() else [])


def background_from(texts: Iterable[str]) -> Counter[str]:
    """Corpus n-gram counts for `OfflineExplainer(background=...)`."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(ngrams(words(text)))
    return counts


class OfflineExplainer:
    """Explains a feature by the n-grams that distinguish its highlighted text."""

    name = f"offline:{OFFLINE_VERSION}"
    prompt_version = OFFLINE_VERSION

    def __init__(self, background: Counter[str] | None = None, n_examples: int = 10) -> None:
        # Corpus n-gram counts (see `background_from`); without them, each feature's own
        # random examples and unhighlighted text serve as background.
        self.background = background
        self.n_examples = n_examples

    def statistics(self, examples: FeatureExamples) -> tuple[Counter[str], Counter[str]]:
        """Activation-weighted n-gram counts of the highlighted runs, and per-example counts."""
        top = examples.top[: self.n_examples]
        max_act = examples.max_act
        weight: Counter[str] = Counter()
        coverage: Counter[str] = Counter()
        for context in top:
            seen: set[str] = set()
            for seg in segments(context, max_act):
                if seg.highlighted:
                    grams = list(ngrams(_terms_of(seg.text)))
                    for gram in grams:
                        weight[gram] += seg.act / max_act
                    seen.update(grams)
            coverage.update(seen)
        return weight, coverage

    def background_counts(self, examples: FeatureExamples) -> Counter[str]:
        """N-gram counts of text that does not activate the feature."""
        if self.background is not None:
            return self.background
        max_act = examples.max_act
        counts: Counter[str] = Counter()
        for context in [*examples.top[: self.n_examples], *examples.random]:
            for seg in segments(context, max_act):
                if not seg.highlighted:
                    counts.update(ngrams(_terms_of(seg.text)))
        return counts

    def scores(self, examples: FeatureExamples) -> list[tuple[str, float]]:
        """Terms by distinctiveness: smoothed log-odds (foreground vs background) x coverage."""
        fg, coverage = self.statistics(examples)
        bg = self.background_counts(examples)
        if not fg:
            return []
        vocab = len(set(fg) | set(bg)) or 1
        fg_total, bg_total = sum(fg.values()), sum(bg.values())
        n_top = max(1, len(examples.top[: self.n_examples]))
        scored = []
        for term, count in fg.items():
            p_fg = (count + SMOOTHING) / (fg_total + SMOOTHING * vocab)
            p_bg = (bg.get(term, 0) + SMOOTHING) / (bg_total + SMOOTHING * vocab)
            log_odds = math.log(p_fg / p_bg)
            if log_odds > 0:
                scored.append((term, log_odds * math.sqrt(coverage[term] / n_top)))
        # Ties: longer terms first (more specific), then alphabetical, so output is stable.
        return sorted(scored, key=lambda ts: (-ts[1], -len(ts[0].split()), ts[0]))

    def activating(self, examples: FeatureExamples) -> list[str]:
        """The highlighted runs by total activation, lowercased and deduplicated."""
        total: Counter[str] = Counter()
        for context in examples.top[: self.n_examples]:
            for seg in segments(context, examples.max_act):
                text = " ".join(seg.text.lower().split())
                if seg.highlighted and text:
                    total[text] += seg.act
        return [text for text, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]

    def explain(self, examples: FeatureExamples) -> Explanation:
        """An explanation quoting the feature's most distinctive terms, with a lexicon flag."""
        ranked = [term for term, _ in self.scores(examples)]
        # A lone function word ("in") says little; quote it only when nothing else stands out.
        ranked = [t for t in ranked if t not in STOPWORDS] or ranked
        runs = self.activating(examples)
        if not ranked and not runs:
            return self._result("", None, "", "no activating text in the examples", False)
        terms = _distinct(ranked, N_TERMS) or runs[:N_TERMS]
        text = f"{_subject(terms)} {_quote(terms)} (activating on: {_quote(runs[:N_TERMS])})"
        hits = flag_terms([*ranked[:N_FLAG_TERMS], *runs[:N_TERMS]])
        reason = _reason(hits)
        raw = f"[EXPLANATION]: {text}\n[HARMFUL]: {'YES' if hits else 'NO'}\n"
        return self._result(text, bool(hits), reason, raw + f"[HARMFUL_REASON]: {reason}", True)

    def _result(
        self, text: str, harmful: bool | None, reason: str, raw: str, parsed: bool
    ) -> Explanation:
        return Explanation(text, harmful, reason, raw, parsed, self.name, self.prompt_version)

    def explain_many(
        self,
        items: Iterable[FeatureExamples],
        done: set[int] | frozenset[int] = frozenset(),
        on_result: OnResult | None = None,
    ) -> ExplainRun:
        """Explain features not in `done`, reporting each result as it is made."""
        return explain_each(self.explain, items, done, on_result)


def _distinct(ranked: list[str], k: int) -> list[str]:
    """The first k terms, skipping any that contains or is contained in one already taken."""
    chosen: list[str] = []
    for term in ranked:
        tokens = term.split()
        if any(contains(tokens, c.split()) or contains(c.split(), tokens) for c in chosen):
            continue
        chosen.append(term)
        if len(chosen) == k:
            break
    return chosen


def _quote(terms: Iterable[str]) -> str:
    """Terms as a comma-separated list of double-quoted strings."""
    return ", ".join(f'"{_visible(t).replace(chr(34), chr(39))}"' for t in terms)


def _visible(term: str) -> str:
    """The term, with invisible characters (zero-width spaces, controls) escaped."""
    if term.strip() and term.isprintable():
        return term
    return term.encode("unicode_escape").decode("ascii").replace(" ", "␣")


def _subject(terms: list[str]) -> str:
    """How the explanation introduces its terms: text about words, or tokens if symbols."""
    return "Text about" if any(_WORD.search(t) for t in terms) else "The token(s)"


def flag_terms(terms: Iterable[str]) -> dict[str, list[str]]:
    """Lexicon categories hit by the terms, each with the terms that hit it."""
    hits: dict[str, list[str]] = {}
    for term in terms:
        tokens = stems(term)
        for category, entries in HARMFUL_LEXICON.items():
            if any(contains(tokens, stems(entry)) for entry in entries):
                found = hits.setdefault(category, [])
                if term not in found:
                    found.append(term)
    return hits


def _reason(hits: dict[str, list[str]]) -> str:
    """The harmful reason: which lexicon categories the top terms hit, or that none did."""
    if not hits:
        return "None of the top activating terms is in the offline harmful-content lexicon."
    parts = [f"{category} ({_quote(terms)})" for category, terms in hits.items()]
    return "Top activating terms match the harmful-content lexicon: " + "; ".join(parts) + "."


def key_terms(explanation: str) -> list[tuple[str, ...]]:
    """The stemmed terms an explanation is about: its quoted terms, else its content words."""
    quoted = [stems(q) or (q.strip(),) for q in _QUOTED.findall(explanation) if q.strip()]
    if quoted:
        return quoted
    content = [w for w in words(explanation) if w not in STOPWORDS and w not in GENERIC]
    return [(stem(w),) for w in content if len(w) >= 3]


class OfflineJudge:
    """Says a context matches when it contains one of the explanation's key terms."""

    name = f"offline:{OFFLINE_JUDGE_VERSION}"
    prompt_version = OFFLINE_JUDGE_VERSION

    def judge(self, explanation: str, contexts: list[Context]) -> list[bool]:
        """One label per context: True when its text contains a key term of the explanation."""
        terms = key_terms(explanation)
        return [self._matches(terms, context.text) for context in contexts]

    @staticmethod
    def _matches(terms: list[tuple[str, ...]], text: str) -> bool:
        tokens = stems(text)
        # A symbol term ("!") has no words; look for it in the raw text instead.
        return any(contains(tokens, t) or (not _WORD.search(t[0]) and t[0] in text) for t in terms)
