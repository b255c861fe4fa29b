"""Collectives: every one Hylas issues goes through ``hylas.parallel.comm``, which puts its
tensors on the device the group's backend takes (NCCL: the GPU). A CPU machine cannot run
NCCL, so the design is what is tested: the sources are scanned for collectives that bypass
the module, and the module itself is checked on a real gloo group against the plain
collectives, with a stand-in group that, like NCCL, refuses host tensors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hylas.parallel import comm

ROOT = Path(__file__).resolve().parents[2]
CODE = ("train", "model", "parallel", "data", "kernels")
# Every torch.distributed call that moves data between ranks.
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "P2POp",
}


def bare_collectives(path: Path) -> list[str]:
    """``dist.X`` / ``torch.distributed.X`` uses of a collective X in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = ast.unparse(node.value)
            if base in ("dist", "torch.distributed", "c10d"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {base}.{node.attr}")
    return found


def test_no_collective_bypasses_the_comm_module():
    files = [p for folder in CODE for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    bypass = [hit for p in files if p.name != "comm.py" for hit in bare_collectives(p)]
    assert not bypass, (
        "collectives called directly; use hylas.parallel.comm, which puts host tensors on "
        f"the group's device (NCCL takes CUDA tensors only): {bypass}"
    )


def test_the_scan_finds_a_bare_collective(tmp_path, monkeypatch):
    """The scan is not vacuous: a host tensor all-reduced directly is found."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    bad = tmp_path / "trainer.py"
    bad.write_text(
        "import torch.distributed as dist\nimport torch\n"
        "def f():\n    t = torch.zeros(2)\n    dist.all_reduce(t)\n"
        "    torch.distributed.barrier()\n"
    )
    assert bare_collectives(bad) == [
        "trainer.py:5 dist.all_reduce",
        "trainer.py:6 torch.distributed.barrier",
    ]


@pytest.fixture
def one_rank_group():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()


def test_group_device_follows_the_backend(one_rank_group, monkeypatch):
    assert comm.group_device(one_rank_group) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: dist.Backend.NCCL)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.group_device(one_rank_group) == torch.device("cuda", 3)


def test_host_tensors_reach_an_nccl_like_group_on_its_device(one_rank_group, monkeypatch):
    """A stand-in for NCCL on CPU: its collectives refuse any tensor that comm did not
    move to the group's device, as NCCL refuses host tensors. comm moves the caller's host
    tensor there and writes the result back into it, in place."""
    seen = []

    def refusing(t, *args, **kwargs):
        if not getattr(t, "_on_group_device", False):
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append(t)
        t.mul_(3)  # what a 3-rank sum of equal values gives

    class Marked(torch.Tensor):
        _on_group_device = True

    monkeypatch.setattr(comm, "group_device", lambda group=None: torch.device("cuda", 0))
    monkeypatch.setattr(comm, "_on", lambda t, device: t.clone().as_subclass(Marked))
    monkeypatch.setattr(dist, "all_reduce", refusing)
    monkeypatch.setattr(dist, "broadcast", refusing)
    host = torch.tensor([1.0, 2.0])
    assert comm.all_reduce(host) is host
    assert host.tolist() == [3.0, 6.0] and type(host) is torch.Tensor
    comm.broadcast(host, 0)
    assert host.tolist() == [9.0, 18.0] and len(seen) == 2
    with pytest.raises(RuntimeError, match="No backend type"):
        dist.all_reduce(torch.zeros(1))  # what the old trainer's direct call met


def test_comm_equals_the_plain_collectives_on_gloo(one_rank_group):
    t = torch.arange(4.0)
    assert comm.all_reduce(t.clone()).equal(t)
    assert comm.broadcast(t.clone(), 0).equal(t)
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object(("x", 2), 0) == ("x", 2)
    out = torch.empty(4)
    comm.all_gather_single(out, t, one_rank_group)
    assert out.equal(t)
    comm.reduce_scatter_single(out, t * 2, one_rank_group)
    assert out.equal(t * 2)
    comm.barrier()
