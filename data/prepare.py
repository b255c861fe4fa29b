"""Text to token shards: ``hylas data prepare``, and the embedded corpus through the same path.

A prepared directory::

    manifest.json                 written last: token and document counts, sha256 of every
                                  shard and index, the tokenizer's hash and ids, the sources
    tokenizer/                    a copy of the tokenizer directory it was made with
    train_00000.bin ...           tokens (uint16 when the vocabulary fits, else uint32),
                                  every document followed by EOS; a document never straddles
                                  two shards
    train_00000.idx.npy ...       int64 end offset of each document in its shard (after its EOS)
    val_00000.bin, .idx.npy ...   the held-out split, the same way

Documents are tokenized by a pool of worker processes (one thread each), in order, so the
output does not depend on the number of workers. The directory is built under a temporary
name next to ``out`` and renamed when complete; an interrupted run leaves no directory with a
manifest, and the loader refuses one without.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from hylas.data.corpus import corpus_fingerprint, load_corpus, split_corpus
from hylas.data.sources import DataError, Source
from hylas.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

log = logging.getLogger("hylas")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB of uint16 tokens
JOB_CHARACTERS = 1 << 20  # text per worker task: large enough to amortise the hand-off


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def cache_root() -> Path:
    """``$HYLAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/hylas``, else ``~/.cache/hylas``."""
    if os.environ.get("HYLAS_CACHE_DIR"):
        return Path(os.environ["HYLAS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hylas"


def _hylas_version() -> str:
    try:
        return version("hylas")
    except PackageNotFoundError:
        return "unknown"


# -- writing shards -------------------------------------------------------------------------


class ShardWriter:
    """The shards of one split, rotated at document boundaries, hashed as they are written."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split = directory, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        self.name = name
        self.file = open(self.directory / f"{name}.bin", "wb")  # noqa: SIM115  (closed in _close)
        self.hash = hashlib.sha256()
        self.tokens = 0
        self.ends: list[np.ndarray] = []

    def _close(self) -> None:
        self.file.close()
        self.file = None
        ends = np.concatenate(self.ends) if self.ends else np.zeros(0, np.int64)
        index = self.directory / f"{self.name}.idx.npy"
        np.save(index, ends)
        self.shards.append(
            {
                "tokens_file": f"{self.name}.bin",
                "index_file": index.name,
                "tokens": self.tokens,
                "documents": len(ends),
                "sha256": self.hash.hexdigest(),
                "index_sha256": file_sha256(index),
            }
        )

    def add(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        """Whole documents: ``tokens`` back to back (each with its EOS), ``ends`` their
        cumulative end offsets within ``tokens``."""
        start = 0
        while start < len(ends):
            if self.file is None:
                self._open()
            room = self.shard_tokens - self.tokens
            base = ends[start - 1] if start else 0
            # every document that fits; at least one, so an over-long document gets a shard
            stop = max(start + 1, int(np.searchsorted(ends, base + room, side="right")))
            stop = min(stop, len(ends))
            if self.tokens and ends[stop - 1] - base > room:  # the next one does not fit here
                self._close()
                continue
            chunk = tokens[base : ends[stop - 1]]
            self.file.write(memoryview(chunk))
            self.hash.update(memoryview(chunk))
            self.ends.append(ends[start:stop] - base + self.tokens)
            self.tokens += len(chunk)
            start = stop
            if self.tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        if self.file is not None:
            self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


# -- tokenizing in worker processes ---------------------------------------------------------

_worker: dict = {}


def _init_worker(model_file: str, dtype: str, eos_id: int) -> None:
    _worker["sp"] = spm.SentencePieceProcessor(model_file=model_file)
    _worker["dtype"] = np.dtype(dtype)
    _worker["eos"] = eos_id


def _pack(ids: list[list[int]], dtype: np.dtype, eos: int) -> tuple[np.ndarray, np.ndarray]:
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, count=total), ends


def _encode_job(job: tuple[list[str], list[bool]]):
    """One task: tokenize a run of documents; returns (tokens, ends) per split."""
    texts, held_out = job
    ids = _worker["sp"].encode(texts, num_threads=1)
    dtype, eos = _worker["dtype"], _worker["eos"]
    train = [d for d, h in zip(ids, held_out, strict=True) if not h]
    val = [d for d, h in zip(ids, held_out, strict=True) if h] if any(held_out) else []
    return _pack(train, dtype, eos), _pack(val, dtype, eos)


def _jobs(documents: Iterable[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool], int]]:
    texts, flags, size = [], [], 0
    for text, held_out in documents:
        texts.append(text)
        flags.append(held_out)
        size += len(text)
        if size >= JOB_CHARACTERS:
            yield texts, flags, size
            texts, flags, size = [], [], 0
    if texts:
        yield texts, flags, size


class _Pool:
    """Worker processes fed in order with a bounded number of tasks in flight. A worker that
    dies (killed, out of memory) stops the run with an error instead of a hang."""

    def __init__(self, workers: int, model_file: Path, dtype: np.dtype, eos_id: int):
        ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
        self.pool = ProcessPoolExecutor(
            workers, ctx, initializer=_init_worker, initargs=(str(model_file), dtype.name, eos_id)
        )
        self.limit = 2 * workers

    def map(self, jobs: Iterator) -> Iterator:
        pending: collections.deque = collections.deque()
        try:
            for texts, flags, size in jobs:
                pending.append((self.pool.submit(_encode_job, (texts, flags)), size))
                if len(pending) >= self.limit:
                    future, n = pending.popleft()
                    yield future.result(), n
            while pending:
                future, n = pending.popleft()
                yield future.result(), n
        except BrokenProcessPool:
            raise DataError(
                "a tokenizer worker process died (out of memory, or killed); try fewer --workers"
            ) from None

    def close(self, ok: bool) -> None:
        if not ok:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.terminate()  # do not wait for tasks nobody will read
        self.pool.shutdown(wait=True, cancel_futures=True)


