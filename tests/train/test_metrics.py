"""MFU, peak FLOP/s (measured on CPU, a datasheet table on CUDA) and the wandb logger."""

import json
import logging
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from hylas.train import metrics
from hylas.train.config import WandbConfig
from hylas.train.metrics import WandbLogger, cuda_peak_flops, mfu, peak_flops


def test_mfu_by_hand():
    # 10k tokens/s x 6 GFLOP/token = 60 TFLOP/s achieved, over 2 x 100 TFLOP/s of peak.
    assert mfu(10_000, 6e9, 100e12, 2) == pytest.approx(0.3)
    assert mfu(10_000, 6e9, 100e12, 1) == pytest.approx(0.6)
    assert mfu(10_000, 6e9, None, 8) is None


def test_cpu_peak_is_measured_once():
    flops, source = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < flops < 1e14
    assert source.startswith("measured: ") and f"{torch.get_num_threads()} threads" in source
    assert peak_flops(torch.device("cpu"), torch.float32) == (flops, source)  # cached


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 156e12),  # TF32
        ("NVIDIA A10", torch.bfloat16, 125e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
        ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 tensor cores
        ("NVIDIA B200", torch.bfloat16, 2250e12),
        ("NVIDIA A10G", torch.bfloat16, None),  # not in the table: not mistaken for an A10
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_cuda_peak_from_the_device_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = cuda_peak_flops(torch.device("cuda"), dtype)
    assert flops == expected
    assert name in source
    if expected is None and "Future" in name:
        assert source == f"unknown GPU {name}"


@pytest.fixture
def clean_wandb(monkeypatch, tmp_path):
    """No API key, no netrc, no WANDB_* settings from outside; wandb's service stopped after."""
    import wandb

    for key in list(os.environ):
        if key.startswith("WANDB_") or key == "NETRC":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wandb.teardown()  # forget settings a previous wandb user in this process loaded
    yield
    wandb.teardown()


def _records(path: Path):
    """The protobuf records of a .wandb transaction log (LevelDB's log format, wandb's header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        assert crc == zlib.crc32(payload, zlib.crc32(bytes([kind])))
        parts.append(payload)
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _read_offline_run(run_dir: Path) -> tuple[dict, list[dict]]:
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, history = {}, []
    for record in _records(log_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            for i in items:  # a top-level key, or a path into nested dicts
                *outer, last = [i.key] if i.key else list(i.nested_key)
                node = config
                for part in outer:
                    node = node.setdefault(part, {})
                node[last] = json.loads(i.value_json)
        elif kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return config, history


def test_wandb_offline_run_holds_the_metrics_and_config(clean_wandb, tmp_path):
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    cfg = WandbConfig(enabled=True, project="hylas-test")  # mode auto, no key: offline
    config = {"model": {"d_model": 64, "pattern": "LLLF"}, "train": {"lr": 1e-3}}
    layout = {"dp": 2, "tp": 1, "zero_stage": 1}

    logger = WandbLogger(cfg, run_dir, config, layout)
    assert logger.run is not None and logger.run.name == "run-1"
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert logger.run.id == run_id
    for step in (10, 20, 30):
        record = {"step": step, "loss": 3.0 - step / 100, "lr": 1e-3, "tokens_per_s": 1234.5}
        record["moe_expert_counts"] = [[1, 2], [3, 4]]  # left out
        record["eval"] = {"wiki": 2.5}  # flattened to eval/wiki
        logger.log(record, step)
    logger.finish()

    config_read, history = _read_offline_run(run_dir)
    assert config_read["model"] == config["model"] and config_read["train"] == config["train"]
    assert config_read["layout"] == layout
    assert [(h["step"], h["loss"]) for h in history] == [(10, 2.9), (20, 2.8), (30, 2.7)]
    assert all(h["eval/wiki"] == 2.5 and h["tokens_per_s"] == 1234.5 for h in history)
    assert not any("moe_expert_counts" in h for h in history)

    resumed = WandbLogger(cfg, run_dir, config, layout)  # a requeued job: the same wandb run
    assert resumed.run is not None and resumed.run.id == run_id
    resumed.finish()


def test_wandb_failure_disables_the_logger(clean_wandb, tmp_path, monkeypatch, caplog):
    import wandb

    def fail(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", fail)
    with caplog.at_level(logging.WARNING, logger="hylas"):
        logger = WandbLogger(WandbConfig(enabled=True, mode="offline"), tmp_path, {}, {})
    assert logger.run is None
    assert "wandb disabled: init failed (RuntimeError: no service)" in caplog.text
    logger.log({"loss": 1.0}, 1)  # no-ops
    logger.finish()


def test_disabled_wandb_starts_nothing(tmp_path):
    logger = WandbLogger(WandbConfig(), tmp_path, {}, {})
    assert logger.run is None and not (tmp_path / "wandb_id").exists()


def test_auto_mode_sees_an_api_key_in_the_environment(clean_wandb, monkeypatch):
    assert not metrics._has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics._has_api_key()
