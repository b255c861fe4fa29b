"""metrics.jsonl (one JSON object per logged step), the progress display, MFU and wandb."""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from hylas.train.checkpoint import atomic_write_text
from hylas.train.config import WandbConfig

log = logging.getLogger("hylas")


class MetricsFile:
    """Appends one JSON line per record and flushes it, so a crash loses nothing logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # Resuming: drop what an interrupted run logged after the checkpoint we restart from.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= keep_until_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.file = open(path, "a")  # noqa: SIM115  (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files)."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True
            )

    def update(self, step: int, total: int, record: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix_str(_describe(record), refresh=False)
        elif record:
            log.info("step %d/%d  %s", step, total, _describe(record))

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _describe(r: dict[str, Any]) -> str:
    return f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s"


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets and architecture whitepapers,
# first match wins (so a GPU's NVL and PCIe variants come before its plain name). float32 is the
# TF32 tensor-core peak where the GPU has TF32: PyTorch runs fp32 matmuls in TF32 when allowed, and
# the GPUs' far lower fp32 (SIMT) peak would make an fp32 run's MFU look impossibly high.
def _tensor_cores(half: float, tf32: float) -> dict[torch.dtype, float]:
    return {torch.bfloat16: half, torch.float16: half, torch.float32: tf32}


_GPU_PEAKS: list[tuple[str, str, dict[torch.dtype, float]]] = [
    ("B200", r"\bB200\b", _tensor_cores(2250e12, 1100e12)),
    ("GB200", r"\bGB200\b", _tensor_cores(2500e12, 1250e12)),
    ("H100 NVL", r"\bH100\b.*\bNVL\b", _tensor_cores(835e12, 417.5e12)),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b", _tensor_cores(756e12, 378e12)),
    ("H100 SXM", r"\bH100\b", _tensor_cores(989e12, 494.5e12)),
    ("H200 NVL", r"\bH200\b.*\bNVL\b", _tensor_cores(835e12, 417.5e12)),
    ("H200 SXM", r"\bH200\b", _tensor_cores(989e12, 494.5e12)),
    ("GH200", r"\bGH200\b", _tensor_cores(989e12, 494.5e12)),
    ("H800 PCIe", r"\bH800\b.*\bPCIe\b", _tensor_cores(756e12, 378e12)),
    ("H800 SXM", r"\bH800\b", _tensor_cores(989e12, 494.5e12)),
    ("A100", r"\bA100\b", _tensor_cores(312e12, 156e12)),
    ("A800", r"\bA800\b", _tensor_cores(312e12, 156e12)),
    ("A40", r"\bA40\b", _tensor_cores(149.7e12, 74.8e12)),
    ("A30", r"\bA30\b", _tensor_cores(165e12, 82e12)),
    ("A10", r"\bA10\b", _tensor_cores(125e12, 62.5e12)),
    ("L40S", r"\bL40S\b", _tensor_cores(362e12, 183e12)),
    ("L40", r"\bL40\b", _tensor_cores(181e12, 90.5e12)),
    ("L4", r"\bL4\b", _tensor_cores(121e12, 60e12)),
    # GeForce: the fp32-accumulate rate; the fp16-accumulate one is twice that
    ("RTX 4090", r"\b4090\b", _tensor_cores(165.2e12, 82.6e12)),
    ("RTX 3090", r"\b3090\b(?! Ti)", _tensor_cores(71e12, 35.6e12)),
    # Volta and Turing have fp16 tensor cores only: no bf16, and fp32 is the SIMT peak
    ("V100S", r"\bV100S\b", {torch.float16: 130e12, torch.float32: 16.4e12}),
    ("V100 PCIe", r"\bV100\b.*\bPCIe\b", {torch.float16: 112e12, torch.float32: 14e12}),
    ("V100 SXM", r"\bV100\b", {torch.float16: 125e12, torch.float32: 15.7e12}),
    ("T4", r"\bT4\b", {torch.float16: 65e12, torch.float32: 8.1e12}),
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for matmuls in ``dtype``, and where the number comes from."""
    if device.type == "cuda":
        return cuda_peak_flops(device, dtype)
    if device.type == "cpu":
        return _measured_cpu_flops(dtype, torch.get_num_threads())
    return None, f"no peak known for {device.type} devices"


def cuda_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The datasheet peak of the GPU named by ``torch.cuda.get_device_name``, if it is known."""
    name = torch.cuda.get_device_name(device)
    for label, pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            if dtype not in peaks:
                return None, f"{name}: no {dtype} peak for {label}"
            kind = "tf32" if dtype == torch.float32 and torch.bfloat16 in peaks else dtype
            return peaks[dtype], f"{name}: {label} datasheet, {kind}, dense"
    return None, f"unknown GPU {name}"


@functools.cache
def _measured_cpu_flops(dtype: torch.dtype, threads: int) -> tuple[float, str]:
    # Double the size until the best of three products takes 20 ms (or the matrices reach 4096):
    # large enough that a product's cost dominates its overhead, about 0.1-0.5 s in all.
    n = 64
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        seconds = min(_time_matmul(a, b) for _ in range(3))
        if seconds >= 0.02 or n >= 4096:
            return 2 * n**3 / seconds, f"measured: {n}x{n} matmul, {threads} threads"
        n *= 2


def _time_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_per_device: float | None, world_size: int
) -> float | None:
    """Model FLOPs utilisation: achieved over peak FLOP/s summed over the devices (a fraction)."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * world_size)


def _has_api_key() -> bool:
    """Whether wandb has credentials (environment, .netrc or its settings), without the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        auth = wbauth.authenticate_session(
            host=settings.base_url,
            source="hylas",
            prompt=False,
            verify=False,
            update_session=False,
        )
    except Exception:  # wandb internals move between versions; without a key we run offline
        return False
    return auth is not None


class WandbLogger:
    """Logs the metrics records to Weights & Biases; a failing wandb disables it, never the run."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, layout: dict):
        self.run = None
        if not cfg.enabled:
            return
        mode: Literal["online", "offline"]
        if cfg.mode == "auto":
            mode = "online" if _has_api_key() else "offline"
        elif cfg.mode == "online":
            mode = "online"
        else:  # offline: WandbConfig.validate refuses any other mode
            mode = "offline"
        # One wandb run per run directory: a requeued or resumed job continues the same run.
        id_file = run_dir / "wandb_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            atomic_write_text(id_file, run_id + "\n")
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                name=cfg.name or run_dir.name,
                dir=run_dir,
                mode=mode,
                id=run_id,
                resume="allow",
                config={**config, "layout": layout},
                settings=wandb.Settings(
                    init_timeout=120,
                    login_timeout=30,  # an online run without a key on a terminal would prompt
                    silent=True,
                    console="off",
                    save_code=False,
                ),
            )
            # The trainer's step, not wandb's own counter, is the x-axis: a resumed run logs
            # steps it logged before, which wandb would drop as going back in time.
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as e:
            log.warning("wandb disabled: init failed (%s: %s)", type(e).__name__, e)
            self.run = None
            return
        log.info("wandb: %s run %s in %s", mode, run_id, run_dir / "wandb")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**_scalars(record), "step": step})
        except Exception as e:
            log.warning("wandb disabled: log failed (%s: %s)", type(e).__name__, e)
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:
            log.warning("wandb finish failed (%s: %s)", type(e).__name__, e)
        self.run = None


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, numbers.Real]:
    """The numbers in ``record``, nested dicts flattened to ``outer/inner``; lists are left out."""
    out: dict[str, numbers.Real] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real):
            out[prefix + key] = value
    return out
