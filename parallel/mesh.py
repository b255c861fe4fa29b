"""The process layout: world = dp x sp, from torchrun's environment, and its groups.

Ranks of one sequence-parallel group are adjacent (rank = dp_rank * sp + sp_rank), so on
GPUs an sp group stays inside a node. Parameters are replicated over sp, so gradients are
reduced over the whole world (dp x sp): the world is the group DeepSpeed reduces over and
shards ZeRO state across. See docs/architecture.md, "Parallel dimensions".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hylas.configs.base import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its rank in the world and in the dp x sp grid."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    sp: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world, "dp": self.dp, "sp": self.sp}


def layout_from_env(sp: int = 1) -> Layout:
    """The layout torchrun (or a plain single process) gives this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % sp:
        raise ConfigError(
            f"the world of {world} processes does not divide into sequence-parallel groups "
            f"of parallel.sp={sp}"
        )
    return Layout(world, rank, local_rank, sp)


def device_for(layout: Layout) -> torch.device:
    """cuda:LOCAL_RANK where there are GPUs (one per local rank), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if layout.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {layout.local_rank} has no GPU of its own (this node has "
            f"{torch.cuda.device_count()}); start at most that many processes per node"
        )
    torch.cuda.set_device(layout.local_rank)
    return torch.device("cuda", layout.local_rank)


@dataclass
class Groups:
    """The process groups of a layout; ``grad`` is the group gradients are reduced over."""

    mesh: DeviceMesh
    dp: dist.ProcessGroup
    sp: dist.ProcessGroup
    grad: dist.ProcessGroup

    def ranks(self, name: str) -> list[int]:
        return dist.get_process_group_ranks(getattr(self, name))


def init_groups(layout: Layout, device: torch.device, timeout_s: float) -> Groups:
    """Start torch.distributed (gloo on CPU, NCCL on CUDA) and build the dp x sp mesh.

    A single process gets a one-rank group too, so that one engine serves every world
    size. ``timeout_s`` bounds every collective: a peer that died makes the survivors
    fail after that long instead of hanging.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if layout.world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()  # no rendezvous needed for one process
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            device_id = device if device.type == "cuda" else None  # None: init's default
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                dist.init_process_group(
                    backend,
                    timeout=timeout,
                    device_id=device_id,
                    store=attempt_store(layout, timeout),
                    rank=layout.rank,
                    world_size=layout.world,
                )
            else:
                dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    mesh = init_device_mesh(device.type, (layout.dp, layout.sp), mesh_dim_names=("dp", "sp"))
    world = dist.group.WORLD
    assert world is not None  # set once the process group is initialised, as it is here
    return Groups(mesh, mesh.get_group("dp"), mesh.get_group("sp"), world)


def attempt_store(layout: Layout, timeout: timedelta) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the workers.

    torchrun's static rendezvous keeps one store for all restarts, so workers started
    after a failure would find the addresses the dead workers published and try to
    connect to them. A prefix per attempt keeps every attempt's keys apart.
    """
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        layout.world,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"hylas/attempt-{attempt}", client)


def shutdown() -> None:
    """End torch.distributed, and DeepSpeed's hold on its groups if it has one."""
    if not dist.is_initialized():
        return
    import deepspeed.comm

    if deepspeed.comm.is_initialized():  # also drops DeepSpeed's cached groups
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
