"""The engine in one process: DeepSpeed's config from Hylas's keys, batch layouts, starting
from another run's weights, and wandb from the trainer."""

from __future__ import annotations

import json

import pytest

from hylas.parallel.mesh import Layout
from hylas.train.cli import main
from hylas.train.config import ConfigError, load_config
from hylas.train.engine import batch_layout, deepspeed_config

FAST = [
    "model.d_model=64",
    "model.n_heads=2",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.dtype=float32",
]


def test_batch_layouts_and_the_ones_refused():
    def layout(world, *overrides):
        return batch_layout(load_config("tiny", list(overrides)), Layout(world=world))

    b = layout(2, "train.batch_size=16", "train.micro_batch_size=2")
    assert (b.micro_batch, b.accumulation, b.per_rank) == (2, 4, 8)
    b = layout(4, "train.batch_size=16")
    assert (b.micro_batch, b.accumulation) == (4, 1)
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(6\) does not split evenly over dp = 4"
    ):
        layout(4, "train.batch_size=6")
    with pytest.raises(
        ConfigError,
        match=r"train.batch_size \(16\) is not a multiple of train.micro_batch_size \(3\) x dp \(2\) = 6",
    ):
        layout(2, "train.batch_size=16", "train.micro_batch_size=3")


def test_deepspeed_config_from_hylas_keys_and_a_user_file(tmp_path):
    cfg = load_config(
        "tiny", ["train.batch_size=16", "train.micro_batch_size=2", "parallel.zero_stage=2"]
    )
    layout = Layout(world=2)
    ds = deepspeed_config(cfg, layout, batch_layout(cfg, layout), "bfloat16")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"zero_optimization": {"reduce_bucket_size": 1000}, "comms_logger": {"enabled": False}}
        )
    )
    cfg.parallel.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, layout, batch_layout(cfg, layout), "float32")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["comms_logger"] == {"enabled": False} and "torch_autocast" not in ds
    for conflict, owner in (
        ({"zero_optimization": {"stage": 3}}, "parallel.zero_stage"),
        ({"train_batch_size": 64}, "train.batch_size"),
        ({"bf16": {"enabled": True}}, "train.dtype"),
    ):
        user.write_text(json.dumps(conflict))
        with pytest.raises(ConfigError, match=f"which Hylas sets from {owner}"):
            deepspeed_config(cfg, layout, batch_layout(cfg, layout), "float32")


def test_init_from_starts_a_new_run_from_the_weights_with_their_model_config(tmp_path, capsys):
    source = tmp_path / "source"
    narrow = ["model.n_layers=2", "model.linear_to_full=1:1"]  # not the tiny recipe's shape
    assert main(["train", "--set", *FAST, *narrow, "train.steps=3", f"train.out_dir={source}"]) == 0
    last = [json.loads(x) for x in (source / "metrics.jsonl").read_text().splitlines()][-1]
    ckpt = source / "checkpoints" / "step_000003"

    run = tmp_path / "continued"
    args = ["train", "--set", *FAST, "train.steps=2", f"train.init_from={ckpt}"]
    assert main([*args, f"train.out_dir={run}"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "eval_loss": last["eval_loss"]}  # the same weights
    manifest = json.loads((run / "checkpoints" / "step_000002" / "manifest.json").read_text())
    assert manifest["config"]["model"]["n_layers"] == 2  # the checkpoint's model config
    trainer = json.loads((run / "checkpoints" / "step_000002" / "trainer.json").read_text())
    assert trainer["optimizer_steps"] == 2  # a fresh optimizer

    capsys.readouterr()
    wrong = [*args, "model.d_model=128", f"train.out_dir={tmp_path / 'wrong'}"]
    assert main(wrong) == 2
    err = capsys.readouterr().err
    assert (
        "model.safetensors does not fit the model: embed.weight is [4096, 64] there and [4096, 128]"
        in err
    )


def test_wandb_offline_run_from_the_trainer(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "run"
    extra = ["train.steps=2", "wandb.enabled=true", f"train.out_dir={run}"]
    assert main(["train", "--set", *FAST, *extra]) == 0
    assert (run / "wandb_id").is_file()
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_a_batch_that_does_not_divide_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", *FAST, "train.micro_batch_size=3", f"train.out_dir={run}"]) == 2
    assert (
        "train.batch_size (8) is not a multiple of train.micro_batch_size (3)"
        in capsys.readouterr().err
    )
    assert not run.exists()
