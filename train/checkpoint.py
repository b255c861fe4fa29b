"""Checkpoint directories that any layout can resume: written collectively under a
temporary name, renamed by rank 0 once every rank's part is complete.

Layout of ``<run>/checkpoints/step_000300/``::

    manifest.json              step, tokens seen, config, the dp/sp/ZeRO layout, sha256 of every file
    model.safetensors          every parameter, whole, fp32 (a tied weight once) + buffers
    optimizer-00003.safetensors  Adam moments of the parameters in rank 3's share, whole
    rng-00003.safetensors      rank 3's random generators (torch, CUDA, numpy, Python)
    trainer.json               optimizer step count, bad-step streak, the loader's position
    tokenizer/                 the run's tokenizer, so a checkpoint is self-contained: its
                               tokenizer.model, or its tokenizer.json and config (Hugging Face)

Each parameter's state is stored whole (DeepSpeed gathers it from whatever ZeRO shards
hold it), so a checkpoint written at one dp size and ZeRO stage resumes at another, and
``model.safetensors`` alone serves generation and export with no process group. Nothing
is unpickled on load: tensors are safetensors, everything else JSON. Checkpoints written
before ``tokenizer/`` hold ``tokenizer.model`` beside the weights; they still open.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist

from hylas.configs.base import CheckpointError
from hylas.data.tokenizer import Tokenizer, file_sha256
from hylas.parallel import comm
from hylas.train.config import Config, config_from_dict

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.json"
TOKENIZER_DIR = "tokenizer"
PARTIAL = ".partial"


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


def optimizer_file(rank: int) -> str:
    return f"optimizer-{rank:05d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


# -- random generators ----------------------------------------------------------------------


def save_rng(path: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)  # the legacy form of the global MT19937 generator
    kind, keys, pos, has_gauss, gauss = state
    version, internal, py_gauss = random.getstate()
    meta = {
        "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, gauss]),
        "python": json.dumps([version, list(internal), py_gauss]),
    }
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("torch"))
        names = f.keys()
        if "cuda" in names and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("cuda"))
    kind, keys, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), py_gauss))


# -- writing --------------------------------------------------------------------------------


def shares(sizes: list[int], world: int) -> list[int]:
    """The rank that stores each parameter's optimizer state: largest first, to the rank
    holding the fewest elements so far, so every rank writes about as much."""
    owner, load = [0] * len(sizes), [0] * world
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=load.__getitem__)
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


@dataclass
class SaveRequest:
    """What a checkpoint records beyond the engine's state."""

    step: int
    cfg: Config
    layout: dict[str, int]
    tokenizer: Tokenizer  # its files are copied into the checkpoint
    trainer: dict[str, Any]  # optimizer steps, bad-step streak, data position, tokens seen
    metrics: dict[str, float]


