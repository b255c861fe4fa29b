"""The tokenizers Hylas trains and prepares data with: one interface, two kinds of directory.

``Tokenizer.load(directory)`` opens either kind, chosen by what the directory holds:

- **Hylas's own sentencepiece BPE** (:class:`SentencePieceTokenizer`), written by
  :func:`train_tokenizer`: a directory with ``hylas_tokenizer.json``, or one holding
  ``tokenizer.model`` and no ``tokenizer.json`` (the tokenizer of a checkpoint written
  before checkpoints held a tokenizer directory)::

      tokenizer.model         the sentencepiece model (what Hylas encodes with)
      tokenizer.json          the same BPE as a Hugging Face ``tokenizers`` file
      tokenizer_config.json   special tokens, for AutoTokenizer
      hylas_tokenizer.json    vocab size, the PAD/BOS/EOS/UNK ids and the sha256 of tokenizer.model

  The model uses identity normalisation (no NFKC, no whitespace folding, no dummy prefix),
  byte fallback (no text is ever unknown), single digits and ``\\n`` as its own piece. The
  Hugging Face file is converted piece by piece (merges ranked by sentencepiece's scores),
  and the tests check that both encode the same ids.

- **A Hugging Face tokenizer** (:class:`HuggingFaceTokenizer`), as pretrained Llama-3-style
  models ship it: ``tokenizer.json`` with ``tokenizer_config.json`` (its special tokens) and
  perhaps ``special_tokens_map.json`` and a chat template. A directory holding both
  ``tokenizer.model`` and ``tokenizer.json`` but no ``hylas_tokenizer.json`` is one of these
  (Llama-2 and Mistral ship their sentencepiece file beside ``tokenizer.json``).

Either kind is identified by the sha256 of the file that defines it (``tokenizer.model``,
``tokenizer.json``): prepared data records it, and training refuses a tokenizer of another
hash. ``encode`` adds no special tokens; Hylas ends every document with ``eos_id`` itself.
"""

from __future__ import annotations

import abc
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from hylas.configs.base import file_sha256

MODEL_FILE = "tokenizer.model"
META_FILE = "hylas_tokenizer.json"
HF_FILE = "tokenizer.json"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
NEWLINE = "\n"  # a user-defined piece: never merged with its neighbours

