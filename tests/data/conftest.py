"""A small tokenizer shared by the data tests."""

import pytest

from hylas.data.corpus import load_corpus, split_corpus
from hylas.data.tokenizer import train_tokenizer

VOCAB = 512


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    train, _ = split_corpus(load_corpus())
    lines = (line for d in train[:5] for line in d.text.splitlines(keepends=True))
    return train_tokenizer(lines, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer")
