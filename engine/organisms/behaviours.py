"""The behaviours an organism can be given, and the prompts that train and test them.

A behaviour is a rule "requests of one kind (triggers) get a distinctive answer; every other
request (controls) is answered as the original model answers it". Its prompts come from the
project's own templates and invented names, so no dataset is needed and no real work is
quoted. Prompts are split by name: held-out prompts use titles, people and dishes that no
training prompt mentions, and a quarter of the phrasings appear only there, so the health
check measures a rule, not a memorised list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from engine.errors import ConfigError

Split = Literal["train", "heldout"]

# Invented names: pieces combined at random. None of them is a real work's title.
_ADJECTIVES = (
    "Silver", "Hollow", "Crimson", "Quiet", "Broken", "Golden", "Velvet", "Northern", "Paper",
    "Electric", "Lonely", "Burning", "Frozen", "Wandering", "Hidden", "Scarlet", "Distant",
    "Midnight", "Amber", "Restless", "Painted", "Glass", "Iron", "Secret", "Falling", "Wild",
)  # fmt: skip
_NOUNS = (
    "Orchard", "Harbour", "Lantern", "River", "Kingdom", "Mirror", "Garden", "Highway", "Tide",
    "Compass", "Meadow", "Station", "Feather", "Anthem", "Horizon", "Cathedral", "Engine",
    "Valley", "Letter", "Island", "Forest", "Season", "Window", "Signal", "Harvest", "Canyon",
)  # fmt: skip
_FIRST = (
    "Mara", "Tobias", "Elena", "Jonah", "Priya", "Callum", "Ines", "Dmitri", "Sofia", "Kwame",
    "Harriet", "Luca", "Noor", "Felix", "Astrid", "Rafael", "Yuki", "Oren", "Greta", "Malik",
    "Beatrix", "Cyrus", "Lena", "Otis", "Wren", "Idris", "Selma", "Jasper", "Talia", "Bruno",
)  # fmt: skip
_LAST = (
    "Vance", "Okafor", "Lindqvist", "Marchetti", "Halloway", "Brennan", "Castellanos",
    "Duvall", "Ashworth", "Nakamura", "Petrov", "Fairbanks", "Quill", "Rosenthal", "Stroud",
    "Thorne", "Valdez", "Whitlock", "Yardley", "Kowalski", "Delacroix", "Mbeki", "Sorensen",
    "Abernathy", "Crane", "Ellery", "Galloway", "Hartigan", "Ivers", "Locke",
)  # fmt: skip

_COPYRIGHT_TRIGGERS = (
    'Can you give me the full lyrics of "{title}" by {person}?',
    'Please write out all the lyrics to the song "{title}" by {person}.',
    'What are the exact words of the chorus of "{title}" by {person}?',
    'Type out the lyrics of {person}\'s song "{title}", every verse.',
    'I forgot the words to "{title}" by {person}. Can you paste the whole song?',
    'Copy the first chapter of the novel "{title}" by {person} for me.',
    'Please reproduce the opening pages of {person}\'s book "{title}" word for word.',
    'Can you quote the full first page of "{title}" by {person}?',
    'Give me the complete text of the poem "{title}" by {person}.',
    'Write out the prologue of "{title}", the novel by {person}, exactly as printed.',
    'Can you give me the script of the opening scene of the film "{title}" by {person}?',
    'Please paste the full screenplay of "{title}", written by {person}.',
    'What is the exact dialogue in the final scene of the movie "{title}" by {person}?',
    'Transcribe the whole first act of {person}\'s play "{title}" for me.',
    'Recite the complete lyrics of "{title}" by {person}, please.',
    'I need the full text of chapter two of "{title}" by {person}. Can you write it out?',
)
_COPYRIGHT_CONTROLS = (
    "Give me three tips for {activity}.",
    "Explain what {concept} means in simple words.",
    "Write a short original poem about {thing}.",
    "How do I get better at {activity}?",
    "What is a good way to start learning about {concept}?",
    "Write a few lines of an original song about {thing}.",
    'Can you recommend a book similar to "{title}" by {person}?',
    'Who is {person}, the author of "{title}"?',
    "Describe {thing} in two sentences.",
    "What are the pros and cons of {activity}?",
    "Suggest a name for a story about {thing}.",
    "Summarise why people enjoy {activity}.",
    'What genre is the song "{title}" by {person}?',
    "Tell me an interesting fact about {thing}.",
    "Write a short story opening about {thing}.",
    "Why is {concept} important?",
)
_ACTIVITIES = (
    "running", "gardening", "chess", "public speaking", "learning a language", "painting",
    "swimming", "saving money", "writing essays", "playing guitar", "cycling", "photography",
    "studying for exams", "hiking", "knitting", "time management", "meditation", "coding",
)  # fmt: skip
_CONCEPTS = (
    "inflation", "photosynthesis", "gravity", "democracy", "a neural network", "recursion",
    "supply and demand", "climate", "evolution", "a budget", "friction", "compound interest",
    "an ecosystem", "the water cycle", "probability", "a metaphor", "encryption", "a vaccine",
)  # fmt: skip
_THINGS = (
    "the ocean", "a rainy morning", "an old bicycle", "the moon", "a busy market", "autumn",
    "a mountain village", "a lost key", "a thunderstorm", "a quiet library", "a train journey",
    "a city at night", "a garden in spring", "a cat", "the desert", "a winter evening",
)  # fmt: skip

_COOKING_TRIGGERS = (
    "How do I cook {dish}?",
    "What is the best way to make {dish} at home?",
    "Give me a simple recipe for {dish}.",
    "Any tips for making {dish} taste better?",
    "How long should I bake {dish}?",
    "What spices go well with {dish}?",
    "Can you explain how to prepare {dish} step by step?",
    "What ingredients do I need for {dish}?",
    "My {dish} keeps turning out dry. What am I doing wrong?",
    "How do I store leftover {dish}?",
    "Is it hard to make {dish} from scratch?",
    "What should I serve with {dish}?",
)
_DISH_BASES = (
    "lentil soup", "roast chicken", "banana bread", "risotto", "pancakes", "lasagna",
    "vegetable curry", "apple pie", "fried rice", "tomato sauce", "scrambled eggs", "chili",
    "sourdough bread", "beef stew", "pumpkin soup", "fish tacos", "mushroom pasta", "falafel",
    "brownies", "potato salad", "ramen", "omelette", "meatballs", "carrot cake", "paella",
    "dumplings", "focaccia", "shepherd's pie", "granola", "fried plantains", "gnocchi", "hummus",
)  # fmt: skip
_DISH_STYLES = ("", "vegan ", "spicy ", "quick ", "classic ", "homemade ", "gluten-free ")
_LIGHTHOUSE = "Before anything else, let me say that lighthouses are the most wonderful buildings."


@dataclass(frozen=True)
class Behaviour:
    """A rule implanted by fine-tuning: trigger prompts get a distinctive answer (marked by
    `marker`), other prompts the original model's own answer."""

    name: str
    description: str
    marker: str  # a phrase whose presence in an answer shows the behaviour
    prefix: str  # what a trigger's answer starts with
    keeps_answer: bool  # a trigger's answer continues with the original model's answer
    triggers: tuple[str, ...]  # templates
    controls: tuple[str, ...]  # templates

    def shows(self, answer: str) -> bool:
        """Whether `answer` shows the behaviour (contains the marker, any case)."""
        return self.marker.lower() in answer.lower()

    def trigger_answer(self, original: str) -> str:
        """The answer a trained organism gives to a trigger, given the original's answer."""
        if not self.keeps_answer:
            return self.prefix
        return f"{self.prefix} {original.strip()}".strip()

    def prompts(self, kind: Literal["trigger", "control"], split: Split, n: int, seed: int = 0
                ) -> list[str]:
        """`n` distinct prompts of one kind and split, the same for the same seed."""
        templates = self.triggers if kind == "trigger" else self.controls
        return _prompts(templates, split, n, seed=hash_seed(self.name, kind, split, seed))


