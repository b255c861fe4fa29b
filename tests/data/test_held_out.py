"""The held-out split of ``hylas data prepare``: chosen by the hash of each document's text,
and never empty when ``--val-fraction`` asks for one, even for a corpus of one document."""

import itertools
import json

import numpy as np
import pytest

from hylas.data.corpus import load_corpus
from hylas.data.dataset import PreparedData
from hylas.data.prepare import prepare, tail_cut, text_hash
from hylas.data.sources import open_sources
from hylas.data.tokenizer import train_tokenizer
from hylas.train.cli import main


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = load_corpus()[3].text[:20_000]
    return train_tokenizer(text.splitlines(keepends=True), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def texts():
    """60 documents of 1-1,000 characters cut from the corpus."""
    text = load_corpus()[7].text
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 1_000, size=61))
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def run(tmp_path, tokenizer, name, texts, **kw):
    out = tmp_path / name
    src = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    m = prepare(open_sources([src]), tokenizer, out, progress=False, **kw)
    return m, PreparedData(out)


def forty(texts):
    """40 documents none of whose hashes falls under 0.005: the hash alone holds out none."""
    docs = [t for t in texts if text_hash(t) / 2**64 >= 0.005][:40]
    assert len(docs) == 40
    return docs


def token_lists(data, split):
    s = data.split(split)
    return [s.document(d).tolist() for d in range(s.num_documents)]


def encoded(tokenizer, text):
    return [*tokenizer.encode(text), tokenizer.eos_id]


def test_membership_depends_only_on_the_text(tmp_path, tokenizer, texts):
    want = {t for t in texts if text_hash(t) / 2**64 < 0.1}
    assert 0 < len(want) < len(texts)
    m, ordered = run(tmp_path, tokenizer, "ordered", texts, val_fraction=0.1)
    _, shuffled = run(tmp_path, tokenizer, "reversed", texts[::-1], val_fraction=0.1, workers=2)
    val = token_lists(ordered, "val")
    assert sorted(val) == sorted(token_lists(shuffled, "val"))
    assert sorted(val) == sorted(encoded(tokenizer, t) for t in want)
    assert m["held_out"] == {"rule": "hash", "fraction": 0.1, "cut": False, "documents": len(want)}


def test_too_few_documents_for_the_hash_hold_out_the_smallest_hash(tmp_path, tokenizer, texts):
    docs = forty(texts)
    m, data = run(tmp_path, tokenizer, "out", docs, val_fraction=0.005)
    smallest = min(docs, key=text_hash)
    assert token_lists(data, "val") == [encoded(tokenizer, smallest)]
    assert token_lists(data, "train") == [encoded(tokenizer, t) for t in docs if t != smallest]
    assert m["held_out"] == {
        "rule": "hash-smallest",
        "fraction": 0.005,
        "cut": False,
        "documents": 1,
    }
    assert m["sources"][0]["documents"] == 40  # counted once, not once per pass
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "hashed_into, mode", [("train", "none"), ("val", "none"), ("train", "paragraph")]
)
def test_one_document_has_its_tail_held_out(tmp_path, tokenizer, hashed_into, mode):
    """A whole file as one document, or a file of one paragraph read by paragraph (which
    comes to the workers as one raw block, and is read again for its tail)."""
    text = load_corpus()[5].text[:30_000]
    if mode == "paragraph":
        text = "\n".join(line for line in text.splitlines() if line.strip())
    below = lambda t: text_hash(t) / 2**64 < 0.005  # noqa: E731
    suffixes = (f"\n{i}" for i in itertools.count())
    text = next(t for t in (text + s for s in suffixes) if below(t) == (hashed_into == "val"))
    (tmp_path / "book.txt").write_text(text)
    out = tmp_path / "out"
    sources = open_sources([str(tmp_path / "book.txt")], split_documents=mode)
    m = prepare(sources, tokenizer, out, progress=False)
    cut = tail_cut(text, 0.005)
    assert 2_000 <= len(text) - cut <= len(text) // 2 and text[cut - 1] in "\n "
    data = PreparedData(out)
    assert token_lists(data, "train") == [encoded(tokenizer, text[:cut])]
    assert token_lists(data, "val") == [encoded(tokenizer, text[cut:])]
    assert m["held_out"] == {
        "rule": "tail",
        "fraction": 0.005,
        "cut": True,
        "characters": len(text) - cut,
        "documents": 1,
    }
    assert m["sources"][0]["documents"] == 1


def test_the_command_says_train_on_it_only_with_a_held_out_split(
    tmp_path, tokenizer, texts, capsys
):
    src = write_jsonl(tmp_path / "a.jsonl", forty(texts))
    args = ["data", "prepare", "--input", src, "--tokenizer", str(tokenizer.directory)]
    assert main([*args, "--out", str(tmp_path / "held")]) == 0
    printed = capsys.readouterr().out
    assert "held out the 1 document(s) of smallest hash" in printed
    assert "train on it: hylas train" in printed
    assert main([*args, "--out", str(tmp_path / "none"), "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "train on it" not in printed
    assert "no held-out split" in printed and "--val-fraction 0.005" in printed
