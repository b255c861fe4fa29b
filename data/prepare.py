"""Text to token shards: ``hylas data prepare``, and the embedded corpus through the same path.

A prepared directory::

    manifest.json                 written last: token and document counts, sha256 of every
                                  shard and index, the tokenizer's hash and ids, the sources
    tokenizer/                    a copy of the tokenizer it was made with (its files only)
    train_00000.bin ...           tokens (uint16 when the vocabulary fits, else uint32),
                                  every document followed by EOS; a document never straddles
                                  two shards
    train_00000.idx.npy ...       int64 end offset of each document in its shard (after its EOS)
    val_00000.bin, .idx.npy ...   the held-out split, the same way

A document is held out when the hash of its text falls below ``--val-fraction``
(:func:`text_hash`), so the split depends on the text alone, not on the order of the documents
or how the work was cut. When that holds out none of them (a corpus of few documents), or all,
``prepare`` reads the inputs a second time and holds out the documents of smallest hash
instead, or the tail of a corpus that is one document; the manifest's ``held_out`` says which.

Documents are tokenized by a pool of worker processes (one thread each), in order, so the
output does not depend on the number of workers. The directory is built under a temporary
name next to ``out`` and renamed when complete; an interrupted run leaves no directory with a
manifest, and the loader refuses one without.

A corpus too large for one machine is prepared in parts (``--part I/N``, one job each: every
input file, in the order of their paths, to a part in turn) and joined by :func:`merge_prepared`
(``hylas data merge``); the hash rule alone holds out documents in a part, so the parts
together hold the documents, and hold out the ones, that a single ``prepare`` would.
"""

from __future__ import annotations

import array
import collections
import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from hylas.data.corpus import corpus_fingerprint, load_corpus, split_corpus
from hylas.data.dataset import FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, PreparedData
from hylas.data.sources import DataError, RawParagraphs, Source, split_paragraphs
from hylas.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

log = logging.getLogger("hylas")

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
        self.file: BinaryIO | None = None

    def _open(self) -> BinaryIO:
        name = f"{self.split}_{len(self.shards):05d}"
        self.name = name
        file = open(self.directory / f"{name}.bin", "wb")  # noqa: SIM115  (closed in _close)
        self.file = file
        self.hash = hashlib.sha256()
        self.tokens = 0
        self.ends: list[np.ndarray] = []
        return file

    def _close(self) -> None:
        assert self.file is not None  # only a shard that is open is closed
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
            file = self.file if self.file is not None else self._open()
            room = self.shard_tokens - self.tokens
            base = ends[start - 1] if start else 0
            # every document that fits; at least one, so an over-long document gets a shard
            stop = max(start + 1, int(np.searchsorted(ends, base + room, side="right")))
            stop = min(stop, len(ends))
            if self.tokens and ends[stop - 1] - base > room:  # the next one does not fit here
                self._close()
                continue
            chunk = tokens[base : ends[stop - 1]]
            file.write(chunk.data)  # the array's bytes, as a memoryview
            self.hash.update(chunk.data)
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


def _init_worker(tokenizer_dir: str, dtype: str, eos_id: int) -> None:
    _worker["tokenizer"] = Tokenizer.load(tokenizer_dir)
    _worker["dtype"] = np.dtype(dtype)
    _worker["eos"] = eos_id


def _pack(ids: list[list[int]], dtype: np.dtype, eos: int) -> tuple[np.ndarray, np.ndarray]:
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, count=total), ends


def _encode_job(job: tuple[list[str] | tuple, list[bool] | None, float]):
    """One task: tokenize a run of documents, or the paragraphs of a raw block (a tuple of
    :func:`split_paragraphs`'s arguments); returns (tokens, ends) per split, the documents'
    text hashes when they decided the held-out flags (given as None), and for a raw block
    (documents, characters, bad UTF-8 sequences replaced)."""
    texts, held_out, fraction = job
    counts = None
    if isinstance(texts, tuple):
        texts, replaced = split_paragraphs(*texts)
        counts = (len(texts), sum(map(len, texts)), replaced)
    hashes = None
    if held_out is None:  # held out by hash, here rather than in the feeding process
        hashes = [text_hash(t) for t in texts]
        held_out = [h / 2**64 < fraction for h in hashes]
    ids = _worker["tokenizer"].encode_batch(texts, num_threads=1)
    dtype, eos = _worker["dtype"], _worker["eos"]
    train = [d for d, h in zip(ids, held_out, strict=True) if not h]
    val = [d for d, h in zip(ids, held_out, strict=True) if h] if any(held_out) else []
    return _pack(train, dtype, eos), _pack(val, dtype, eos), hashes, counts


