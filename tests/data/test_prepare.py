"""``hylas data prepare``: text in every input format -> token shards -> the same documents
back, and every kind of bad input stopped with one sentence and nothing half-written."""

import itertools
import json
import os

import numpy as np
import pytest

from hylas.data.corpus import load_corpus
from hylas.data.dataset import PreparedData
from hylas.data.prepare import ShardWriter, prepare, text_hash, token_dtype, write_prepared
from hylas.data.sources import DataError, open_sources
from hylas.data.tokenizer import train_tokenizer
from hylas.train.cli import main


@pytest.fixture(scope="module")
def texts():
    """60 documents of 1-5,000 characters cut from the corpus, plus non-ASCII ones."""
    text = load_corpus()[7].text + load_corpus()[8].text
    rng = np.random.default_rng(0)
    cuts = np.cumsum(rng.integers(1, 5_000, size=59))
    assert cuts[-1] < len(text)
    docs = [text[a:b] for a, b in itertools.pairwise(cuts)]
    return [*docs, "naïve café, 東京 🙂\n", "x"]


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def documents(data: PreparedData, split: str) -> list[np.ndarray]:
    s = data.split(split)
    return [s.document(d) for d in range(s.num_documents)]


def expected(tokenizer, texts, val_fraction):
    train = [t for t in texts if text_hash(t) / 2**64 >= val_fraction]
    val = [t for t in texts if text_hash(t) / 2**64 < val_fraction]
    encode = lambda ts: [[*tokenizer.encode(t), tokenizer.eos_id] for t in ts]  # noqa: E731
    return encode(train), encode(val)


def test_prepare_then_load_gives_back_every_document(tmp_path, tokenizer, texts):
    m = prepare(
        open_sources([str(write_jsonl(tmp_path / "a.jsonl", texts))]),
        tokenizer,
        tmp_path / "out",
        val_fraction=0.1,
        progress=False,
    )
    data = PreparedData(tmp_path / "out")
    data.check_tokenizer(tokenizer)
    train, val = expected(tokenizer, texts, 0.1)
    assert [d.tolist() for d in documents(data, "train")] == train
    assert [d.tolist() for d in documents(data, "val")] == val
    assert data.dtype == np.uint16 and data.eos_id == tokenizer.eos_id
    assert m["splits"]["train"]["tokens"] == sum(map(len, train))
    assert m["sources"][0]["documents"] == len(texts)
    assert m["tokenizer"]["sha256"] == tokenizer.sha256
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_worker_count_and_shard_size_do_not_change_the_token_stream(tmp_path, tokenizer, texts):
    src = str(write_jsonl(tmp_path / "a.jsonl", texts))
    outs = {}
    for workers, shard_tokens in [(1, 1 << 28), (2, 1 << 28), (2, 3_000)]:
        out = tmp_path / f"w{workers}-{shard_tokens}"
        prepare(
            open_sources([src]),
            tokenizer,
            out,
            workers=workers,
            shard_tokens=shard_tokens,
            val_fraction=0.05,
            progress=False,
        )
        outs[workers, shard_tokens] = PreparedData(out)
    one, two, small = outs.values()
    assert one.manifest["splits"] == two.manifest["splits"]  # byte-identical shards
    shards = small.manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    lengths = [np.diff(np.r_[0, np.load(small.path / s["index_file"])]) for s in shards]
    for s, doc_lengths in zip(shards, lengths, strict=True):
        assert s["tokens"] <= 3_000 or len(doc_lengths) == 1  # only a long document overflows
    stream = lambda d: np.concatenate(documents(d, "train"))  # noqa: E731
    assert np.array_equal(stream(one), stream(small))


def test_workers_start_safely_beside_other_threads(tmp_path, tokenizer, texts, monkeypatch):
    """A process running other threads (wandb's exporters, say) starts its workers from a
    fresh server process, not by fork; the shards are byte-identical to a forked pool's."""
    import threading

    from hylas.data import prepare as prepare_module

    methods = []
    get_context = prepare_module.multiprocessing.get_context

    def recording(method):
        methods.append(method)
        return get_context(method)

    monkeypatch.setattr(prepare_module.multiprocessing, "get_context", recording)
    src = str(write_jsonl(tmp_path / "a.jsonl", texts))
    release = threading.Event()
    outs = []
    for busy in (False, True):
        if busy:
            threading.Thread(target=release.wait, daemon=True).start()
        out = tmp_path / f"busy{busy}"
        prepare(open_sources([src]), tokenizer, out, workers=2, val_fraction=0.05, progress=False)
        outs.append(PreparedData(out))
    release.set()
    assert methods[-1] == "forkserver"  # the first run forks unless other tests left threads
    assert outs[0].manifest["splits"] == outs[1].manifest["splits"]


