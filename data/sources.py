"""Where documents come from: the ``--input`` items of ``hylas data tokenizer`` and
``hylas data prepare``.

An input is one of
- a ``.txt`` / ``.md`` / ``.text`` file: documents as ``split_documents`` says (below);
- a ``.jsonl`` / ``.ndjson`` / ``.json`` file: JSON lines, one object per line, the document
  in ``text_key`` (a file holding one JSON array is refused with that said);
- any of the above compressed, ``.gz`` / ``.zst`` / ``.xz`` / ``.bz2`` (``a.jsonl.zst``,
  ``b.txt.gz``): decompressed as a stream, never copied; zstd frames written with
  ``zstd --long`` (windows up to 2 GiB) decode too;
- a ``.parquet`` file: the document column ``text_key`` (read with ``datasets``, streamed);
- a directory saved with ``datasets`` (``Dataset.save_to_disk``): the column ``text_key``
  of ``split`` when it holds several splits;
- any other directory: every file above inside it, recursively, in sorted order. Files of
  other kinds are named in one warning (an error when nothing is left); hidden files and
  directories (names starting with ``.``, e.g. ``.DS_Store``, ``.git``) are passed over;
- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset(NAME, CONFIG, split=split,
  streaming=True)``, a hub dataset (from its cache when offline) or a local folder of data
  files, streamed so a large one never has to fit on disk twice.

``split_documents`` cuts text files into documents: ``none`` (the whole file is one
document), ``paragraph`` (runs of lines separated by blank or whitespace-only lines),
``line`` (each non-blank line, without its line ending) or ``auto``: ``paragraph`` when the
inputs are one single text file over 1 MB on disk (a compressed one judged by its
compressed size), else ``none``. ``paragraph`` and ``line`` stream the file line by line.

Text and JSON lines are decoded here so that invalid UTF-8 is handled by the user's choice:
``replace`` (each bad byte sequence becomes U+FFFD and is counted) or ``error`` (refused,
naming the file and the byte offset: from the start of the line named for JSON lines, of the
file for text, counted in decompressed bytes for a compressed file). Empty documents are
skipped and counted; blank lines that only separate documents are not.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import contextlib
import copy
import dataclasses
import gzip
import io
import itertools
import json
import logging
import lzma
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, overload

import zstandard

from hylas.configs.base import DataError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".xz": "xz", ".bz2": "bzip2"}
BAD_UTF8 = ("replace", "error")
SPLIT_DOCUMENTS = ("auto", "none", "paragraph", "line")
AUTO_PARAGRAPH_BYTES = 1_000_000  # auto: a single text file larger than this is split
READABLE = f"{', '.join(FILE_SUFFIXES)} (text and JSON lines also as {', '.join(COMPRESSIONS)})"
# binary stream -> decompressed binary stream; zstd allows ``zstd --long`` windows (2 GiB)
_DECOMPRESS: dict[str, Callable[[BinaryIO], io.BufferedIOBase]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f),
    "zstd": lambda f: io.BufferedReader(_ZstdFrames(f), 1 << 20),
    "xz": lzma.LZMAFile,
    "bzip2": bz2.BZ2File,
}
# what a decompressor raises on a truncated or corrupt stream
_CORRUPT = (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError)
# A paragraph: a run of lines that each hold a byte other than ASCII whitespace (what
# bytes.strip() removes), from its first line's start to its last line's end.
_PARAGRAPH = re.compile(rb"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")
_PARAGRAPH_BLOCK = 4 << 20  # bytes read at a time in paragraph mode
# A line end followed by a blank (whitespace-only) line: paragraphs can be cut apart after
# its first byte. Raw blocks of about _RAW_BLOCK bytes go to the tokenizer workers
# (256 KiB: 1 MiB blocks left a worker idle at the end of a 20 MB file, 1.85x against 1.94x).
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
_RAW_BLOCK = 1 << 18


@dataclass
class SourceStats:
    """What reading one input found, for the manifest and the closing log line."""

    input: str
    kind: str
    documents: int = 0
    characters: int = 0  # in the documents kept
    bytes_read: int = 0  # of the input files so far (for progress)
    empty_skipped: int = 0
    bad_utf8_replaced: int = 0
    split_documents: str | None = None  # how text files were cut; None when it read none
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dict(vars(self))
        if len(self.files) > 20:
            out["files"] = [*self.files[:20], f"... {len(self.files) - 20} more"]
        return out


@dataclass
class RawParagraphs:
    """Whole paragraphs of a text file, as its bytes cut at a blank line: split, decoded and
    counted (:func:`split_paragraphs`) by whoever tokenizes them, so that the process
    reading a large file does nothing per document (``hylas data prepare``'s workers)."""

    data: bytes
    where: str  # the file, for error messages
    offset: int  # of data[0] in the file (decompressed)
    bad_utf8: str
    stats: SourceStats  # the source's; ``count`` adds what splitting found

    def job(self) -> tuple[bytes, str, int, str]:
        """What a worker needs: :func:`split_paragraphs`'s arguments."""
        return self.data, self.where, self.offset, self.bad_utf8

    def count(self, documents: int, characters: int, bad_utf8_replaced: int) -> None:
        self.stats.documents += documents
        self.stats.characters += characters
        self.stats.bad_utf8_replaced += bad_utf8_replaced


def split_paragraphs(data: bytes, where: str, offset: int, bad_utf8: str) -> tuple[list[str], int]:
    """The paragraphs of ``data`` (bytes of ``where`` from ``offset`` on), each decoded once
    without its final line end, and the number of bad UTF-8 sequences replaced."""
    texts, replaced = [], 0
    for m in _PARAGRAPH.finditer(data):
        text, bad = _decode(m.group(), where, bad_utf8, offset + m.start())
        replaced += bad
        texts.append(text.rstrip("\r\n"))
    return texts, replaced


def _last_blank_line(buf: bytes, start: int = 0) -> int:
    """Just past the last line end of ``buf`` that a blank line follows (paragraphs end
    before it), looking no earlier than ``start``; 0 when there is none. Searched from the
    end in growing windows."""
    window = 1 << 16
    while True:
        lo = max(start, len(buf) - window)
        starts = [m.start() for m in _BLANK_LINE.finditer(buf, lo)]
        if starts:
            return starts[-1] + 1
        if lo == start:
            return 0
        window *= 4


class _Replacements:
    """A codec error handler that replaces bad bytes with U+FFFD and counts them."""

    count = 0

    @classmethod
    def handler(cls, err: UnicodeError) -> tuple[str, int]:
        if not isinstance(err, UnicodeDecodeError):  # registered for decoding only
            raise err
        cls.count += 1
        return "\ufffd", err.end


codecs.register_error("hylas-count", _Replacements.handler)


def _decode(raw: bytes, where: str, bad_utf8: str, offset: int = 0) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if bad_utf8 == "error":
            raise DataError(
                f"{where} is not valid UTF-8 (byte offset {offset + e.start}: "
                f"{raw[e.start : e.start + 4]!r}); "
                "pass --bad-utf8 replace to replace such bytes and count them"
            ) from None
    before = _Replacements.count
    text = raw.decode("utf-8", errors="hylas-count")
    return text, _Replacements.count - before


def _format(path: Path) -> tuple[str | None, str | None]:
    """(``text``, ``jsonl``, ``parquet`` or None when unreadable; the compression or None),
    from the file name."""
    compression = COMPRESSIONS.get(path.suffix)
    inner = Path(path.stem).suffix if compression else path.suffix
    if inner in TEXT_SUFFIXES:
        return "text", compression
    if inner in JSONL_SUFFIXES:
        return "jsonl", compression
    if inner in PARQUET_SUFFIXES and not compression:
        return "parquet", None
    return None, None


class _Counted(io.RawIOBase):
    """A file that adds the bytes read from it to ``stats.bytes_read`` (for progress)."""

    def __init__(self, fh, stats: SourceStats):
        self.fh, self.stats = fh, stats

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        self.stats.bytes_read += n
        return n


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after another, with ``zstd --long`` windows (up to 2 GiB). Unlike
    zstandard's stream reader, which returns a cut frame's partial data in silence, it
    raises EOFError when the input ends inside a frame."""

    def __init__(self, raw):
        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self.frame = self.dctx.decompressobj()
        self.inside = False  # part of the current frame has been read
        self.pending = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending:
            data = self.raw.read(1 << 20)
            if not data:
                if self.inside:
                    raise EOFError("the input ends inside a zstd frame")
                return 0
            while data:
                self.inside = True
                self.pending += self.frame.decompress(data)
                data = b""
                if self.frame.eof:  # the next frame starts in what is left
                    data, self.inside = self.frame.unused_data, False
                    self.frame = self.dctx.decompressobj()
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        del self.pending[:n]
        return n


class Source:
    """One ``--input`` item. Iterating yields its documents (non-empty strings) in order;
    ``stats`` fills in as it goes."""

    def __init__(
        self,
        spec: str,
        text_key: str = "text",
        split: str = "train",
        bad_utf8: str = "replace",
        split_documents: str = "auto",
    ):
        if bad_utf8 not in BAD_UTF8:
            raise DataError(f"--bad-utf8 must be replace or error, got {bad_utf8!r}")
        if split_documents not in SPLIT_DOCUMENTS:
            raise DataError(
                f"--split-documents must be one of {', '.join(SPLIT_DOCUMENTS)}, "
                f"got {split_documents!r}"
            )
        self.spec, self.text_key, self.split, self.bad_utf8 = spec, text_key, split, bad_utf8
        if spec.startswith("hf:"):
            self.kind, self.files = "datasets", []
        else:
            path = Path(spec)
            if not path.exists():
                raise DataError(f"input {spec} does not exist")
            if path.is_dir() and _is_saved_dataset(path):
                self.kind, self.files = "saved dataset", [path]
            elif path.is_dir():
                self.kind = "directory"
                self.files = self._directory(path)
            elif _format(path)[0]:
                self.kind, self.files = "file", [path]
            else:
                raise DataError(
                    f"input {spec}: cannot tell its format from the name; use one of "
                    f"{READABLE}, a datasets directory, or hf:NAME"
                )
        texts = [f for f in self.files if _format(f)[0] == "text"]
        if split_documents == "auto":
            big = self.kind == "file" and texts and texts[0].stat().st_size > AUTO_PARAGRAPH_BYTES
            split_documents = "paragraph" if big else "none"
        self.split_documents = split_documents
        self._raw = False  # paragraphs as RawParagraphs blocks (see raw())
        self.stats = SourceStats(
            spec,
            self.kind,
            split_documents=split_documents if texts else None,
            files=[str(f) for f in self.files],
        )

    def _directory(self, path: Path) -> list[Path]:
        """The readable files under ``path``; the others named in one warning."""
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        files = [p for p in found if _format(p)[0]]
        others = [str(p.relative_to(path)) for p in found if not _format(p)[0]]
        if others:
            listed = ", ".join(others[:10]) + (
                f" and {len(others) - 10} more" if len(others) > 10 else ""
            )
            if not files:
                raise DataError(
                    f"input directory {self.spec} holds no file Hylas can read, only "
                    f"{len(others)} of other kinds ({listed}); readable: {READABLE}"
                )
            logging.getLogger("hylas").warning(
                "input directory %s: skipping %d file(s) Hylas cannot read: %s",
                self.spec,
                len(others),
                listed,
            )
        if not files:
            raise DataError(f"input directory {self.spec} holds no {READABLE} files")
        return files

    @property
    def total_bytes(self) -> int | None:
        """Bytes on disk to read, for a progress bar; None when not known ahead."""
        if self.kind in ("file", "directory"):
            return sum(f.stat().st_size for f in self.files)
        return None

    def __iter__(self) -> Iterator[str]:
        yield from self._items(raw=False)
        self.check_documents()

    def raw(self) -> Iterator[str | RawParagraphs]:
        """The documents as iterating gives them, except that a text file in paragraph mode
        comes as :class:`RawParagraphs` blocks of about ``_RAW_BLOCK`` bytes, counted once
        they are split; call :meth:`check_documents` when they all are."""
        return self._items(raw=True)

    @overload
    def _items(self, raw: Literal[False]) -> Iterator[str]: ...

    @overload
    def _items(self, raw: Literal[True]) -> Iterator[str | RawParagraphs]: ...

    def _items(self, raw: bool) -> Iterator[str | RawParagraphs]:
        """The documents; with ``raw``, paragraph-mode text as RawParagraphs blocks."""
        self._raw = raw
        if self.kind == "datasets":
            yield from self._keep(self._datasets_stream())
        elif self.kind == "saved dataset":
            yield from self._keep(self._saved_dataset())
        else:
            for f in self.files:
                yield from self._file(f)

    def check_documents(self) -> None:
        """Refuse an input that held no documents, in one sentence."""
        if self.stats.documents == 0:
            what = f"{self.stats.empty_skipped} empty documents" if self.stats.empty_skipped else ""
            raise DataError(
                f"input {self.spec} holds no documents{' (only ' + what + ')' if what else ''}"
            )

    # -- formats ------------------------------------------------------------------------

    def _file(self, f: Path) -> Iterator[str | RawParagraphs]:
        kind, compression = _format(f)
        if kind == "text":
            yield from self._keep(self._text(f, compression))
        elif kind == "jsonl":
            yield from self._keep(self._jsonl(f, compression))
        else:
            yield from self._keep(self._parquet(f))
            self.stats.bytes_read += f.stat().st_size

    @contextlib.contextmanager
    def _open(self, f: Path, compression: str | None) -> Iterator[io.BufferedIOBase]:
        """``f`` as a binary stream, decompressed on the fly; a decompression failure becomes
        one DataError naming the file. Bytes read from disk are counted for progress."""
        with open(f, "rb", buffering=0) as fh:
            raw = io.BufferedReader(_Counted(fh, self.stats), 1 << 20)
            stream = _DECOMPRESS[compression](raw) if compression else raw
            try:
                yield stream
            except _CORRUPT as e:
                if compression is None:
                    raise
                raise DataError(f"{f} is truncated or corrupt ({compression}): {e}") from None

    def _text(self, f: Path, compression: str | None) -> Iterator[str | RawParagraphs]:
        with self._open(f, compression) as stream:
            if self.split_documents == "none":
                text, bad = _decode(stream.read(), str(f), self.bad_utf8)
                self.stats.bad_utf8_replaced += bad
                yield text
                return
            if self.split_documents == "paragraph":
                if self._raw:
                    yield from self._raw_paragraphs(stream, f)
                else:
                    yield from self._paragraphs(stream, f)
                return
            # A document's lines are gathered as bytes and decoded once, from its first byte.
            offset, start = 0, 0
            lines: list[bytes] = []
            for raw in itertools.chain(stream, [b""]):  # b"": a blank line ends the last one
                blank = not raw.strip()
                if not blank:
                    if not lines:
                        start = offset
                    lines.append(raw)
                offset += len(raw)
                if lines and (blank or self.split_documents == "line"):
                    text, bad = _decode(b"".join(lines), str(f), self.bad_utf8, start)
                    self.stats.bad_utf8_replaced += bad
                    yield text.rstrip("\r\n")
                    lines = []

    def _paragraphs(self, stream: io.BufferedIOBase, f: Path) -> Iterator[str]:
        """Blank-line separated paragraphs, found by a regular expression over large blocks
        (not line by line in Python); a paragraph that reaches a block's last line waits
        for the next block. Each is decoded once, without its final line end."""
        carry, base = b"", 0  # unfinished bytes, and the file offset where they start
        while True:
            block = stream.read(_PARAGRAPH_BLOCK)
            buf = carry + block
            end = len(buf) if not block else buf.rfind(b"\n") + 1  # whole lines only
            last = None
            for m in _PARAGRAPH.finditer(buf, 0, end):
                if block and m.end() + 1 >= end:  # it may go on in the next block
                    last = m.start()
                    break
                text, bad = _decode(m.group(), str(f), self.bad_utf8, base + m.start())
                self.stats.bad_utf8_replaced += bad
                yield text.rstrip("\r\n")
            if not block:
                return
            cut = end if last is None else last
            carry, base = buf[cut:], base + cut

    def _raw_paragraphs(self, stream: io.BufferedIOBase, f: Path) -> Iterator[RawParagraphs]:
        """The file in blocks of whole paragraphs, each cut after a line end that a blank
        line follows; a block with no such place waits for more of the file."""
        carry, base = b"", 0  # bytes not handed out yet, and the file offset of their start
        while True:
            block = stream.read(_RAW_BLOCK)
            buf = carry + block
            if not block:
                if buf:
                    yield RawParagraphs(buf, str(f), base, self.bad_utf8, self.stats)
                return
            # The carried bytes were searched already: look again only near their end (a
            # blank line the new bytes complete), so a paragraph longer than a block costs
            # one pass over it, not one per block.
            cut = _last_blank_line(buf, max(0, len(carry) - 4096))
            if cut:
                yield RawParagraphs(buf[:cut], str(f), base, self.bad_utf8, self.stats)
            carry, base = buf[cut:], base + cut

    def _jsonl(self, f: Path, compression: str | None) -> Iterator[str]:
        with self._open(f, compression) as stream:
            first = True
            for lineno, raw in enumerate(stream, 1):
                if not raw.strip():
                    continue
                if first and raw.lstrip().startswith(b"["):
                    raise DataError(
                        f"{f} holds a JSON array, not JSON lines; write one object per line"
                    )
                first = False
                where = f"{f}:{lineno}"
                line, bad = _decode(raw, where, self.bad_utf8)
                self.stats.bad_utf8_replaced += bad
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON ({e.msg})") from None
                yield self._field(record, where)

    def _field(self, record, where: str) -> str:
        if not isinstance(record, dict) or self.text_key not in record:
            fields = (
                ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
            )
            raise DataError(
                f"{where} has no {self.text_key!r} field (it has: {fields}); "
                "name the text field with --text-key"
            )
        text = record[self.text_key]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise DataError(
                f"{where}: the {self.text_key!r} field is a {type(text).__name__}, not text"
            )
        return text

    def _parquet(self, f: Path) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset("parquet", data_files=str(f), split="train", streaming=True)
            yield from self._column(ds, str(f))
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{f} is not a readable parquet file ({e})") from None

    def _saved_dataset(self) -> Iterator[str]:
        import datasets

        ds = datasets.load_from_disk(self.spec)
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(
                    f"{self.spec} has no split {self.split!r} (it has: {', '.join(ds)}); "
                    "choose one with --split"
                )
            ds = ds[self.split]
        yield from self._column(ds, self.spec)

    def _datasets_stream(self) -> Iterator[str]:
        import datasets

        name, _, config = self.spec[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=self.split, streaming=True)
        except Exception as e:  # datasets raises many kinds; one sentence for all
            raise DataError(f"cannot open {self.spec} with datasets: {e}") from None
        yield from self._column(ds, self.spec)

    def _column(self, ds, where: str) -> Iterator[str]:
        columns = ds.column_names
        if columns is not None and self.text_key not in columns:
            raise DataError(
                f"{where} has no column {self.text_key!r} (it has: {', '.join(columns)}); "
                "name the text column with --text-key"
            )
        for batch in ds.select_columns([self.text_key]).iter(batch_size=1024):
            for text in batch[self.text_key]:
                if text is not None and not isinstance(text, str):
                    raise DataError(
                        f"{where}: the {self.text_key!r} column holds {type(text).__name__}, not text"
                    )
                yield text or ""

    def _keep(self, texts) -> Iterator[str | RawParagraphs]:
        stats = self.stats
        for text in texts:
            if isinstance(text, RawParagraphs):  # counted where it is split
                yield text
                continue
            if not text:
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            stats.characters += len(text)
            yield text


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def open_sources(
    inputs: list[str],
    text_key: str = "text",
    split: str = "train",
    bad_utf8: str = "replace",
    split_documents: str = "auto",
) -> list[Source]:
    """One Source per input; ``auto`` splitting applies only when there is a single input."""
    if not inputs:
        raise DataError("no --input given")
    if split_documents == "auto" and len(inputs) > 1:
        split_documents = "none"
    return [Source(os.fspath(i), text_key, split, bad_utf8, split_documents) for i in inputs]


def part_sources(sources: list[Source], index: int, count: int) -> tuple[list[Source], list[str]]:
    """The sources cut down to part ``index`` (1-based) of ``count``, and its files: every
    input file, sorted by its resolved path, goes to part ``k mod count + 1`` where ``k`` is its
    place in that order, whatever the order of the inputs."""
    for s in sources:
        if s.kind not in ("file", "directory"):
            raise DataError(f"--part slices inputs by file, and {s.spec} is a {s.kind} input")
    ranked = sorted(str(f.resolve()) for s in sources for f in s.files)
    twice = [f for f, n in collections.Counter(ranked).items() if n > 1]
    if twice:
        raise DataError(f"input file {twice[0]} is named more than once among the inputs")
    files = ranked[index - 1 :: count]
    if not files:
        raise DataError(
            f"part {index}/{count} has no input files ({count} is larger than the number of "
            f"files, {len(ranked)})"
        )
    mine, cut = set(files), []
    for s in sources:
        kept = [f for f in s.files if str(f.resolve()) in mine]
        if kept:
            part = copy.copy(s)
            part.files = kept
            part.stats = dataclasses.replace(s.stats, files=[str(f) for f in kept])
            cut.append(part)
    return cut, files