def save_checkpoint(
    run_dir: Path,
    request: SaveRequest,
    params: list[tuple[str, torch.nn.Parameter]],
    full_state: Callable[[str, torch.nn.Parameter], dict[str, torch.Tensor | None]],
    buffers: dict[str, torch.Tensor],
    keep: int = 0,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` with every rank and return its path.

    Collective: every rank calls it. ``full_state(name, p)`` gives a parameter's whole fp32
    value and Adam moments (itself a collective under ZeRO). Rank 0 renames the directory
    only after all ranks have written and checksummed their files; a process that dies
    before leaves a ``.step_*.partial`` directory that is ignored and removed next time.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    parent = Path(run_dir) / "checkpoints"
    final = parent / f"step_{request.step:06d}"
    tmp = parent / f".{final.name}{PARTIAL}"
    status = torch.zeros(1)
    if rank == 0:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".step_*{PARTIAL}"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            status += 1
        else:
            tmp.mkdir()
    comm.broadcast(status, 0)
    if status.item():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")

    owner = shares([p.numel() for _, p in params], world)
    weights, moments = {}, {}
    for i, (name, p) in enumerate(params):
        state = full_state(name, p)  # every rank, every parameter: a collective under ZeRO
        if rank == 0:
            param = state["param"]
            assert param is not None  # every trained parameter has its fp32 value
            weights[name] = param.detach().to("cpu", torch.float32, copy=True)
        if owner[i] == rank and state["exp_avg"] is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state[key]
                assert moment is not None  # Adam keeps both moments or neither
                moments[f"{name}.{key}"] = moment.detach().to("cpu", copy=True)
    mine = [optimizer_file(rank), rng_file(rank)]
    safetensors.torch.save_file(moments, str(tmp / optimizer_file(rank)))
    save_rng(tmp / rng_file(rank))
    if rank == 0:
        weights.update({k: v.detach().to("cpu", copy=True) for k, v in buffers.items()})
        safetensors.torch.save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        tokenizer = request.tokenizer.copy_to(tmp / TOKENIZER_DIR)
        trainer = json.dumps(request.trainer, indent=2) + "\n"
        (tmp / TRAINER_FILE).write_text(trainer)
        mine += [MODEL_FILE, TRAINER_FILE, *(f"{TOKENIZER_DIR}/{name}" for name in tokenizer)]
    digests = {name: file_sha256(tmp / name) for name in mine}
    gathered = comm.all_gather_object(digests)  # also: every rank has finished writing
    if rank == 0:
        files = {k: v for d in gathered for k, v in sorted(d.items())}
        manifest = {
            "format": FORMAT_VERSION,
            "step": request.step,
            "tokens_seen": request.trainer.get("tokens_seen"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "world": request.layout,
            "config": request.cfg.to_dict(),
            "metrics": request.metrics,
            "data": request.trainer.get("data"),
            "files": dict(sorted(files.items())),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, final)
        prune(parent, keep)
    comm.barrier()
    return final


def prune(parent: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (0 = keep all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- reading --------------------------------------------------------------------------------


def complete_checkpoints(parent: Path) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (partial ones are hidden)."""
    if not parent.is_dir():
        return []
    return sorted(c for c in parent.glob("step_*") if (c / MANIFEST).is_file())


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the newest complete one inside a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    complete = complete_checkpoints(path / "checkpoints")
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

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the run trained with, from ``tokenizer/``, or in a checkpoint
        written before that directory, from the ``tokenizer.model`` beside the weights."""
        directory = self.path / TOKENIZER_DIR
        return Tokenizer.load(directory if directory.is_dir() else self.path)

    def trainer_state(self) -> dict[str, Any]:
        return json.loads((self.path / TRAINER_FILE).read_text())

    def optimizer_moments(self) -> Moments:
        """Every parameter's Adam moments, whole, from all ranks' files."""
        names = sorted(n for n in self.manifest["files"] if n.startswith("optimizer-"))
        return Moments([self.path / n for n in names])

    def load_rng(self, rank: int) -> bool:
        """Restore this rank's generators if the checkpoint has a file for its rank."""
        path = self.path / rng_file(rank)
        if not path.is_file():
            return False
        load_rng(path)
        return True


class Moments:
    """Adam moments by parameter name, read one tensor at a time from the ranks' files, so
    a restore never holds more than one parameter's moments in memory."""

    def __init__(self, files: list[Path]):
        self.files = [safetensors.safe_open(str(f), "pt") for f in files]
        self.where = {key: f for f in self.files for key in f.keys()}  # noqa: SIM118

    def names(self) -> set[str]:
        return {key.rpartition(".")[0] for key in self.where}

    def get(self, name: str, moment: str) -> torch.Tensor:
        key = f"{name}.{moment}"
        if key not in self.where:
            raise CheckpointError(f"the checkpoint holds no {moment} for {name}")
        return self.where[key].get_tensor(key)


def open_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read a checkpoint's manifest and (by default) check its files' sha256.

    Under torch.distributed the ranks share the checking: rank r hashes every world-th
    file, and a mismatch anywhere stops every rank.
    """
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
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        problem = None
        for i, (name, digest) in enumerate(sorted(manifest["files"].items())):
            if i % world != rank:
                continue
            if not (ckpt / name).is_file():
                problem = f"{ckpt} is incomplete: {name} is missing"
            elif file_sha256(ckpt / name) != digest:
                problem = f"{ckpt / name} does not match its checksum (corrupted?)"
            if problem:
                break
        if distributed:
            bad = torch.tensor([float(problem is not None)])
            comm.all_reduce(bad)
            if bad.item() and problem is None:
                problem = f"{ckpt} failed its checksum check on another rank (see its error)"
        if problem:
            raise CheckpointError(problem)
    return Checkpoint(ckpt, manifest, config_from_dict(manifest["config"]))


def load_model_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Copy ``model.safetensors`` into ``model``; a tensor of another name or shape is
    refused by name (the config does not fit the weights)."""
    path = ckpt.path / MODEL_FILE
    targets = {**dict(model.named_parameters()), **persistent_buffers(model)}
    with safetensors.safe_open(str(path), "pt") as f:
        stored = set(f.keys())
        missing = sorted(set(targets) - stored)
        if missing:
            raise CheckpointError(
                f"{path} does not fit the model: it has no {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; the model config differs from the one it was trained with"
            )
        with torch.no_grad():
            for name, target in targets.items():
                t = f.get_tensor(name)
                if t.shape != target.shape:
                    raise CheckpointError(
                        f"{path} does not fit the model: {name} is {list(t.shape)} there and "
                        f"{list(target.shape)} in this config"
                    )
                target.copy_(t)
    unexpected = sorted(stored - set(targets))
    if unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: the model has no {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: b
        for n, b in model.named_buffers()
        if n.rpartition(".")[2] not in _non_persistent(model, n)
    }


def _non_persistent(model: torch.nn.Module, name: str) -> set[str]:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return owner._non_persistent_buffers_set