def write_prepared(
    documents: Iterable[tuple[str, bool]],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    sources: list | None = None,
    settings: dict | None = None,
    input_bytes: tuple[int, Callable[[], int]] | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize ``(text, held_out)`` pairs into the prepared directory ``out``; returns the
    manifest. ``input_bytes`` is (total, a function giving the bytes read so far), for the
    progress bar; without it the bar counts characters. ``sources`` are dicts, or objects with ``to_dict()`` (a source's counts, complete
    once its documents are consumed) for the manifest."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; remove it or choose another --out")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    pool = None
    ok = False
    try:
        t0 = time.perf_counter()
        shutil.copytree(tokenizer.model_file.parent, tmp / TOKENIZER_DIR)
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        pool = _Pool(workers, tokenizer.model_file, dtype, tokenizer.eos_id)
        bar = tqdm(
            total=input_bytes[0] if input_bytes else None,
            unit="B" if input_bytes else "char",
            unit_scale=True,
            disable=not progress,
            desc="tokenizing",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        n_tokens, logged = 0, time.perf_counter()
        with bar:
            for ((train_tok, train_ends), (val_tok, val_ends)), size in pool.map(_jobs(documents)):
                writers["train"].add(train_tok, train_ends)
                if len(val_ends):
                    writers["val"].add(val_tok, val_ends)
                n_tokens += len(train_tok) + len(val_tok)
                if input_bytes:
                    bar.update(input_bytes[1]() - bar.n)
                else:
                    bar.update(size)
                bar.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)
                if not progress and time.perf_counter() - logged > 30:  # no bar: log lines
                    logged = time.perf_counter()
                    log.info(
                        "tokenized %s tokens so far (%.0f tokens/s)",
                        f"{n_tokens:,}",
                        n_tokens / (logged - t0),
                    )
        splits = {s: w.finish() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise DataError("no training documents: the inputs hold nothing to train on")
        elapsed = time.perf_counter() - t0
        manifest = {
            "format": FORMAT_VERSION,
            "hylas_version": _hylas_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": dtype.name,
            "tokenizer": tokenizer.describe(),
            "sources": [s.to_dict() if hasattr(s, "to_dict") else s for s in sources or []],
            "settings": {**(settings or {}), "shard_tokens": shard_tokens, "workers": workers},
            "splits": splits,
            "seconds": round(elapsed, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
        ok = True
        return manifest
    finally:
        if pool is not None:
            pool.close(ok)
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)


def held_out_every(val_fraction: float) -> int:
    """Every k-th document (the k-1-th, 2k-1-th, ...) is held out; 0 = none."""
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    return round(1 / val_fraction) if val_fraction > 0 else 0


def prepare(
    sources: list[Source],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    val_fraction: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """``hylas data prepare``: every document of ``sources``, in order; every
    ``1 / val_fraction``-th one goes to the held-out split."""
    every = held_out_every(val_fraction)
    numbered = enumerate(itertools.chain.from_iterable(sources))
    documents = ((text, bool(every) and n % every == every - 1) for n, text in numbered)
    sizes = [s.total_bytes for s in sources]
    return write_prepared(
        documents,
        tokenizer,
        out,
        workers=workers,
        shard_tokens=shard_tokens,
        sources=[s.stats for s in sources],
        settings={"val_fraction": val_fraction},
        input_bytes=None
        if None in sizes
        else (sum(sizes), lambda: sum(s.stats.bytes_read for s in sources)),
        progress=progress,
    )


# -- the embedded corpus --------------------------------------------------------------------


def prepare_embedded_corpus(vocab_size: int) -> tuple[Path, Path]:
    """(tokenizer directory, prepared data directory) for the embedded corpus, built once
    in the cache: the tokenizer trained on the training works, the held-out works as the
    held-out split. The cache key holds the corpus hash and the vocabulary size."""
    root = cache_root() / f"shakespeare-{corpus_fingerprint()}-bpe{vocab_size}-v{FORMAT_VERSION}"
    tok_dir, data_dir = root / TOKENIZER_DIR, root / "data"
    if (data_dir / MANIFEST).is_file():
        log.info("using the prepared corpus and tokenizer cached in %s", root)
        return tok_dir, data_dir
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_docs, val_docs = split_corpus(load_corpus())
    if (tok_dir / "hylas_tokenizer.json").is_file():
        tok = Tokenizer.load(tok_dir)
    else:
        log.info(
            "training a %d-piece BPE tokenizer on the embedded corpus (%d works, %.1f MB)",
            vocab_size,
            len(train_docs),
            sum(len(d.text) for d in train_docs) / 1e6,
        )
        tok = train_tokenizer((d.text for d in train_docs), vocab_size, tok_dir)
    held_out = {d.id for d in val_docs}
    documents = [(d.text, d.id in held_out) for d in load_corpus()]
    try:
        manifest = write_prepared(
            documents,
            tok,
            data_dir,
            sources=[{"input": "embedded corpus (Shakespeare)", "documents": len(documents)}],
            settings={"held_out": sorted(held_out)},
            progress=False,
        )
    except DataError:
        if (data_dir / MANIFEST).is_file():  # another process finished the same cache first
            return tok_dir, data_dir
        raise
    log.info(
        "prepared %d training and %d held-out tokens in %.1fs (cached in %s)",
        manifest["splits"]["train"]["tokens"],
        manifest["splits"]["val"]["tokens"],
        time.perf_counter() - t0,
        root,
    )
    return tok_dir, data_dir
