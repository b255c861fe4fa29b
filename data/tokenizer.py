"""A sentencepiece BPE tokenizer that round-trips text exactly (identity normalisation,
byte fallback), saved as a directory holding ``tokenizer.model``."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.model_file = Path(model_file)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        path = Path(directory) / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {MODEL_FILE} is missing")
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Tokenizer:
    """Train BPE on ``texts`` and write ``out_dir/tokenizer.model`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        _train(texts, vocab_size, model)
    except RuntimeError as e:
        reason = str(e).rsplit("] ", 1)[-1]  # drop sentencepiece's source location
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer: {reason}") from None
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tokenizer-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_dir / MODEL_FILE)
    return Tokenizer(out_dir / MODEL_FILE)


def _train(texts: Iterable[str], vocab_size: int, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",  # exact round trip: no NFKC, no space folding
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=["\n"],
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
