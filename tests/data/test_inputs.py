"""Input files: compressed text and JSON lines read as streams, directories that name what
they skip, text split into documents, and bad compressed input stopped with one sentence."""

import bz2
import gzip
import json
import logging
import lzma

import pytest
import zstandard

from hylas.data.sources import DataError, open_sources

DOCS = ["naïve café, 東京 🙂", "second document\nwith two lines", "Ελληνικά και русский", "x"]
JSONL = "".join(json.dumps({"text": t}) + "\n" for t in DOCS).encode()
COMPRESS = {
    "gz": gzip.compress,
    "zst": zstandard.ZstdCompressor().compress,
    "xz": lzma.compress,
    "bz2": bz2.compress,
}


def read(*inputs, **kw) -> list[str]:
    return [text for source in open_sources([str(i) for i in inputs], **kw) for text in source]


@pytest.mark.parametrize(
    "name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.json.xz", "a.jsonl.bz2"]
)
def test_compressed_json_lines_give_the_same_documents(tmp_path, name):
    compression = name.split(".")[-1]
    (tmp_path / name).write_bytes(
        COMPRESS[compression](JSONL) if compression in COMPRESS else JSONL
    )
    assert read(tmp_path / name) == DOCS


def test_compressed_text_files_are_one_document_each(tmp_path):
    for n, text in enumerate(DOCS):
        (tmp_path / f"{n}.txt.gz").write_bytes(gzip.compress(text.encode()))
    assert read(tmp_path) == DOCS


def test_zstd_long_window_frames_decode(tmp_path):
    data = b"".join(
        json.dumps({"text": f"{t} {n}"}).encode() + b"\n" for n, t in enumerate(DOCS * 5000)
    )
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown
    frame = writer.compress(data) + writer.flush()
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    (tmp_path / "long.jsonl.zst").write_bytes(frame + frame)  # two frames, read across
    assert read(tmp_path / "long.jsonl.zst") == [f"{t} {n}" for n, t in enumerate(DOCS * 5000)] * 2


def test_a_directory_names_what_it_skips(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "sub" / "b.txt").write_text("plain text")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    (tmp_path / "sub" / "paper.pdf").write_bytes(b"%PDF")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="hylas"):
        assert read(tmp_path) == [*DOCS, "plain text"]
    [warning] = caplog.records
    assert "skipping 2 file(s)" in warning.message
    assert "sub/paper.pdf, table.csv" in warning.message and ".DS_Store" not in warning.message


def test_a_directory_of_nothing_readable_is_refused_with_the_list(tmp_path):
    for n in range(12):
        (tmp_path / f"{n:02}.csv").write_text("a,b\n")
    with pytest.raises(
        DataError, match=r"holds no file Hylas can read, only 12 .*09\.csv and 2 more"
    ):
        read(tmp_path)


TEXT = "First paragraph,\nstill first.\n\n  \nSecond 東京.\n\n\n\nThird\r\nand last"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", [TEXT]),
        ("paragraph", ["First paragraph,\nstill first.", "Second 東京.", "Third\r\nand last"]),
        ("line", ["First paragraph,", "still first.", "Second 東京.", "Third", "and last"]),
    ],
)
def test_a_text_file_is_split_as_asked(tmp_path, mode, expected):
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(TEXT.encode()))
    [source] = open_sources([str(tmp_path / "a.txt.xz")], split_documents=mode)
    assert list(source) == expected
    assert source.stats.split_documents == mode and source.stats.empty_skipped == 0


def test_auto_splits_a_single_large_text_file_by_paragraph(tmp_path):
    (tmp_path / "big.txt").write_text("a paragraph of text\n\n" * 60_000)  # 1.26 MB
    (tmp_path / "small.txt").write_text("one\n\ntwo\n")
    [big] = open_sources([str(tmp_path / "big.txt")])
    assert big.stats.split_documents == "paragraph" and sum(1 for _ in big) == 60_000
    [small] = open_sources([str(tmp_path / "small.txt")])
    assert small.stats.split_documents == "none" and list(small) == ["one\n\ntwo\n"]
    both = open_sources([str(tmp_path / "big.txt"), str(tmp_path / "small.txt")])
    assert [s.stats.split_documents for s in both] == ["none", "none"]