# The files of a Hylas tokenizer directory, and of a Hugging Face tokenizer (whichever
# exist are copied; transformers reads each of them when present).
TOKENIZER_FILES = (
    MODEL_FILE,
    META_FILE,
    HF_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
HF_FILES = (
    HF_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class Tokenizer(abc.ABC):
    """What Hylas needs of a tokenizer, whichever kind: ids, encoding, decoding, its hash,
    and its files (to re-open it in a worker process, and to copy it into prepared data,
    checkpoints and Hugging Face exports).

    ``directory`` is where it was loaded from (``Tokenizer.load(directory)`` opens it again),
    ``file`` the file that defines it and ``sha256`` that file's hash."""

    kind: str  # "sentencepiece" or "huggingface", as recorded by describe()
    directory: Path
    file: Path
    sha256: str
    pad_id: int
    bos_id: int | None
    eos_id: int

    @staticmethod
    def load(directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer in ``directory``, of the kind its files say (see the module's
        docstring); a directory holding neither kind is refused."""
        directory = Path(directory)
        has = lambda name: (directory / name).is_file()  # noqa: E731
        if has(META_FILE) or (has(MODEL_FILE) and not has(HF_FILE)):
            return SentencePieceTokenizer(directory)
        if has(HF_FILE):
            return HuggingFaceTokenizer(directory)
        raise FileNotFoundError(
            f"no tokenizer in {directory}: it holds neither {MODEL_FILE} (a Hylas tokenizer) "
            f"nor {HF_FILE} (a Hugging Face one)"
        )

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, added and special tokens included."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, with no special tokens added."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` of each text; ``num_threads=1`` stays in this thread (a worker
        process), otherwise the library's own threads may be used."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def copy_to(self, directory: str | os.PathLike) -> list[str]:
        """Copy the files that define this tokenizer into ``directory`` (made if missing),
        so that ``Tokenizer.load(directory)`` opens the same tokenizer; returns their names.
        Only tokenizer files: a model directory's weights stay where they are."""

    @abc.abstractmethod
    def save_hf(self, directory: str | os.PathLike) -> list[str]:
        """Write the files ``transformers.AutoTokenizer.from_pretrained(directory)`` loads
        offline and that encode as ``encode`` does; returns their names."""

    def describe(self) -> dict:
        """What a prepared dataset's manifest records about the tokenizer it was made with."""
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }


def _copy_files(src: Path, names: Iterable[str], dst: str | os.PathLike) -> list[str]:
    """Copy those of ``names`` that exist in ``src`` to ``dst``; returns the ones copied."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = [n for n in names if (src / n).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


class SentencePieceTokenizer(Tokenizer):
    """Hylas's sentencepiece BPE, from a directory holding ``tokenizer.model``. Its ids are
    fixed: PAD 0, BOS 1, EOS 2, UNK 3."""

    kind = "sentencepiece"
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.file = self.model_file = self.directory / MODEL_FILE
        if not self.file.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {MODEL_FILE} is missing")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.file} is not a sentencepiece model ({e})") from None
        self.sha256 = file_sha256(self.file)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def copy_to(self, directory: str | os.PathLike) -> list[str]:
        return _copy_files(self.directory, TOKENIZER_FILES, directory)

    def save_hf(self, directory: str | os.PathLike) -> list[str]:
        return write_hf_files(self, Path(directory))


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, read as transformers' ``PreTrainedTokenizerFast``
    reads it: ``tokenizer.json`` as the file defines it, special tokens from
    ``tokenizer_config.json``. That is what ``AutoTokenizer`` does for Llama-3-style
    directories (``tokenizer_class`` ``PreTrainedTokenizerFast``).

    ``eos_id`` and ``bos_id`` are the config's ``eos_token`` and ``bos_token`` (bos may be
    None); a tokenizer without an eos token is refused, since Hylas ends every document with
    it. ``pad_id`` is the pad token when the config defines one, else ``eos_id`` (padded
    positions are never trained on, so any id serves). ``vocab_size`` counts the added
    tokens too (``len`` of the fast tokenizer). Special tokens typed in a text encode as the
    tokenizer's own settings say, as ``AutoTokenizer`` would encode them."""

    kind = "huggingface"

    def __init__(self, directory: str | os.PathLike):
        from transformers import PreTrainedTokenizerFast

        self.directory = Path(directory)
        self.file = self.directory / HF_FILE
        if not self.file.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {HF_FILE} is missing")
        try:
            self.fast = PreTrainedTokenizerFast.from_pretrained(str(self.directory))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(
                f"{self.directory} does not hold a readable Hugging Face tokenizer ({e})"
            ) from None
        if self.fast.eos_token_id is None:
            raise ValueError(
                f"the Hugging Face tokenizer in {self.directory} has no eos token (eos_token in "
                "tokenizer_config.json or special_tokens_map.json), which Hylas ends every "
                "document with"
            )
        self.backend = self.fast.backend_tokenizer
        self.backend.no_truncation()  # whole documents, as AutoTokenizer encodes by default
        self.backend.no_padding()
        self.eos_id = self.fast.eos_token_id
        self.bos_id = self.fast.bos_token_id
        pad = self.fast.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad
        self.sha256 = file_sha256(self.file)

    @property
    def vocab_size(self) -> int:
        return len(self.fast)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.fast.decode(list(ids))

    def copy_to(self, directory: str | os.PathLike) -> list[str]:
        return _copy_files(self.directory, HF_FILES, directory)

    def save_hf(self, directory: str | os.PathLike) -> list[str]:
        return self.copy_to(directory)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> SentencePieceTokenizer:
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
        tok = SentencePieceTokenizer(tmp)
        write_hf_files(tok, tmp)
        meta = {**tok.describe(), "unk_id": UNK_ID, "model_type": "bpe", "byte_fallback": True}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only tokenizer files, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SentencePieceTokenizer(out_dir)


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


def hf_tokenizer(tok: SentencePieceTokenizer):
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


def write_hf_files(tok: SentencePieceTokenizer, directory: Path) -> list[str]:
    """tokenizer.json and tokenizer_config.json, for ``AutoTokenizer.from_pretrained``;
    returns the names written."""
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
    return sorted(Path(p).name for p in fast.save_pretrained(directory))
