"""Where documents come from: the ``--input`` items of ``hylas data tokenizer`` and
``hylas data prepare``.

An input is one of
- a ``.txt`` / ``.md`` file: the whole file is one document;
- a ``.jsonl`` file: one JSON object per line, the document in ``text_key``;
- a ``.parquet`` file: the document column ``text_key`` (read with ``datasets``, streamed);
- a directory saved with ``datasets`` (``Dataset.save_to_disk``): the column ``text_key``
  of ``split`` when it holds several splits;
- any other directory: every file above inside it, recursively, in sorted order;
- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset(NAME, CONFIG, split=split,
  streaming=True)``, a hub dataset (from its cache when offline) or a local folder of data
  files, streamed so a large one never has to fit on disk twice.

Text and jsonl files are decoded here so that invalid UTF-8 is handled by the user's choice:
``replace`` (each bad byte sequence becomes U+FFFD and is counted) or ``error`` (refused,
naming the file and the byte offset). Empty documents are skipped and counted.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
BAD_UTF8 = ("replace", "error")


class DataError(ValueError):
    """Input that cannot be used; the message names the file and the problem."""


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
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dict(vars(self))
        if len(self.files) > 20:
            out["files"] = [*self.files[:20], f"... {len(self.files) - 20} more"]
        return out


class _Replacements:
    """A codec error handler that replaces bad bytes with U+FFFD and counts them."""

    count = 0

    @classmethod
    def handler(cls, err: UnicodeDecodeError):
        cls.count += 1
        return "\ufffd", err.end


codecs.register_error("hylas-count", _Replacements.handler)


def _decode(raw: bytes, where: str, bad_utf8: str) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if bad_utf8 == "error":
            raise DataError(
                f"{where} is not valid UTF-8 (byte offset {e.start}: {raw[e.start : e.start + 4]!r}); "
                "pass --bad-utf8 replace to replace such bytes and count them"
            ) from None
    before = _Replacements.count
    text = raw.decode("utf-8", errors="hylas-count")
    return text, _Replacements.count - before


class Source:
    """One ``--input`` item. Iterating yields its documents (non-empty strings) in order;
    ``stats`` fills in as it goes."""

    def __init__(
        self, spec: str, text_key: str = "text", split: str = "train", bad_utf8: str = "replace"
    ):
        if bad_utf8 not in BAD_UTF8:
            raise DataError(f"--bad-utf8 must be replace or error, got {bad_utf8!r}")
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
                self.files = sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                )
                if not self.files:
                    raise DataError(
                        f"input directory {spec} holds no {', '.join(FILE_SUFFIXES)} files"
                    )
            elif path.suffix in FILE_SUFFIXES:
                self.kind, self.files = "file", [path]
            else:
                raise DataError(
                    f"input {spec}: cannot tell its format from the name; use one of "
                    f"{', '.join(FILE_SUFFIXES)}, a datasets directory, or hf:NAME"
                )
        self.stats = SourceStats(spec, self.kind, files=[str(f) for f in self.files])

    @property
    def total_bytes(self) -> int | None:
        """Bytes on disk to read, for a progress bar; None when not known ahead."""
        if self.kind in ("file", "directory"):
            return sum(f.stat().st_size for f in self.files)
        return None

    def __iter__(self) -> Iterator[str]:
        if self.kind == "datasets":
            yield from self._keep(self._datasets_stream())
        elif self.kind == "saved dataset":
            yield from self._keep(self._saved_dataset())
        else:
            for f in self.files:
                yield from self._file(f)
        if self.stats.documents == 0:
            what = f"{self.stats.empty_skipped} empty documents" if self.stats.empty_skipped else ""
            raise DataError(
                f"input {self.spec} holds no documents{' (only ' + what + ')' if what else ''}"
            )

    # -- formats ------------------------------------------------------------------------

    def _file(self, f: Path) -> Iterator[str]:
        if f.suffix in TEXT_SUFFIXES:
            raw = f.read_bytes()
            text, bad = _decode(raw, str(f), self.bad_utf8)
            self.stats.bad_utf8_replaced += bad
            self.stats.bytes_read += len(raw)
            yield from self._keep([text])
        elif f.suffix in JSONL_SUFFIXES:
            yield from self._keep(self._jsonl(f))
        else:
            yield from self._keep(self._parquet(f))
            self.stats.bytes_read += f.stat().st_size

    def _jsonl(self, f: Path) -> Iterator[str]:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                self.stats.bytes_read += len(raw)
                if not raw.strip():
                    continue
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

    def _keep(self, texts) -> Iterator[str]:
        stats = self.stats
        for text in texts:
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
    inputs: list[str], text_key: str = "text", split: str = "train", bad_utf8: str = "replace"
) -> list[Source]:
    if not inputs:
        raise DataError("no --input given")
    return [Source(os.fspath(i), text_key, split, bad_utf8) for i in inputs]
