"""The embedded corpus, the tokenizer (sentencepiece and its Hugging Face files) and the
prepared-corpus cache."""

import json

import numpy as np
import pytest

from hylas.data import prepare
from hylas.data.corpus import VALIDATION_WORKS, load_corpus, split_corpus
from hylas.data.dataset import PreparedData
from hylas.data.tokenizer import META_FILE, Tokenizer, train_tokenizer

VOCAB = 512


def test_embedded_corpus_is_real_text_of_at_least_5mb():
    docs = load_corpus()
    assert sum(len(d.text.encode()) for d in docs) >= 5_000_000
    train, val = split_corpus(docs)
    assert {d.id for d in val} == set(VALIDATION_WORKS)
    assert not {d.id for d in train} & set(VALIDATION_WORKS)
    assert "To be, or not to be" in next(d.text for d in docs if d.id == "hamlet")


@pytest.mark.parametrize(
    "text",
    [
        "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
        "  two leading spaces,\ttabs,\n\n\nblank lines and trailing space  ",
        "Unicode: wörld, naïve café, 東京, emoji 🙂, control \x01 char",
        "digits 1234567890 and CAPS",
        "",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_reloads_from_its_directory(tokenizer):
    again = Tokenizer.load(tokenizer.directory)
    text = "Thou art more lovely and more temperate."
    assert again.encode(text) == tokenizer.encode(text) and again.vocab_size == VOCAB
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        Tokenizer.load(tokenizer.directory / "missing")


def test_prepared_corpus_is_cached(monkeypatch):
    tok_dir, data_dir = prepare.prepare_embedded_corpus(VOCAB)
    tok = Tokenizer.load(tok_dir)
    data = PreparedData(data_dir)
    data.check_tokenizer(tok)
    train = data.split("train")
    assert data.dtype == np.uint16 and train.num_tokens > 1_000_000
    assert int(train.shards[0].max()) < VOCAB
    # one EOS closes each work; the held-out works are the held-out split
    works = split_corpus(load_corpus())
    assert train.num_documents == len(works[0])
    assert data.split("val").num_documents == len(VALIDATION_WORKS)
    assert int((train.shards[0] == tok.eos_id).sum()) == len(works[0])
    first = train.document(0)
    assert first[-1] == tok.eos_id and tok.decode(first[:-1].tolist()) == works[0][0].text

    def must_not_retrain(*a, **k):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(prepare, "train_tokenizer", must_not_retrain)
    monkeypatch.setattr(prepare, "write_prepared", must_not_retrain)
    assert prepare.prepare_embedded_corpus(VOCAB) == (tok_dir, data_dir)
    root = data_dir.parent
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temporary dirs left"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary dirs left"


def test_impossible_vocabulary_is_one_sentence(tmp_path):
    with pytest.raises(
        ValueError, match=r"cannot train a 100000-piece tokenizer: Vocabulary size too high"
    ):
        train_tokenizer(["a tiny corpus\n"] * 10, 100_000, tmp_path / "tok")
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_tokenizer_directory_records_ids_and_refuses_foreign_files(tokenizer, tmp_path):
    meta = json.loads((tokenizer.directory / META_FILE).read_text())
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"]) == (0, 1, 2, 3)
    assert meta["vocab_size"] == VOCAB and meta["sha256"] == tokenizer.sha256
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):
        train_tokenizer(["some text\n"] * 50, 300, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


HF_TEXTS = [
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
    "  two leading spaces,\ttabs,\n\n\nblank lines and trailing space  ",
    "Unicode: wörld, naïve café, 東京, emoji 🙂, control \x01 char, \r\n line ends",
    "digits 1234567890 and CAPS; <s> and </s> typed as text",
]


def test_hugging_face_files_load_offline_and_match_sentencepiece(tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer.directory)  # HF_HUB_OFFLINE=1 in conftest
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == VOCAB
    held_out = split_corpus(load_corpus())[1][0].text[:20_000]
    for text in [*HF_TEXTS, held_out]:
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text), text[:40]
        assert hf.decode(ids) == text