def _jobs(
    documents: Iterable[tuple[str | RawParagraphs, bool | None]], fraction: float
) -> Iterator:
    """(job, characters, raw block or None): runs of documents of about JOB_CHARACTERS, and
    each raw block as a job of its own; a job's flags are None when its documents' are
    (held out by hash at ``fraction``, in the worker)."""
    texts: list[str] = []
    flags: list[bool | None] = []
    size = 0

    def run_of_documents():
        return (texts, None if flags[0] is None else flags, fraction), size, None

    for text, held_out in documents:
        if isinstance(text, RawParagraphs):
            if texts:
                yield run_of_documents()
                texts, flags, size = [], [], 0
            yield (text.job(), None, fraction), len(text.data), text
            continue
        texts.append(text)
        flags.append(held_out)
        size += len(text)
        if size >= JOB_CHARACTERS:
            yield run_of_documents()
            texts, flags, size = [], [], 0
    if texts:
        yield run_of_documents()


class _Pool:
    """Worker processes fed in order with a bounded number of tasks in flight. A worker that
    dies (killed, out of memory) stops the run with an error instead of a hang."""

    def __init__(self, workers: int, tokenizer_dir: Path, dtype: np.dtype, eos_id: int):
        # Fork is the fast start, but forking a process that runs other threads (a metrics
        # exporter, say) can copy a held lock into the child, which then aborts: such a
        # process starts its workers from a fresh server process instead.
        if sys.platform == "darwin":
            method = "spawn"
        else:
            method = "fork" if threading.active_count() == 1 else "forkserver"
        ctx = multiprocessing.get_context(method)
        initargs = (str(tokenizer_dir), dtype.name, eos_id)  # each worker opens the tokenizer
        self.pool = ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=initargs)
        self.limit = 2 * workers

    def map(self, jobs: Iterator) -> Iterator:
        pending: collections.deque = collections.deque()
        try:
            for job, size, raw in jobs:
                pending.append((self.pool.submit(_encode_job, job), size, raw))
                if len(pending) >= self.limit:
                    future, n, raw = pending.popleft()
                    yield future.result(), n, raw
            while pending:
                future, n, raw = pending.popleft()
                yield future.result(), n, raw
        except BrokenProcessPool:
            raise DataError(
                "a tokenizer worker process died (out of memory, or killed); try fewer --workers"
            ) from None

    def close(self, ok: bool) -> None:
        if not ok:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.terminate()  # do not wait for tasks nobody will read
        self.pool.shutdown(wait=True, cancel_futures=True)


def _tokenize(
    documents: Iterable[tuple[str | RawParagraphs, bool | None]],
    tokenizer: Tokenizer,
    directory: Path,
    *,
    workers: int,
    shard_tokens: int,
    input_bytes: tuple[int, Callable[[], int]] | None,
    progress: bool,
    hash_split: HashSplit | None,
) -> dict:
    """One pass: the shards of both splits into ``directory``; returns their summaries."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(directory, s, dtype, shard_tokens) for s in SPLITS}
    pool = _Pool(workers, tokenizer.directory, dtype, tokenizer.eos_id)
    ok = False
    try:
        bar = tqdm(
            total=input_bytes[0] if input_bytes else None,
            unit="B" if input_bytes else "char",
            unit_scale=True,
            disable=not progress,
            desc="tokenizing",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        t0 = logged = time.perf_counter()
        n_tokens = 0
        with bar:
            fraction = hash_split.fraction if hash_split else 0.0
            for result, size, raw in pool.map(_jobs(documents, fraction)):
                (train_tok, train_ends), (val_tok, val_ends), hashes, counts = result
                if raw is not None:
                    raw.count(*counts)
                if hashes is not None and hash_split is not None:
                    hash_split.hashes.extend(hashes)
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
        ok = True
        return splits
    finally:
        pool.close(ok)


class HashSplit:
    """Documents whose held-out flag is None are held out when their :func:`text_hash`
    falls below ``fraction``, decided in the tokenizer workers; ``hashes`` collects every
    such document's hash, in order."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.hashes = array.array("Q")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` to fill and then rename to ``out``; whatever the
    body does not rename (an error, an interrupt) is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed


