"""Every collective Hylas issues goes through this module (docs/architecture.md, "Where a
collective's tensors live").

NCCL takes CUDA tensors only; gloo takes host tensors (and CUDA ones for some calls). The
trainer, checkpoints and the sweep reduce small control values that live on the host
(target counts, loss sums, flags, digests), while sequence parallelism moves activations
that live on the device. So each function here puts its tensors on the device the
group's backend takes (``group_device``), runs the collective there and writes the result
back where the caller's tensor lives: a host tensor reduced over NCCL travels to the GPU
and back, and an activation already on the GPU does not move.

Code outside this module never calls a ``torch.distributed`` collective itself
(``tests/parallel/test_comm.py`` scans the sources for it), so a host tensor cannot reach
NCCL by a new call site. The object collectives pickle through a tensor on the group's
device, so they need the current CUDA device set, which ``parallel.mesh.device_for`` does
before the groups are made.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective on ``group`` (None: the default group) takes tensors on:
    the current CUDA device for an NCCL group, the CPU otherwise."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _in_place(fn, t: torch.Tensor, group, *args, **kwargs) -> torch.Tensor:
    """``fn(t, ...)`` on the group's device, the result written back into ``t``."""
    work = _on(t, group_device(group))
    fn(work, *args, group=group, **kwargs)
    if work is not t:
        t.copy_(work)
    return t


def all_reduce(
    t: torch.Tensor, op=ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``t`` reduced over ``group``, in place (``t`` is also returned)."""
    return _in_place(dist.all_reduce, t, group, op=op)


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``t`` from global rank ``src`` on every rank of ``group``, in place."""
    return _in_place(dist.broadcast, t, group, src)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order of ``group``."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int, group: dist.ProcessGroup | None = None) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group``; on NCCL, on the current device's stream."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


class _Done:
    """The handle of a collective that has already finished (a staged one)."""

    def wait(self) -> bool:
        return True


def _out_of_place(fn, out: torch.Tensor, t: torch.Tensor, group, async_op: bool):
    """``fn(out, t)`` on the group's device. Tensors already there (sequence parallelism's
    activations on NCCL) run as asked, asynchronously if asked; tensors elsewhere (CUDA
    activations over a gloo group) are staged there and back, finished at once."""
    device = group_device(group)
    if t.device == device and out.device == device:
        return fn(out, t, group=group, async_op=async_op)
    staged = torch.empty(out.shape, dtype=out.dtype, device=device)
    fn(staged, _on(t, device), group=group)
    out.copy_(staged)
    return _Done() if async_op else None


def all_gather_single(
    out: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False
):
    """Every rank's ``t`` concatenated along dim 0 into ``out``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return _out_of_place(fn, out, t, group, async_op)


def reduce_scatter_single(
    out: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False
):
    """``t`` summed over the ranks, this rank's dim-0 share into ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return _out_of_place(fn, out, t, group, async_op)


def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group: dist.ProcessGroup,
) -> None:
    """Point-to-point: each (tensor, global peer) of ``sends`` sent and of ``recvs``
    received, batched, waiting for all of them (staged through the group's device)."""
    device = group_device(group)
    staged = [(t, _on(t, device), peer) for t, peer in recvs]
    ops = [dist.P2POp(dist.isend, _on(t, device), peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, s, peer, group) for _, s, peer in staged]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for t, s, _ in staged:
        if s is not t:
            t.copy_(s)