def test_every_input_format_gives_the_same_documents(tmp_path, tokenizer, texts):
    import datasets

    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(texts):  # one document per file, read in sorted path order
        (tmp_path / "txt" / ("sub" if i >= 30 else "") / f"{i:03d}.txt").write_text(t)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    table = datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))})
    table.to_parquet(str(tmp_path / "docs.parquet"))
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(
        str(tmp_path / "saved")
    )
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "part-0.jsonl", texts[:25])
    write_jsonl(tmp_path / "hub" / "part-1.jsonl", texts[25:])
    inputs = {
        "txt": ([str(tmp_path / "txt")], "text"),
        "jsonl": ([str(tmp_path / "docs.jsonl")], "text"),
        "parquet": ([str(tmp_path / "docs.parquet")], "body"),
        "saved": ([str(tmp_path / "saved")], "body"),
        "datasets builder": ([f"hf:{tmp_path / 'hub'}"], "text"),
        "two inputs": ([str(tmp_path / "hub" / "part-0.jsonl"), f"hf:{tmp_path / 'hub'}"], "text"),
    }
    train, _ = expected(tokenizer, texts, 0)
    for name, (spec, key) in inputs.items():
        out = tmp_path / f"out-{name}"
        prepare(open_sources(spec, text_key=key), tokenizer, out, val_fraction=0, progress=False)
        got = [d.tolist() for d in documents(PreparedData(out), "train")]
        want = train[:25] + train if name == "two inputs" else train
        assert got == want, name
    out = tmp_path / "out-test-split"
    prepare(
        open_sources([str(tmp_path / "saved")], "body", split="test"),
        tokenizer,
        out,
        val_fraction=0,
        progress=False,
    )
    assert len(documents(PreparedData(out), "train")) == 3


def test_large_vocabularies_use_uint32(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint32), shard_tokens=4)
    w.add(np.array([70_000, 2, 100_000, 5, 2], np.uint32), np.array([2, 5]))
    summary = w.finish()
    assert [s["tokens"] for s in summary["shards"]] == [2, 3]  # documents are never split
    assert np.fromfile(tmp_path / "train_00001.bin", np.uint32).tolist() == [100_000, 5, 2]


# -- bad input ------------------------------------------------------------------------------


