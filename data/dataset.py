"""Reading a prepared directory (see ``hylas.data.prepare``): checked, then memory-mapped.

Opening checks everything that can make training silently wrong, and names the file: the
manifest is there (an interrupted ``prepare`` leaves none), every shard and index exists
with the size the manifest says (a truncated copy is caught), the sha256 of every file
matches (``verify=True``, the default; it reads the data once), and the tokenizer is the
one the data was made with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hylas.data.sources import DataError
from hylas.data.tokenizer import Tokenizer, file_sha256

# The prepared directory's format (written by ``hylas.data.prepare``, read here).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Split:
    """One split of one prepared directory: its documents as spans of memory-mapped shards.

    Document d is ``shards[doc_shard[d]][doc_start[d] : doc_start[d] + doc_len[d]]``, its
    tokens followed by its EOS."""

    name: str
    shards: list[np.ndarray]
    doc_shard: np.ndarray  # int32 [D]
    doc_start: np.ndarray  # int64 [D]
    doc_len: np.ndarray  # int64 [D], EOS included

    @property
    def num_documents(self) -> int:
        return len(self.doc_len)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_len.sum())

    def document(self, d: int) -> np.ndarray:
        start = int(self.doc_start[d])
        return self.shards[int(self.doc_shard[d])][start : start + int(self.doc_len[d])]


class PreparedData:
    """A prepared directory, checked on open."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not self.path.is_dir():
            raise DataError(f"prepared data {self.path} does not exist")
        if not manifest_file.is_file():
            raise DataError(
                f"{self.path} is not a prepared dataset: it has no {MANIFEST} "
                "(an interrupted 'hylas data prepare' leaves none; run it again)"
            )
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{manifest_file} is unreadable: {e}") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise DataError(
                f"{self.path} has prepared-data format {self.manifest.get('format')}, "
                f"this Hylas reads {FORMAT_VERSION}; prepare it again"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_info = self.manifest["tokenizer"]
        self.splits = {
            name: self._open_split(name, info, verify)
            for name, info in self.manifest["splits"].items()
        }

    @property
    def eos_id(self) -> int:
        return self.tokenizer_info["eos_id"]

    @property
    def pad_id(self) -> int:
        return self.tokenizer_info["pad_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one the data was made with: another defining
        file (of either kind), or the same file with another end-of-document id (a Hugging
        Face tokenizer's eos comes from its config)."""
        want = self.tokenizer_info["sha256"]
        if tokenizer.sha256 != want:
            raise DataError(
                f"the tokenizer {tokenizer.file} does not match the one {self.path} was "
                f"prepared with (sha256 {tokenizer.sha256[:12]}... vs {want[:12]}...); use "
                f"{self.tokenizer_dir} or prepare the data again with this tokenizer"
            )
        if tokenizer.eos_id != self.eos_id:
            raise DataError(
                f"the tokenizer in {tokenizer.directory} ends documents with id "
                f"{tokenizer.eos_id}, but {self.path} was prepared with eos {self.eos_id}; use "
                f"{self.tokenizer_dir} or prepare the data again with this tokenizer"
            )

    def _open_split(self, name: str, info: dict, verify: bool) -> Split:
        shards, doc_shard, doc_start, doc_len = [], [], [], []
        for i, shard in enumerate(info["shards"]):
            tokens_file = self.path / shard["tokens_file"]
            index_file = self.path / shard["index_file"]
            for f in (tokens_file, index_file):
                if not f.is_file():
                    raise DataError(f"{self.path} is incomplete: {f.name} is missing")
            size = tokens_file.stat().st_size
            want = shard["tokens"] * self.dtype.itemsize
            if size != want:
                raise DataError(
                    f"{tokens_file} is truncated or damaged: {size} bytes, the manifest says {want}"
                )
            if verify:
                for f, key in ((tokens_file, "sha256"), (index_file, "index_sha256")):
                    if file_sha256(f) != shard[key]:
                        raise DataError(
                            f"{f} does not match its sha256 in {MANIFEST} (corrupted or replaced)"
                        )
            try:
                ends = np.load(index_file)
            except ValueError as e:
                raise DataError(f"{index_file} is not a readable index: {e}") from None
            if len(ends) != shard["documents"] or (len(ends) and ends[-1] != shard["tokens"]):
                raise DataError(f"{index_file} does not match {tokens_file.name}")
            mm = (
                np.memmap(tokens_file, dtype=self.dtype, mode="r")
                if size
                else np.zeros(0, self.dtype)
            )
            shards.append(mm)
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            doc_shard.append(np.full(len(ends), i, np.int32))
            doc_start.append(starts)
            doc_len.append(ends - starts)
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        return Split(
            name, shards, cat(doc_shard, np.int32), cat(doc_start, np.int64), cat(doc_len, np.int64)
        )

    def split(self, name: str) -> Split:
        split = self.splits.get(name)
        if split is None or split.num_documents == 0:
            hint = " (prepare it with --val-fraction > 0)" if name == "val" else ""
            raise DataError(f"{self.path} has no {name} documents{hint}")
        return split
