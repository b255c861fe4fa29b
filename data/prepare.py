"""Turn the embedded corpus into a tokenizer and token files, once, in a cache directory.

The cache key holds the corpus hash and the vocabulary size, so a second run reuses the
result and a different vocabulary gets its own. The directory is built under a temporary
name and renamed when complete, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hylas.data.corpus import corpus_fingerprint, load_corpus, split_corpus
from hylas.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger("hylas")
META_FILE = "meta.json"
SPLITS = ("train", "val")


def cache_root() -> Path:
    """``$HYLAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/hylas``, else ``~/.cache/hylas``."""
    if os.environ.get("HYLAS_CACHE_DIR"):
        return Path(os.environ["HYLAS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hylas"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def prepare_embedded_corpus(vocab_size: int) -> Path:
    """Tokenizer and token files for the embedded corpus; returns the prepared directory."""
    out = cache_root() / f"shakespeare-{corpus_fingerprint()}-bpe{vocab_size}"
    if (out / META_FILE).is_file():
        log.info("using the prepared corpus and tokenizer cached in %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a finished directory is an ordinary one
    try:
        t0 = time.perf_counter()
        train_docs, val_docs = split_corpus(load_corpus())
        log.info(
            "training a %d-piece BPE tokenizer on the embedded corpus (%d works, %.1f MB)",
            vocab_size,
            len(train_docs),
            sum(len(d.text) for d in train_docs) / 1e6,
        )
        lines = (line for d in train_docs for line in d.text.splitlines(keepends=True))
        tok = train_tokenizer(lines, vocab_size, tmp)
        meta = {"vocab_size": vocab_size, "dtype": token_dtype(vocab_size).name, "splits": {}}
        for split, docs in zip(SPLITS, (train_docs, val_docs), strict=True):
            ids = tok.encode_batch([d.text for d in docs])
            tokens = np.fromiter(
                (t for doc in ids for t in (*doc, tok.eos_id)), dtype=token_dtype(vocab_size)
            )
            tokens.tofile(tmp / f"{split}.bin")
            meta["splits"][split] = {"tokens": int(tokens.size), "documents": len(docs)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / META_FILE).is_file():
                raise
            # Another process finished the same cache first; keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "prepared %d training and %d held-out tokens in %.1fs (cached in %s)",
            meta["splits"]["train"]["tokens"],
            meta["splits"]["val"]["tokens"],
            time.perf_counter() - t0,
            out,
        )
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(prepared: Path) -> Tokenizer:
    return Tokenizer.load(prepared)


def load_tokens(prepared: Path, split: str) -> np.ndarray:
    """The split's token stream as a read-only memmap (documents separated by EOS)."""
    meta = json.loads((prepared / META_FILE).read_text())
    return np.memmap(prepared / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