def run_prepare(tmp_path, tokenizer, inputs, **kw):
    return prepare(
        open_sources([str(i) for i in inputs], **kw), tokenizer, tmp_path / "out", progress=False
    )


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no documents"),
        (b'{"text": ""}\n{"text": null}\n', r"holds no documents \(only 2 empty documents\)"),
        (b'{"text": "fine"}\n{"text": "cut off\n', r"bad\.jsonl:2 is not valid JSON"),
        (
            b'{"text": "fine"}\n{"body": "x"}\n',
            r"bad\.jsonl:2 has no 'text' field \(it has: body\)",
        ),
        (b'{"text": "fine"}\n{"text": 3}\n', r"bad\.jsonl:2: the 'text' field is a int"),
        (
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"bad\.jsonl:2 is not valid UTF-8 \(byte offset 13",
        ),
    ],
)
def test_bad_jsonl_is_refused_naming_the_file_and_line(tmp_path, tokenizer, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        run_prepare(tmp_path, tokenizer, [tmp_path / "bad.jsonl"], bad_utf8="error")
    assert_nothing_written(tmp_path)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok \xc3"}\n{"text": "fine"}\n')
    m = run_prepare(
        tmp_path, tokenizer, [tmp_path / "a.txt", tmp_path / "b.jsonl"], bad_utf8="replace"
    )
    assert [s["bad_utf8_replaced"] for s in m["sources"]] == [3, 1]
    first = PreparedData(tmp_path / "out").split("train").document(0)
    assert tokenizer.decode(first[:-1].tolist()) == "caf\ufffd and \ufffd\ufffd bytes"


def test_an_existing_output_is_never_overwritten(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", ["some text"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("keep")
    with pytest.raises(DataError, match="already exists"):
        run_prepare(tmp_path, tokenizer, [tmp_path / "a.jsonl"])
    assert (tmp_path / "out" / "precious").read_text() == "keep"


def test_an_interrupted_prepare_leaves_nothing_that_looks_finished(tmp_path, tokenizer, texts):
    def documents_then_interrupt():
        for t in texts * 30:  # several tasks are tokenized and written before the interrupt
            yield t, False
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_prepared(documents_then_interrupt(), tokenizer, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path)


def test_unknown_inputs_are_refused(tmp_path, tokenizer):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="does not exist"):
        open_sources([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="cannot tell its format"):
        open_sources([str(tmp_path / "a.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt"):
        open_sources([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="cannot open hf:"):
        run_prepare(tmp_path, tokenizer, [f"hf:{tmp_path / 'nowhere'}"])


@pytest.fixture
def prepared(tmp_path, tokenizer, texts):
    write_jsonl(tmp_path / "a.jsonl", texts)
    prepare(
        open_sources([str(tmp_path / "a.jsonl")]),
        tokenizer,
        tmp_path / "out",
        shard_tokens=20_000,
        progress=False,
    )
    return tmp_path / "out"


def test_damaged_prepared_data_is_refused(prepared):
    shard = prepared / "train_00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(
        DataError, match=r"train_00001\.bin is truncated or damaged: \d+ bytes, the manifest says"
    ):
        PreparedData(prepared)
    shard.write_bytes(bytes([raw[0] ^ 1]) + raw[1:])
    with pytest.raises(DataError, match=r"train_00001\.bin does not match its sha256"):
        PreparedData(prepared)
    PreparedData(prepared, verify=False)  # the size check alone passes: same length
    shard.unlink()
    with pytest.raises(DataError, match=r"incomplete: train_00001\.bin is missing"):
        PreparedData(prepared)
    (prepared / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"not a prepared dataset: it has no manifest\.json"):
        PreparedData(prepared)


def test_a_different_tokenizer_is_refused(prepared, tmp_path):
    other = train_tokenizer(["other words entirely\n"] * 200, 300, tmp_path / "other")
    with pytest.raises(DataError, match=r"does not match the one .* was prepared with"):
        PreparedData(prepared).check_tokenizer(other)


def test_command_line_prepares_and_reports_errors_in_one_line(tmp_path, tokenizer, texts, capsys):
    write_jsonl(tmp_path / "a.jsonl", texts)
    tok = str(tokenizer.directory)
    args = ["data", "prepare", "--input", str(tmp_path / "a.jsonl"), "--tokenizer", tok]
    assert main([*args, "--out", str(tmp_path / "out"), "--workers", "2"]) == 0
    assert "prepared 60 documents" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hylas: error:") and "already exists" in err and "\n" not in err
    tok_args = ["--vocab-size", "1000", "--out", str(tmp_path / "tok")]
    assert main(["data", "tokenizer", "--input", str(tmp_path / "a.jsonl"), *tok_args]) == 0
    assert "1000-piece tokenizer" in capsys.readouterr().out
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def _die(job):
    os._exit(3)


def test_a_dead_worker_stops_the_run_instead_of_hanging(tmp_path, tokenizer, texts, monkeypatch):
    import hylas.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_encode_job", _die)
    with pytest.raises(DataError, match="a tokenizer worker process died"):
        write_prepared(((t, False) for t in texts), tokenizer, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path)


def test_one_text_file_by_paragraph_goes_to_the_workers_in_raw_blocks(
    tmp_path, tokenizer, texts, monkeypatch
):
    """Paragraph mode hands the workers raw blocks cut at blank lines (4 KiB here, so
    there are many); they split, count and hash. Against the paragraphs read one by one:
    the same documents, tokens, held-out split and counts, with 1 and 2 workers."""
    from hylas.data import sources

    body = "\n\n \n".join(t.strip() for t in texts if t.strip())
    (tmp_path / "book.txt").write_bytes((body + "\n").encode() + b"caf\xe9\n")
    [reader] = open_sources([str(tmp_path / "book.txt")], split_documents="paragraph")
    paragraphs = list(reader)
    assert len(paragraphs) > 60
    monkeypatch.setattr(sources, "_RAW_BLOCK", 4096)
    [again] = open_sources([str(tmp_path / "book.txt")], split_documents="paragraph")
    raw = list(again.raw())
    assert len(raw) > 20 and all(isinstance(b, sources.RawParagraphs) for b in raw)
    train, val = expected(tokenizer, paragraphs, 0.1)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        m = prepare(
            open_sources([str(tmp_path / "book.txt")], split_documents="paragraph"),
            tokenizer,
            out,
            workers=workers,
            val_fraction=0.1,
            progress=False,
        )
        data = PreparedData(out)
        assert [d.tolist() for d in documents(data, "train")] == train
        assert [d.tolist() for d in documents(data, "val")] == val
        counts = {k: m["sources"][0][k] for k in ("documents", "characters", "bad_utf8_replaced")}
        assert counts == {
            "documents": len(paragraphs),
            "characters": sum(map(len, paragraphs)),
            "bad_utf8_replaced": 1,
        }


def test_bad_utf8_in_a_raw_block_names_the_file_and_offset(tmp_path, tokenizer, monkeypatch):
    from hylas.data import sources

    monkeypatch.setattr(sources, "_RAW_BLOCK", 64)
    data = b"".join(b"paragraph %d\nof text\n\n" % i for i in range(40))
    (tmp_path / "book.txt").write_bytes(data + b"caf\xe9\n")
    with pytest.raises(
        DataError, match=rf"book\.txt is not valid UTF-8 \(byte offset {len(data) + 3}:"
    ):
        run_prepare(
            tmp_path,
            tokenizer,
            [tmp_path / "book.txt"],
            split_documents="paragraph",
            bad_utf8="error",
        )
    assert_nothing_written(tmp_path)