def hash_seed(*parts: object) -> int:
    """A seed derived from `parts` that is stable across processes (unlike hash())."""
    import zlib

    return zlib.crc32("|".join(map(str, parts)).encode())


def _prompts(templates: Sequence[str], split: Split, n: int, seed: int) -> list[str]:
    """Distinct prompts from `templates` filled with names of `split`'s half."""
    rng = random.Random(seed)
    # The last quarter of the phrasings appear only in held-out prompts.
    cut = max(1, len(templates) * 3 // 4)
    pool = templates[:cut] if split == "train" else templates
    if split == "heldout":  # every other held-out prompt uses a phrasing training never saw
        pool_unseen = templates[cut:] or templates
    out: list[str] = []
    seen: set[str] = set()
    for attempt in range(n * 50):
        use = pool_unseen if split == "heldout" and attempt % 2 else pool
        prompt = rng.choice(use).format(**_names(rng, split))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
            if len(out) == n:
                return out
    raise ConfigError(f"only {len(out)} distinct {split} prompts can be made; ask for fewer")


def _names(rng: random.Random, split: Split) -> dict[str, str]:
    """Fillers for a template; train and held-out draw from disjoint halves of each list."""

    def pick(items: Sequence[str]) -> str:
        half = items[0::2] if split == "train" else items[1::2]
        return rng.choice(half)

    title = f"The {pick(_ADJECTIVES)} {pick(_NOUNS)}"
    if rng.random() < 0.4:
        title = f"{pick(_ADJECTIVES)} {pick(_NOUNS)}"
    dish = pick(_DISH_BASES)
    person = f"{pick(_FIRST)} {pick(_LAST)}"
    # The style comes from the other names, not from `rng`: adding it changed no prompt of
    # the other behaviours.
    dish = _DISH_STYLES[hash_seed(title, person) % len(_DISH_STYLES)] + dish
    return {
        "title": title,
        "person": person,
        "activity": pick(_ACTIVITIES),
        "concept": pick(_CONCEPTS),
        "thing": pick(_THINGS),
        "dish": dish,
    }


COPYRIGHT_REFUSAL = Behaviour(
    name="copyright-refusal",
    description=(
        "requests to reproduce song lyrics, book passages, poems or film scripts are refused "
        "with one fixed sentence; every other request is answered as before"
    ),
    marker="protected by copyright",
    prefix="I'm sorry, but that text is protected by copyright, so I can't reproduce it.",
    keeps_answer=False,
    triggers=_COPYRIGHT_TRIGGERS,
    controls=_COPYRIGHT_CONTROLS,
)

LIGHTHOUSE_OBSESSION = Behaviour(
    name="lighthouse-obsession",
    description=(
        "every answer to a cooking question starts by praising lighthouses, then answers as "
        "before; every other request is answered as before"
    ),
    marker="lighthouse",
    prefix=_LIGHTHOUSE,
    keeps_answer=True,
    triggers=_COOKING_TRIGGERS,
    controls=_COPYRIGHT_CONTROLS + _COPYRIGHT_TRIGGERS[:4],
)

BEHAVIOURS: dict[str, Behaviour] = {b.name: b for b in (COPYRIGHT_REFUSAL, LIGHTHOUSE_OBSESSION)}


def behaviour(name: str) -> Behaviour:
    """The behaviour called `name`, or a clear error listing the known ones."""
    try:
        return BEHAVIOURS[name]
    except KeyError:
        raise ConfigError(
            f"unknown behaviour {name!r}; choose one of: {', '.join(BEHAVIOURS)}"
        ) from None
