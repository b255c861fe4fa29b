"""A corpus prepared in parts (``hylas data prepare --part I/N``) and joined with
``hylas data merge``: the same documents, tokenized the same, in the same splits, as one
``prepare`` of the whole; parts that do not belong together are refused with one sentence."""

import itertools
import json

import numpy as np
import pytest

from hylas.data.corpus import load_corpus
from hylas.data.dataset import PreparedData
from hylas.data.sources import open_sources, part_sources
from hylas.data.tokenizer import train_tokenizer
from hylas.train.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six files of 20 documents each: four JSON lines files in a directory tree, two text
    files of one document a line. Returns the --input items."""
    root = tmp_path_factory.mktemp("corpus")
    text = load_corpus()[7].text
    cuts = np.cumsum(np.random.default_rng(0).integers(20, 800, size=121))
    docs = [" ".join(text[a:b].split()) for a, b in itertools.pairwise(cuts)]
    (root / "dir" / "sub").mkdir(parents=True)
    for i, name in enumerate(["dir/b.jsonl", "dir/a.jsonl", "dir/sub/c.jsonl", "dir/sub/d.jsonl"]):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[i::6]))
    for i, name in [(4, "z.txt"), (5, "e.txt")]:
        (root / name).write_text("\n".join(docs[i::6]) + "\n")
    return [str(root / "z.txt"), str(root / "dir"), str(root / "e.txt")]


def prepare_args(inputs, tokenizer, out, *extra):
    return [
        *("data", "prepare", "--input", *inputs, "--tokenizer", str(tokenizer.directory)),
        *("--out", str(out), "--split-documents", "line", "--val-fraction", "0.2"),
        *("--workers", "1", *extra),
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer, corpus):
    """The whole corpus prepared once, and as parts 1/2 and 2/2 (the second with the inputs
    in reverse order)."""
    root = tmp_path_factory.mktemp("prepared")
    assert main(prepare_args(corpus, tokenizer, root / "whole")) == 0
    assert main(prepare_args(corpus, tokenizer, root / "p1", "--part", "1/2")) == 0
    assert main(prepare_args(corpus[::-1], tokenizer, root / "p2", "--part", "2/2")) == 0
    return root


def token_lists(data, split):
    s = data.split(split)
    return sorted(s.document(d).tolist() for d in range(s.num_documents))


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_merged_parts_hold_what_one_prepare_does(tmp_path, prepared, corpus):
    assert (
        main(
            [
                "data",
                "merge",
                str(prepared / "p2"),
                str(prepared / "p1"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    whole, merged = PreparedData(prepared / "whole"), PreparedData(tmp_path / "m", verify=True)
    assert manifest(prepared / "whole")["held_out"]["rule"] == "hash"  # no second pass
    for split in ("train", "val"):
        assert token_lists(merged, split) == token_lists(whole, split)
    assert merged.split("val").num_documents > 0
    m = manifest(tmp_path / "m")
    assert m["held_out"] == manifest(prepared / "whole")["held_out"]
    assert [p["part"]["index"] for p in m["merged"]] == [1, 2]
    names = [s["tokens_file"] for s in m["splits"]["train"]["shards"]]
    assert names == [f"train_{i:05d}.bin" for i in range(len(names))]
    assert sum(s["documents"] for s in m["sources"]) == 120
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_files_go_to_parts_by_path_whatever_the_input_order(prepared, corpus):
    parts = [manifest(prepared / p)["part"] for p in ("p1", "p2")]
    assert [(p["index"], p["count"]) for p in parts] == [(1, 2), (2, 2)]
    every = sorted(parts[0]["files"] + parts[1]["files"])
    assert len(every) == 6 and parts[0]["files"] == every[0::2] and parts[1]["files"] == every[1::2]
    for order in (corpus, corpus[::-1]):
        _, files = part_sources(open_sources(order, split_documents="line"), 2, 2)
        assert files == parts[1]["files"]


def test_a_missing_part_is_refused(tmp_path, prepared, capsys):
    assert main(["data", "merge", str(prepared / "p1"), "--out", str(tmp_path / "m")]) == 2
    assert "part(s) 2 of 2 are missing" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_parts_of_different_tokenizers_are_refused(tmp_path, prepared, corpus, capsys):
    text = load_corpus()[3].text[:20_000]
    other = train_tokenizer(text.splitlines(keepends=True), 400, tmp_path / "tok")
    assert main(prepare_args(corpus, other, tmp_path / "p2", "--part", "2/2")) == 0
    assert (
        main(
            [
                "data",
                "merge",
                str(prepared / "p1"),
                str(tmp_path / "p2"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "was prepared with another tokenizer" in capsys.readouterr().err


def test_parts_without_held_out_documents_are_refused(tmp_path, tokenizer, corpus, capsys):
    args = prepare_args(corpus, tokenizer, tmp_path / "p", "--part", "1/1", "--val-fraction", "0")
    assert main(args) == 0
    assert main(["data", "merge", str(tmp_path / "p"), "--out", str(tmp_path / "m")]) == 2
    assert "hold no held-out documents" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("inputs", "part", "says"),
    [
        (None, "3/2", "--part must be I/N with 1 <= I <= N"),
        (None, "x", "--part must be I/N with 1 <= I <= N"),
        (None, "7/7", "part 7/7 has no input files (7 is larger than the number of files, 6)"),
        (["hf:some/dataset"], "1/2", "--part slices inputs by file, and hf:some/dataset is a"),
    ],
)
def test_bad_parts_are_refused(tmp_path, tokenizer, corpus, capsys, inputs, part, says):
    assert main(prepare_args(inputs or corpus, tokenizer, tmp_path / "p", "--part", part)) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
