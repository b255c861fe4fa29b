"""Count the collectives a process issues: kind, group, bytes and the call site of each.

``trace_collectives()`` wraps the ``torch.distributed`` collectives while it is active and
puts the originals back when it exits; outside it nothing is wrapped and nothing is paid::

    with trace_collectives() as tracer:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
    print(tracer.format_table())

Where the wrappers go:

* ``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X``, the same function
  object until patched. DeepSpeed's ``TorchBackend`` looks most collectives up at call time
  (``torch.distributed.all_reduce(...)``), and collectives that c10d issues internally
  (``all_gather_object`` -> ``all_gather``) go through the c10d module's globals.
* Any attribute of DeepSpeed's live backend (``deepspeed.comm.comm.cdb``) bound to one of
  those functions: ``TorchBackend.__init__`` binds ``torch.distributed.all_gather_into_tensor``
  and ``reduce_scatter_tensor`` as ``all_gather_function`` / ``reduce_scatter_function``,
  which the ZeRO partitioned gathers and reduce-scatters call.

A collective that c10d issues from inside another traced one (``all_gather_into_tensor``
calls ``all_gather_single``) counts once, as the outer call. Tracers nest: every active
tracer records every call. A ``P2POp`` built inside a trace must be launched inside it:
``batch_isend_irecv`` tells sends from receives by the identity of ``P2POp.op``.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CommRecord", "CommRow", "CommTracer", "trace_collectives"]

# Function name -> (kind it is recorded as, the argument holding this rank's payload).
# Aliases of one operation share a kind, so counts do not depend on which name a caller
# or a torch version uses.
_PAYLOAD: dict[str, tuple[str, str | None]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "broadcast": ("broadcast", "tensor"),
    "reduce": ("reduce", "tensor"),
    "all_gather": ("all_gather", "tensor"),
    "all_gather_coalesced": ("all_gather", "input_tensor_list"),
    "all_gather_into_tensor": ("all_gather_into_tensor", "input_tensor"),
    "all_gather_single": ("all_gather_into_tensor", "input_tensor"),
    "_all_gather_base": ("all_gather_into_tensor", "input_tensor"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "reduce_scatter_tensor": ("reduce_scatter_tensor", "input"),
    "reduce_scatter_single": ("reduce_scatter_tensor", "input"),
    "_reduce_scatter_base": ("reduce_scatter_tensor", "input"),
    "all_to_all_single": ("all_to_all_single", "input"),
    "all_to_all": ("all_to_all", "input_tensor_list"),
    "gather": ("gather", "tensor"),
    "scatter": ("scatter", "scatter_list"),
    "send": ("send", "tensor"),
    "recv": ("recv", "tensor"),
    "isend": ("isend", "tensor"),
    "irecv": ("irecv", "tensor"),
    "barrier": ("barrier", None),
    "monitored_barrier": ("barrier", None),
}
_ALWAYS_ASYNC = ("isend", "irecv")

# Frames skipped when naming the call site, besides this file's: layers that only forward
# a call (DeepSpeed's NVTX decorator wraps the ZeRO-3 gathers and reduce-scatters).
_TORCH_DISTRIBUTED = os.path.dirname(dist.__file__) + os.sep
_FORWARDERS = (
    os.sep + os.path.join("deepspeed", "comm") + os.sep,
    os.sep + os.path.join("deepspeed", "utils", "nvtx.py"),
)


@dataclass(frozen=True)
class CommRecord:
    """One collective call as this rank issued it.

    ``bytes`` is this rank's payload: the input tensor (``all_reduce``, ``broadcast``,
    ``reduce``, ``all_gather``, ``gather``, point-to-point), the input of the tensor
    variants (``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``),
    the sum over the input list (``reduce_scatter``, ``all_to_all``, ``scatter`` on its
    source), 0 for ``barrier``.
    """

    kind: str
    group: tuple[int, ...]  # global ranks of the group; the world for group=None
    bytes: int
    site: str  # "path:line in function", path from the package root
    async_op: bool


@dataclass(frozen=True)
class CommRow:
    """Records of one (kind, group), summed."""

    kind: str
    group: tuple[int, ...]
    calls: int
    bytes: int
    top_site: str  # the site that moved the most bytes (then made the most calls)


@dataclass(eq=False)
class CommTracer:
    """Records collectives while entered; see the module docstring."""

    records: list[CommRecord] = field(default_factory=list)

    def __enter__(self) -> CommTracer:
        if self in _active:
            raise RuntimeError("this CommTracer is already active")
        if not _active:
            _patch()
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        if not _active:
            _unpatch()

    def clear(self) -> None:
        self.records.clear()

    def total_bytes(self, kind: str | None = None) -> int:
        return sum(r.bytes for r in self.records if kind is None or r.kind == kind)

    def summary(self) -> list[CommRow]:
        """One row per (kind, group), the most bytes first."""
        by_key: dict[tuple[str, tuple[int, ...]], list[CommRecord]] = defaultdict(list)
        for r in self.records:
            by_key[r.kind, r.group].append(r)
        rows = []
        for (kind, group), records in by_key.items():
            per_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for r in records:
                per_site[r.site][0] += r.bytes
                per_site[r.site][1] += 1
            top_site = max(per_site, key=lambda s: per_site[s])
            total = sum(r.bytes for r in records)
            rows.append(CommRow(kind, group, len(records), total, top_site))
        return sorted(rows, key=lambda row: (-row.bytes, -row.calls, row.kind, row.group))

    def format_table(self) -> str:
        header = ("kind", "group", "calls", "MB", "top call site")
        lines = [
            (row.kind, str(len(row.group)), str(row.calls), f"{row.bytes / 1e6:.3f}", row.top_site)
            for row in self.summary()
        ]
        lines.append(("total", "", str(len(self.records)), f"{self.total_bytes() / 1e6:.3f}", ""))
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(4)]
        out = []
        for line in [header, *lines]:
            cells = [line[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(line[1:4], widths[1:], strict=True)]
            out.append("  ".join([*cells, line[4]]).rstrip())
        return "\n".join(out)


def trace_collectives() -> CommTracer:
    """A fresh tracer, to be used as ``with trace_collectives() as tracer:``."""
    return CommTracer()


_active: list[CommTracer] = []
_local = threading.local()  # depth: traced calls in progress on this thread
_saved: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) to put back
_wrapper_of: dict[Callable, Callable] = {}  # original -> wrapper, while patched


def _patch() -> None:
    # Every wrapper is built before anything is replaced, so a failure leaves torch as it was.
    targets = [
        (namespace, name, getattr(namespace, name))
        for namespace in (dist, c10d)
        for name in [*_PAYLOAD, "batch_isend_irecv"]
        if hasattr(namespace, name)
    ]
    for _, name, fn in targets:
        if fn not in _wrapper_of:
            _wrapper_of[fn] = _wrap_batch(fn) if name == "batch_isend_irecv" else _wrap(name, fn)
    backend = _deepspeed_backend()
    if backend is not None:
        targets += [
            (backend, name, value)
            for name, value in vars(backend).items()
            if inspect.isfunction(value) and value in _wrapper_of
        ]
    for owner, name, fn in targets:
        _saved.append((owner, name, fn))
        setattr(owner, name, _wrapper_of[fn])


def _unpatch() -> None:
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)
    # A DeepSpeed backend created during the trace bound the wrappers themselves.
    backend = _deepspeed_backend()
    if backend is not None:
        original_of = {w: fn for fn, w in _wrapper_of.items()}
        for name, value in list(vars(backend).items()):
            if inspect.isfunction(value) and value in original_of:
                setattr(backend, name, original_of[value])
    _wrapper_of.clear()


def _deepspeed_backend() -> Any:
    """DeepSpeed's live communication backend, if DeepSpeed is loaded and initialized."""
    comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(comm, "cdb", None)


