"""Checkpoint directories: written under a temporary name, renamed when complete.

Layout of ``<run>/checkpoints/step_000300/``::

    manifest.json       step, config, world layout, sha256 of every other file
    model.safetensors   model weights (tied weights stored once)
    trainer.pt          optimizer, scheduler, RNG states and the data loader's position
    tokenizer.model     the tokenizer, so a checkpoint is self-contained
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from hylas.data.tokenizer import file_sha256
from hylas.train.config import Config, config_from_dict

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
TOKENIZER_FILE = "tokenizer.model"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message says which and why."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tokenizer_file: str | os.PathLike,
    metrics: dict[str, float] | None = None,
    data_state: dict | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` atomically and return its path."""
    parent = Path(run_dir) / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step_{step:06d}"
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a finished directory is an ordinary one
    try:
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "data": data_state,
            },
            tmp / TRAINER_FILE,
        )
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "world": {"world_size": 1, "dp": 1, "sp": 1},
            "config": cfg.to_dict(),
            "metrics": metrics or {},
            "data": data_state,
            "files": files,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the newest complete one inside a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step_*")) if path.is_dir() else []
    complete = [c for c in candidates if (c / MANIFEST).is_file()]
    if complete:
        return complete[-1]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with checkpoints")


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    config: Config

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE


def open_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read and (by default) verify a checkpoint's manifest and file checksums."""
    ckpt = find_checkpoint(path)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has checkpoint format {manifest.get('format')}, this Hylas reads {FORMAT_VERSION}"
        )
    if verify:
        for name, digest in manifest["files"].items():
            if not (ckpt / name).is_file():
                raise CheckpointError(f"{ckpt} is incomplete: {name} is missing")
            if file_sha256(ckpt / name) != digest:
                raise CheckpointError(f"{ckpt / name} does not match its checksum (corrupted?)")
    return Checkpoint(ckpt, manifest, config_from_dict(manifest["config"]))


def load_model_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    # load_model knows that tied weights are stored once; anything else is a real mismatch.
    missing, unexpected = safetensors.torch.load_model(
        model, str(ckpt.path / MODEL_FILE), strict=False
    )
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path / MODEL_FILE} does not fit the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_trainer_state(ckpt: Checkpoint, optimizer, scheduler) -> dict | None:
    """Restore optimizer, scheduler and RNG; returns the loader's state (None if absent)."""
    state = torch.load(ckpt.path / TRAINER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state.get("data")
