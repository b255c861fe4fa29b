"""Embedded corpus, tokenizer round trip, the prepared-corpus cache and the batch loaders."""

import numpy as np
import pytest
import torch

from hylas.data import prepare
from hylas.data.corpus import VALIDATION_WORKS, load_corpus, split_corpus
from hylas.data.loader import RandomWindows, eval_batches, to_batch
from hylas.data.tokenizer import Tokenizer, train_tokenizer

VOCAB = 512


def test_embedded_corpus_is_real_text_of_at_least_5mb():
    docs = load_corpus()
    assert sum(len(d.text.encode()) for d in docs) >= 5_000_000
    train, val = split_corpus(docs)
    assert {d.id for d in val} == set(VALIDATION_WORKS)
    assert not {d.id for d in train} & set(VALIDATION_WORKS)
    assert "To be, or not to be" in next(d.text for d in docs if d.id == "hamlet")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    train, _ = split_corpus(load_corpus())
    lines = (line for d in train[:5] for line in d.text.splitlines(keepends=True))
    return train_tokenizer(lines, VOCAB, tmp_path_factory.mktemp("tok"))


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
    again = Tokenizer.load(tokenizer.model_file.parent)
    text = "Thou art more lovely and more temperate."
    assert again.encode(text) == tokenizer.encode(text) and again.vocab_size == VOCAB
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        Tokenizer.load(tokenizer.model_file.parent / "missing")


def test_prepared_corpus_is_cached(monkeypatch):
    path = prepare.prepare_embedded_corpus(VOCAB)
    tok = prepare.load_tokenizer(path)
    train_tokens = prepare.load_tokens(path, "train")
    assert train_tokens.dtype == np.uint16 and len(train_tokens) > 1_000_000
    assert int(train_tokens.max()) < VOCAB
    # documents end with EOS, so the stream holds one EOS per training work
    assert int((train_tokens == tok.eos_id).sum()) == len(load_corpus()) - len(VALIDATION_WORKS)
    # the text decodes back to the corpus
    first_work = split_corpus(load_corpus())[0][0].text
    assert (
        tok.decode(train_tokens[:200].tolist())
        == first_work[: len(tok.decode(train_tokens[:200].tolist()))]
    )

    def must_not_retrain(*a, **k):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(prepare, "train_tokenizer", must_not_retrain)
    assert prepare.prepare_embedded_corpus(VOCAB) == path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary dirs left"


def test_random_windows_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    loader = RandomWindows(tokens, seq_len=16, batch_size=4, seed=7)
    a, b = loader.batch(3), loader.batch(3)
    assert (a["input_ids"] == b["input_ids"]).all()
    assert not (loader.batch(4)["input_ids"] == a["input_ids"]).all()
    assert a["input_ids"].shape == (4, 16)
    assert (a["labels"][:, :-1] == a["input_ids"][:, 1:]).all()  # next-token targets
    assert (a["labels"][:, -1] == a["input_ids"][:, -1] + 1).all()  # tokens are consecutive here
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomWindows(tokens[:10], seq_len=16, batch_size=1, seed=0)


def test_eval_batches_cover_the_split_without_overlap():
    tokens = np.arange(5_000, dtype=np.uint16)
    batches = eval_batches(tokens, seq_len=32, batch_size=4, max_batches=3)
    starts = np.concatenate([b["input_ids"][:, 0].numpy() for b in batches])
    assert len(starts) == 12 and (np.diff(starts) >= 32).all()
    assert starts[0] == 0 and starts[-1] == 5_000 - 33


def test_impossible_vocabulary_is_one_sentence(tmp_path):
    with pytest.raises(
        ValueError, match=r"cannot train a 100000-piece tokenizer: Vocabulary size too high"
    ):
        train_tokenizer(["a tiny corpus\n"] * 10, 100_000, tmp_path)
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_batches_mark_the_documents_that_start_inside_a_sample():
    EOS = 2
    # windows of 6 + 1 tokens; an EOS at input positions 2 (row 0) and 0 and 4 (row 1)
    windows = np.array([[5, 6, EOS, 7, 8, 9, 10], [EOS, 11, 12, 13, EOS, 14, 15]])
    batch = to_batch(windows, eos_id=EOS)
    assert batch["input_ids"].tolist() == windows[:, :-1].tolist()
    assert batch["labels"].tolist() == windows[:, 1:].tolist()
    # document starts: 0, 3 (after row 0's EOS), 6 (row 1), 7 and 11 (after row 1's EOSes)
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 7, 11, 12]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 0]]
    plain = to_batch(np.array([[5, 6, 7, 8, EOS]]), eos_id=EOS)  # EOS only as a label
    assert set(plain) == {"input_ids", "labels"}


def test_random_windows_carry_document_boundaries_to_the_model():
    EOS = 2
    tokens = np.tile(np.array([5, 6, 7, 8, 9, EOS], dtype=np.uint16), 50)
    batch = RandomWindows(tokens, seq_len=16, batch_size=3, seed=1, eos_id=EOS).batch(0)
    ids = batch["input_ids"].flatten()
    cu = batch["cu_seqlens"].long()
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        doc = ids[s:e]
        assert (doc[:-1] != EOS).all()  # an EOS can only close a document
        assert batch["position_ids"].flatten()[s:e].tolist() == list(range(e - s))