def _wrap(name: str, fn: Callable) -> Callable:
    kind, payload = _PAYLOAD[name]
    signature = inspect.signature(fn)
    assert payload is None or payload in signature.parameters, (name, payload)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        try:
            result = fn(*args, **kwargs)
        finally:
            _local.depth = depth
        if depth > 0 or not _active:
            return result
        arguments = signature.bind(*args, **kwargs).arguments
        group = arguments.get("group")
        if group is dist.GroupMember.NON_GROUP_MEMBER:  # c10d returned without communicating
            return result
        record = CommRecord(
            kind=kind,
            group=tuple(dist.get_process_group_ranks(group)),
            bytes=_nbytes(arguments.get(payload)) if payload else 0,
            site=_call_site(),
            async_op=name in _ALWAYS_ASYNC or bool(arguments.get("async_op", False)),
        )
        for tracer in _active:
            tracer.records.append(record)
        return result

    return wrapper


def _wrap_batch(fn: Callable) -> Callable:
    """batch_isend_irecv picks send or receive by ``op is isend``: point P2POps built
    before the trace at the wrapped isend/irecv for the call."""

    @functools.wraps(fn)
    def wrapper(p2p_op_list):
        ops = [p2p.op for p2p in p2p_op_list]
        for p2p in p2p_op_list:
            p2p.op = _wrapper_of.get(p2p.op, p2p.op)
        try:
            return fn(p2p_op_list)
        finally:
            for p2p, op in zip(p2p_op_list, ops, strict=True):
                p2p.op = op

    return wrapper


def _nbytes(payload: Any) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (list, tuple)):
        return sum(_nbytes(t) for t in payload)
    return 0


def _call_site() -> str:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and _skipped(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = _short_path(frame.f_code.co_filename, frame.f_globals.get("__name__", ""))
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


@functools.cache
def _skipped(filename: str) -> bool:
    return (
        filename == __file__
        or filename.startswith(_TORCH_DISTRIBUTED)
        or any(f in filename for f in _FORWARDERS)
    )


@functools.cache
def _short_path(filename: str, module: str) -> str:
    """The file's path from its package root, from the module's dotted name
    (``hylas.train.engine`` -> ``hylas/train/engine.py``, whatever folder it lives in)."""
    if module in ("", "__main__"):
        return filename
    base = os.path.basename(filename)
    parts = module.split(".")
    if base == "__init__.py":
        return "/".join([*parts, base])
    if parts[-1] == os.path.splitext(base)[0]:
        return "/".join([*parts[:-1], base])
    return filename
