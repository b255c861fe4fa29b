"""``hylas sweep``: layer patterns of a ratio and placement, ratios refused up front, the
recommendation rule, and a two-ratio sweep that writes every output and skips its finished
runs when run again."""

import json
import logging
import subprocess

import pytest

from hylas.model.config import ConfigError, ratio_pattern
from hylas.train.cli import main
from hylas.train.experiments.sweep import check_ratios, recommend
from tests.train.launch import REPO, VENV_BIN, env, free_port


@pytest.mark.parametrize(
    "ratio, placement, pattern",
    [
        ("3:1", "end", "LLLFLLLF"),
        ("3:1", "start", "FLLLFLLL"),
        ("3:1", "spread", "LLFLLLFL"),  # softmax layers at floor((j + 1/2) 8 / 2) = 2, 6
        ("7:1", "spread", "LLLLFLLL"),
        ("1:1", "end", "LFLFLFLF"),
        ("6:2", "end", "LLLFLLLF"),
        ("1:0", "spread", "LLLLLLLL"),
        ("0:1", "start", "FFFFFFFF"),
    ],
)
def test_a_ratio_and_placement_give_the_layer_pattern(ratio, placement, pattern):
    assert ratio_pattern(ratio, 8, placement) == pattern


def test_ratios_that_do_not_fit_the_depth_are_refused_naming_those_that_do():
    with pytest.raises(ConfigError) as e:
        check_ratios(["1:0", "5:1", "3:1", "2:1"], 8)
    message = str(e.value)
    assert message.startswith("the ratios 5:1, 2:1 do not fit 8 layers")
    assert "of those asked, 1:0, 3:1 fit;" in message
    assert message.endswith("ratios that fit: 1:0, 7:1, 3:1, 5:3, 1:1, 3:5, 1:3, 1:7, 0:1")
    with pytest.raises(ConfigError, match="must look like '3:1'"):
        check_ratios(["3-1"], 8)
    with pytest.raises(ConfigError, match="placement must be one of end, start, spread"):
        ratio_pattern("3:1", 8, "middle")


def row(name, share, loss, recall, mixer="gla"):
    return {
        "name": name,
        "mixer": mixer,
        "ratio": name,
        "pattern": "",
        "softmax_share": share,
        "eval_loss": loss,
        "recall": recall,
    }


def test_the_recommendation_is_the_most_linear_run_within_both_tolerances():
    rows = [
        row("1:0", 0.0, 5.00, 0.20),  # best loss, recall far below
        row("7:1", 0.125, 5.05, 0.86),  # recall within 0.05, loss within 2%: the pick
        row("3:1", 0.25, 5.02, 0.90),
        row("0:1", 1.0, 5.20, 0.91, mixer="none"),  # best recall, loss 4% over
    ]
    rec = recommend(rows, recall_tolerance=0.05, loss_tolerance=0.02)
    assert (rec["ratio"], rec["best_recall"], rec["best_loss"]) == ("7:1", 0.91, 5.00)
    assert "recall 0.860 within 0.05 of the best 0.910" in rec["text"]
    assert recommend(rows, 0.01, 0.02)["ratio"] == "3:1"  # 7:1's recall no longer close


SWEEP = [
    "sweep",
    "--ratios",
    "1:0,1:1",
    "--mixers",
    "gla",
    "--steps",
    "3",
    "--recall-steps",
    "3",
    "--context",
    "512",
]
SMALL = [
    "--set",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=2",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "train.seq_len=64",
    "train.eval_batches=1",
    "train.dtype=float32",
]


def read_rows(out):
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "one"
    assert main([*SWEEP, "--out", str(out), *SMALL]) == 0
    return out


@pytest.mark.integration
def test_a_two_ratio_sweep_writes_every_output_and_a_rerun_skips_it(one_process_sweep, caplog):
    out = one_process_sweep
    rows = read_rows(out)
    assert [(r["name"], r["pattern"]) for r in rows] == [("gla-1to0", "LL"), ("gla-1to1", "LF")]
    for r in rows:
        assert r["eval_loss"] > 0 and 0 <= r["recall"] <= 1 and len(r["recall_seeds"]) == 2
        assert r["tokens_per_s"] > 0 and r["decode_ms"] > 0 and r["parameters"] > 0
    # the linear layer's cache is constant; the softmax layer adds 2 x 2 heads x 32 x 512 x 2 B
    kv_mb = 2 * 2 * 32 * 512 * 2 / 2**20
    assert rows[1]["cache_mb"] == pytest.approx(rows[0]["cache_mb"] / 2 + kv_mb, rel=1e-6)
    table = (out / "sweep.md").read_text()
    assert "| gla-1to0 | `LL` |" in table and "recommended: gla at" in table
    assert (out / "sweep.png").stat().st_size > 10_000
    assert json.loads((out / "recommendation.json").read_text())["run"] in ("gla-1to0", "gla-1to1")

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    with caplog.at_level(logging.INFO, logger="hylas"):
        assert main([*SWEEP, "--out", str(out), *SMALL]) == 0
    assert sum("complete, skipped" in r.message for r in caplog.records) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == before


@pytest.mark.integration
def test_a_sweep_under_torchrun_is_data_parallel_and_measures_what_one_process_does(
    one_process_sweep,
):
    """Two gloo ranks, one process group for both runs: each run, and each of its two
    recall probes, trains dp = 2 through the engine (the same held-out loss and recall as
    one process, to summation order), rank 0 writes the outputs."""
    out = one_process_sweep.parent / "two"
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "hylas.train.cli",
        *SWEEP,
        "--out",
        str(out),
        *SMALL,
        "parallel.timeout_s=60",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the two runs and their four probes (two recall seeds each)
    assert (proc.stdout + proc.stderr).count("layout: 2 processes (dp 2 x sp 1)") == 2 + 4
    one, two = read_rows(one_process_sweep), read_rows(out)
    assert [r["name"] for r in two] == [r["name"] for r in one]
    for a, b in zip(one, two, strict=True):
        # the ranks run one torch thread, the in-process reference several: sums in another
        # order, so the losses to 1e-5 and the accuracies to 2 answers in 1024
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5), a["name"]
        assert b["recall_seeds"] == pytest.approx(a["recall_seeds"], abs=2 / 1024), a["name"]
        assert b["recall_loss"] == pytest.approx(a["recall_loss"], rel=1e-5), a["name"]
        assert b["cache_mb"] == a["cache_mb"] and b["parameters"] == a["parameters"]
    assert (out / "sweep.md").is_file() and (out / "recommendation.json").is_file()


def test_bad_sweep_arguments_get_their_sentence(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sweep", "--ratios", "1:0,5:1", "--out", out, "--set", "model.n_layers=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hylas: error: the ratio 5:1 does not fit 4 layers")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--placement", "middle", "--out", out])
    assert e.value.code == 2
    assert "invalid choice: 'middle'" in capsys.readouterr().err
    assert main(["sweep", "--ratios", "1:0", "--recall-pairs", "8", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MQAR with 8 distinct keys needs vocab_size >= 18" in err
    assert err.endswith("(--recall-pairs, --recall-seq-len, --recall-vocab)")
    assert not (tmp_path / "s").exists()
