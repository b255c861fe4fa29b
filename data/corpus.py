"""The embedded default corpus: Shakespeare's works, shipped compressed as package data."""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

CORPUS_FILE = "shakespeare.jsonl.xz"
# Held out for evaluation (about 5% of the text): works the model never trains on.
VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "lovers_complaint")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _corpus_bytes() -> bytes:
    return (Path(__file__).with_name("corpus") / CORPUS_FILE).read_bytes()


def corpus_fingerprint() -> str:
    """A short hash of the shipped corpus file, for cache keys."""
    return hashlib.sha256(_corpus_bytes()).hexdigest()[:16]


def load_corpus() -> list[Document]:
    """All works, in a fixed order."""
    lines = lzma.decompress(_corpus_bytes()).decode("utf-8").splitlines()
    return [Document(**json.loads(line)) for line in lines if line]


def split_corpus(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, validation) by whole works, so evaluation text is never trained on."""
    train = [d for d in docs if d.id not in VALIDATION_WORKS]
    val = [d for d in docs if d.id in VALIDATION_WORKS]
    return train, val
