"""Launching real training processes for the distributed tests: torchrun on gloo over the
loopback interface, one torch thread per rank, a timeout on every launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# A small model and short runs; every test run shares these unless it says otherwise.
SMALL = [
    "model.d_model=64",
    "model.n_heads=2",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.steps=10",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.threads=1",
    "train.dtype=float32",
    "parallel.timeout_s=60",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return e


def torchrun_args(
    nproc: int,
    overrides: list[str],
    *,
    worker: list[str] = (),
    port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    max_restarts: int = 0,
    resume: str | None = None,
) -> list[str]:
    """The command line of one torchrun launch of ``python -m tests.train.worker``."""
    cmd = [
        str(VENV_BIN / "torchrun"),
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port or free_port()}",
        f"--max-restarts={max_restarts}",
        "-m",
        "tests.train.worker",
        *worker,
        "--",
        "--set",
        *overrides,
    ]
    return cmd + (["--resume", resume] if resume else [])


def start(
    nproc: int, overrides: list[str], extra_env: dict | None = None, **kw
) -> subprocess.Popen:
    """Start torchrun and return at once, for tests that act on the running job."""
    return subprocess.Popen(
        torchrun_args(nproc, overrides, **kw),
        cwd=REPO,
        env=env(**(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def launch(
    nproc: int, overrides: list[str], timeout: float = 240, **kw
) -> subprocess.CompletedProcess:
    """Run torchrun to the end; a failure shows what every rank printed."""
    extra_env = kw.pop("extra_env", {})
    check = kw.pop("check", True)
    cmd = torchrun_args(nproc, overrides, **kw)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r}