def write_prepared(
    documents: Iterable[tuple[str | RawParagraphs, bool | None]],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    sources: list | None = None,
    settings: dict | None = None,
    input_bytes: tuple[int, Callable[[], int]] | None = None,
    progress: bool = True,
    held_out: dict | None = None,
    second_pass: Callable[[], tuple[Iterable[tuple[str, bool]], dict] | None] | None = None,
    part: dict | None = None,
    hash_split: HashSplit | None = None,
    after_first_pass: Callable[[], None] | None = None,
) -> dict:
    """Tokenize ``(text, held_out)`` pairs into the prepared directory ``out``; returns the
    manifest. ``input_bytes`` is (total, a function giving the bytes read so far), for the
    progress bar; without it the bar counts characters. ``sources`` are dicts, or objects with
    ``to_dict()`` (a source's counts, complete once its documents are consumed) for the
    manifest. ``held_out`` says in the manifest how the split was made; when a split comes out
    empty, ``second_pass`` may give other documents to write instead, with their ``held_out``.
    ``part`` is recorded in the manifest as is (see :func:`prepare`). A document's flag may
    be None, deciding by ``hash_split`` (:class:`HashSplit`). ``after_first_pass`` runs once
    the first pass is tokenized (the sources' checks of what raw blocks held)."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; remove it or choose another --out")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    with _staging(out) as tmp:
        t0 = time.perf_counter()
        tokenizer.copy_to(tmp / TOKENIZER_DIR)

        def tokenize(split: HashSplit | None) -> dict:
            return _tokenize(
                documents,
                tokenizer,
                tmp,
                workers=workers,
                shard_tokens=shard_tokens,
                input_bytes=input_bytes,
                progress=progress,
                hash_split=split,
            )

        splits = tokenize(hash_split)
        if after_first_pass:
            after_first_pass()
        redo = None
        if second_pass and not all(splits[s]["documents"] for s in SPLITS):
            redo = second_pass()
        if redo:
            documents, held_out = redo
            for split in SPLITS:  # the first pass's shards and indexes
                for f in tmp.glob(f"{split}_*"):
                    f.unlink()
            splits = tokenize(None)
        if splits["train"]["documents"] == 0:
            raise DataError("no training documents: the inputs hold nothing to train on")
        manifest = {
            "format": FORMAT_VERSION,
            "hylas_version": _hylas_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": tokenizer.describe(),
            "sources": [s.to_dict() if hasattr(s, "to_dict") else s for s in sources or []],
            "settings": {**(settings or {}), "shard_tokens": shard_tokens, "workers": workers},
            **(
                {"held_out": {**held_out, "documents": splits["val"]["documents"]}}
                if held_out
                else {}
            ),
            **({"part": part} if part else {}),
            "splits": splits,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
        return manifest


# -- which documents are held out -----------------------------------------------------------

TAIL_MIN_CHARACTERS = 2_000  # the least held out of a one-document corpus, if under half of it


def text_hash(text: str) -> int:
    """A 64-bit hash of ``text``; it is held out when ``text_hash(text) / 2**64 < fraction``."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def tail_cut(text: str, fraction: float) -> int:
    """Where to cut the held-out tail off a one-document corpus: at least ``fraction`` of its
    characters (and ``TAIL_MIN_CHARACTERS``), never more than half, at a line break or a space
    when there is one near; 0 when the text is too short to cut."""
    n = len(text)
    want = min(max(math.ceil(fraction * n), TAIL_MIN_CHARACTERS), n // 2)
    if want < 1:
        return 0
    start = n - want
    lo = max(start - want // 2, (n + 1) // 2)  # a longer tail, but the training part keeps half
    for sep in ("\n", " "):
        i = text.rfind(sep, lo, start)
        if i >= 0:
            return i + 1
    return start


def prepare(
    sources: list[Source],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    val_fraction: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    part: dict | None = None,
) -> dict:
    """``hylas data prepare``: every document of ``sources``, in order; those whose
    :func:`text_hash` falls below ``val_fraction`` go to the held-out split. When that holds
    out none or all of them, the sources are read again (so they must be iterable twice) and the
    documents of smallest hash are held out, ``ceil(val_fraction x documents)`` of them and at
    least one; a single document (kept from the first pass) has its tail held out instead
    (:func:`tail_cut`). ``part`` (``{"index", "count", "files"}``, the sources cut down by
    :func:`~hylas.data.sources.part_sources`) marks one part of a corpus prepared in parts: it
    is recorded in the manifest, and the hash alone chooses, with no second pass, so the parts
    together hold out what one ``prepare`` of the whole would."""
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    split = HashSplit(val_fraction)  # decided in the workers
    hashes = split.hashes  # of every document, in order, for the second pass
    only: list[str] = []  # the text while there is one document
    blank = [copy.deepcopy(s.stats) for s in sources]

    def first_pass() -> Iterator[tuple[str | RawParagraphs, None]]:
        # Paragraph-mode text comes as raw blocks that the workers split (no work per
        # document here); ``only`` keeps a first document that is a text, until a second.
        for n, item in enumerate(itertools.chain.from_iterable(s.raw() for s in sources)):
            only[:] = [item] if n == 0 and isinstance(item, str) else []
            yield item, None

    def check_sources() -> None:
        for s in sources:
            s.check_documents()

    def again() -> Iterator[str]:
        for s, b in zip(sources, blank, strict=True):  # counts as before the first pass
            vars(s.stats).update(copy.deepcopy(vars(b)))
        n = 0
        for text in itertools.chain.from_iterable(sources):
            if n == len(hashes) or text_hash(text) != hashes[n]:
                raise DataError("the inputs changed between the two passes of prepare")
            n += 1
            yield text
        if n != len(hashes):
            raise DataError("the inputs changed between the two passes of prepare")

    def second_pass() -> tuple[Iterable[tuple[str, bool]], dict] | None:
        if val_fraction == 0 or not hashes:
            return None
        record = {"fraction": val_fraction}
        if len(hashes) > 1:
            k = max(1, math.ceil(val_fraction * len(hashes)))
            chosen = set(sorted(range(len(hashes)), key=hashes.__getitem__)[:k])
            documents = ((t, n in chosen) for n, t in enumerate(again()))
            return documents, {"rule": "hash-smallest", **record, "cut": False}
        if not only:  # the one document came in a raw block: read it again
            [text] = again()
        else:
            text = only[0]
        cut = tail_cut(text, val_fraction)
        if not cut:
            return None
        tail = {"cut": True, "characters": len(text) - cut}
        return [(text[:cut], False), (text[cut:], True)], {"rule": "tail", **record, **tail}

    sizes = [n for s in sources if (n := s.total_bytes) is not None]  # those known ahead
    return write_prepared(
        first_pass(),
        tokenizer,
        out,
        workers=workers,
        shard_tokens=shard_tokens,
        sources=[s.stats for s in sources],
        settings={"val_fraction": val_fraction},
        input_bytes=None
        if len(sizes) < len(sources)
        else (sum(sizes), lambda: sum(s.stats.bytes_read for s in sources)),
        progress=progress,
        held_out={"rule": "hash", "fraction": val_fraction, "cut": False},
        second_pass=None if part else second_pass,
        part=part,
        hash_split=split,
        after_first_pass=check_sources,
    )


# -- joining parts ---------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def merge_prepared(parts: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """``hylas data merge``: the prepared directories ``parts`` joined into ``out``; returns
    its manifest. Every part is verified (sha256 of every file); they must share the tokenizer,
    dtype, format and held-out rule, and when made with ``--part``, be all N parts of one
    count, each once. Shards are hard-linked (copied across filesystems) in part order and
    numbered again; their sha256 carry over."""

    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; remove it or choose another --out")
    if not parts:
        raise DataError("no part directories given to merge")
    data = [PreparedData(p, verify=True) for p in parts]
    first = data[0].manifest
    for d in data[1:]:
        m = d.manifest
        if m["dtype"] != first["dtype"]:
            raise DataError(
                f"{d.path} holds {m['dtype']} tokens, {data[0].path} {first['dtype']}; "
                "prepare every part with the same --tokenizer"
            )
        mine, want = m["tokenizer"], first["tokenizer"]
        if (mine["sha256"], mine["eos_id"]) != (want["sha256"], want["eos_id"]):
            raise DataError(
                f"{d.path} was prepared with another tokenizer than {data[0].path} (sha256 "
                f"{mine['sha256'][:12]}... eos {mine['eos_id']} vs {want['sha256'][:12]}... "
                f"eos {want['eos_id']}); prepare every part with the same --tokenizer"
            )
    rules = {json.dumps(_rule(d.manifest), sort_keys=True) for d in data}
    if len(rules) > 1:
        raise DataError(
            f"the parts hold out documents by different rules ({'; '.join(sorted(rules))}); "
            "prepare every part with the same --val-fraction"
        )
    data = _in_part_order(data)
    with _staging(out) as tmp:
        t0 = time.perf_counter()
        shutil.copytree(data[0].tokenizer_dir, tmp / TOKENIZER_DIR)
        splits = {}
        for split in SPLITS:
            shards: list[dict] = []
            for d in data:
                for shard in d.manifest["splits"][split]["shards"]:
                    name = f"{split}_{len(shards):05d}"
                    renamed = {
                        **shard,
                        "tokens_file": f"{name}.bin",
                        "index_file": f"{name}.idx.npy",
                    }
                    for key in ("tokens_file", "index_file"):
                        _link_or_copy(d.path / shard[key], tmp / renamed[key])
                    shards.append(renamed)
            splits[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(s["documents"] for s in shards),
                "shards": shards,
            }
        if splits["val"]["documents"] == 0:
            raise DataError(
                "the parts hold no held-out documents; prepare them again with a higher "
                "--val-fraction"
            )
        manifest = {
            "format": FORMAT_VERSION,
            "hylas_version": _hylas_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": first["dtype"],
            "tokenizer": first["tokenizer"],
            "sources": [s for d in data for s in d.manifest["sources"]],
            "merged": [
                {
                    "path": str(d.path),
                    **({"part": d.manifest["part"]} if "part" in d.manifest else {}),
                }
                for d in data
            ],
            "held_out": {**_rule(first), "documents": splits["val"]["documents"]},
            "splits": splits,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
        return manifest


def _rule(manifest: dict) -> dict:
    """How a prepared directory chose its held-out documents, without their count."""
    return {k: v for k, v in manifest.get("held_out", {}).items() if k != "documents"}


def _in_part_order(data: list) -> list:
    """Parts made with ``--part`` sorted by index, after checking they are all N of one count;
    directories without part information in the order given."""
    with_part = [d for d in data if "part" in d.manifest]
    if not with_part:
        return data
    if len(with_part) < len(data):
        plain = next(d for d in data if "part" not in d.manifest)
        raise DataError(f"{plain.path} was not prepared with --part, unlike the others")
    counts = {d.manifest["part"]["count"] for d in data}
    if len(counts) > 1:
        raise DataError(
            f"the parts were cut into different counts ({', '.join(map(str, sorted(counts)))}); "
            "merge the parts of one --part I/N run"
        )
    count = counts.pop()
    by_index: dict[int, list] = collections.defaultdict(list)
    for d in data:
        by_index[d.manifest["part"]["index"]].append(d)
    twice = [i for i, ds in sorted(by_index.items()) if len(ds) > 1]
    if twice:
        paths = ", ".join(str(d.path) for d in by_index[twice[0]])
        raise DataError(f"part {twice[0]}/{count} is given more than once ({paths})")
    missing = [str(i) for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise DataError(
            f"part(s) {', '.join(missing)} of {count} are missing; merge all {count} parts"
        )
    return [by_index[i][0] for i in range(1, count + 1)]


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