def test_invalid_utf8_offset_counts_decompressed_bytes(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"ok\n\ncaf\xe9\n"))
    with pytest.raises(DataError, match=r"a\.txt\.gz is not valid UTF-8 \(byte offset 7"):
        read(tmp_path / "a.txt.gz", bad_utf8="error", split_documents="line")
    assert read(tmp_path / "a.txt.gz", split_documents="line") == ["ok", "caf\ufffd"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "cut.jsonl.gz",
            gzip.compress(JSONL)[:-12],
            r"cut\.jsonl\.gz is truncated or corrupt \(gzip\)",
        ),
        ("cut.txt.xz", lzma.compress(JSONL)[:-12], r"cut\.txt\.xz is truncated or corrupt \(xz\)"),
        (
            "bad.jsonl.zst",
            (z := zstandard.ZstdCompressor().compress(JSONL * 50))[:20] + b"\xff" * 20 + z[40:],
            r"bad\.jsonl\.zst is truncated or corrupt \(zstd\)",
        ),
        (
            "cut.jsonl.zst",  # zstandard's own stream reader would return the part in silence
            zstandard.ZstdCompressor().compress(JSONL * 50)[:-12],
            r"cut\.jsonl\.zst is truncated or corrupt \(zstd\): the input ends inside a zstd frame",
        ),
        (
            "bad.jsonl.gz",
            gzip.compress(JSONL + b'{"text": "cut off\n'),
            r"bad\.jsonl\.gz:5 is not valid JSON",
        ),
        (
            "array.json",
            b' \n [{"text": "a"},\n {"text": "b"}]\n',
            r"array\.json holds a JSON array, not JSON lines; write one object per line",
        ),
    ],
)
def test_bad_compressed_input_is_one_sentence(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read(tmp_path / name)


def test_paragraphs_read_in_blocks_equal_the_line_by_line_rule(tmp_path, monkeypatch):
    """The block-wise paragraph splitter against the rule it implements, written here line
    by line (a paragraph: consecutive lines holding a non-whitespace byte, without its final
    line end), on random bytes with blocks of 1 to 8 bytes so paragraphs cross blocks; and
    the raw blocks ``hylas data prepare`` hands its workers, split there, against the same
    rule, with blocks of 1 to 8 bytes read at a time."""
    import random

    from hylas.data import sources

    rng = random.Random(0)
    pieces = [b"a", b"bc d", b" ", b"\t", b"\r", b"\n", b"\n", b"\xe6\x9d\xb1", b"\xe6", b"\x0c"]
    path = tmp_path / "p.txt"
    for _ in range(300):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        path.write_bytes(data)
        monkeypatch.setattr(sources, "_PARAGRAPH_BLOCK", rng.randint(1, 8))
        monkeypatch.setattr(sources, "_RAW_BLOCK", rng.randint(1, 8))
        expected, lines = [], []
        parts = data.split(b"\n")
        for raw in [p + b"\n" for p in parts[:-1]] + [parts[-1], b""]:
            if raw.strip():
                lines.append(raw)
            elif lines:
                expected.append(b"".join(lines).decode("utf-8", "replace").rstrip("\r\n"))
                lines = []
        [source] = open_sources([str(path)], split_documents="paragraph", bad_utf8="replace")
        split = []
        for block in source.raw():
            assert data[block.offset : block.offset + len(block.data)] == block.data
            texts, replaced = sources.split_paragraphs(*block.job())
            block.count(len(texts), sum(map(len, texts)), replaced)
            split += texts
        assert split == expected, data
        assert source.stats.documents == len(expected)
        if not expected:
            with pytest.raises(DataError, match="holds no documents"):
                source.check_documents()
        [source] = open_sources([str(path)], split_documents="paragraph", bad_utf8="replace")
        if not expected:
            with pytest.raises(DataError, match="holds no documents"):
                list(source)
            continue
        assert list(source) == expected, data
