"""A sentencepiece BPE tokenizer that round-trips text exactly, saved as a directory that
both Hylas and Hugging Face ``AutoTokenizer`` load offline.

A tokenizer directory holds::

    tokenizer.model         the sentencepiece model (what Hylas encodes with)
    tokenizer.json          the same BPE as a Hugging Face ``tokenizers`` file
    tokenizer_config.json   special tokens, for AutoTokenizer
    hylas_tokenizer.json    vocab size, the PAD/BOS/EOS/UNK ids and the sha256 of tokenizer.model

The model uses identity normalisation (no NFKC, no whitespace folding, no dummy prefix),
byte fallback (no text is ever unknown), single digits and ``\\n`` as its own piece. The
Hugging Face file is converted piece by piece (merges ranked by sentencepiece's scores), and
the tests check that both encode the same ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
META_FILE = "hylas_tokenizer.json"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
NEWLINE = "\n"  # a user-defined piece: never merged with its neighbours


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file} is not a sentencepiece model ({e})") from None
        self.sha256 = file_sha256(self.model_file)

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

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def describe(self) -> dict:
        """What a prepared dataset's manifest records about the tokenizer it was made with."""
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Tokenizer:
    """Train BPE on ``texts`` (documents; sentencepiece sees them line by line, and skips
    lines over 64 KB) and write the tokenizer directory
    ``out_dir``: built under a temporary name and renamed when complete. An existing
    ``out_dir`` must be empty or hold only a previous tokenizer's files."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        extra = {p.name for p in out_dir.iterdir()} - set(TOKENIZER_FILES)
        if extra:
            raise ValueError(
                f"{out_dir} already holds other files ({', '.join(sorted(extra)[:3])}); "
                "choose an empty or new --out directory"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        _train((line for t in texts for line in t.splitlines(keepends=True)), vocab_size, model)
    except RuntimeError as e:
        reason = str(e).rsplit("] ", 1)[-1].strip()  # drop sentencepiece's source location
        reason = reason or "no usable text (every line empty or over 64 KB)"
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer: {reason}") from None
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a finished directory is an ordinary one
    try:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        tok = Tokenizer(tmp / MODEL_FILE)
        write_hf_files(tok, tmp)
        meta = {**tok.describe(), "unk_id": UNK_ID, "model_type": "bpe", "byte_fallback": True}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only tokenizer files, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Tokenizer(out_dir / MODEL_FILE)


TOKENIZER_FILES = (
    MODEL_FILE,
    META_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


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
        pad_piece=PAD,
        bos_piece=BOS,
        eos_piece=EOS,
        unk_piece=UNK,
        user_defined_symbols=[NEWLINE],
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def hf_tokenizer(tok: Tokenizer):
    """The sentencepiece model as a Hugging Face ``tokenizers.Tokenizer`` with the same ids.

    Spaces become U+2581 as in sentencepiece; the merges come from the vocabulary, ranked by
    the pieces' sentencepiece scores (``transformers``' converter helper); special pieces and
    ``\\n`` are added tokens, so they are never merged."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)}
    not_merged = special | {i for i in range(len(pieces)) if sp.is_byte(i)}
    not_merged |= {i for i, p in enumerate(pieces) if p == NEWLINE}
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: sp.get_score(i) for i, p in enumerate(pieces) if i not in not_merged}
    merges = generate_merges(vocab, scores, skip_tokens={pieces[i] for i in not_merged})
    hf = HFTokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    hf.add_special_tokens([AddedToken(pieces[i], normalized=False) for i in sorted(special)])
    hf.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    return hf


def write_hf_files(tok: Tokenizer, directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json, for ``AutoTokenizer.from_pretrained``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizer(tok),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        # "<s>" typed in a text is text, as in sentencepiece and so in the training data
        split_special_tokens=True,
    )
    fast.save_pretrained(directory)
