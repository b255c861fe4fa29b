"""The communication tracer on two real gloo ranks: collectives the test issues itself, a
DeepSpeed ZeRO-2 step, and torch.distributed put back as it was. One launch serves all checks."""

from __future__ import annotations

import copy
import os
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from hylas.parallel.trace import CommRecord, trace_collectives
from tests.helpers import spawn_ranks

WORLD = 2
TIMEOUT_S = 120
HERE = "tests/parallel/test_trace.py"


def _next_line() -> int:
    """The line after the caller's: where the collective the test is about sits."""
    return sys._getframe(1).f_lineno + 1


def _known_collectives(rank: int) -> dict:
    originals = (dist.all_reduce, c10d.all_reduce)
    solo = dist.new_group([1])  # group rank 0 is global rank 1
    send, recv = torch.full((4,), float(rank)), torch.zeros(4)
    peer = 1 - rank
    # Built before the trace: batch_isend_irecv must still tell the send from the receive.
    p2p = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
    summed = torch.full((1000,), rank + 1.0)
    gathered = torch.empty(2 * 8, dtype=torch.int64)
    lines = {}
    with trace_collectives() as outer:
        with trace_collectives() as inner:
            lines["all_reduce"] = _next_line()
            dist.all_reduce(summed)
        lines["all_gather_into_tensor"] = _next_line()
        dist.all_gather_into_tensor(gathered, torch.arange(8) + 8 * rank, async_op=True).wait()
        lines["broadcast"] = _next_line()  # rank 0 is no member: nothing moves, nothing counts
        dist.broadcast(torch.ones(10, dtype=torch.float64), src=1, group=solo)
        lines["batch_isend_irecv"] = _next_line()
        for work in dist.batch_isend_irecv(p2p):
            work.wait()
    return {
        "records": outer.records,
        "inner": inner.records,
        "lines": lines,
        "summary": outer.summary(),
        "table": outer.format_table(),
        "summed": summed,
        "gathered": gathered,
        "received": recv,
        "restored": (dist.all_reduce, c10d.all_reduce) == originals,
    }


def _zero2_step(rank: int) -> dict:
    import deepspeed
    from deepspeed.comm import comm as ds_comm

    from hylas.train.engine import avoid_cpu_comm_build

    avoid_cpu_comm_build()  # as the trainer does: no JIT build of DeepSpeed's CPU collectives
    original_gather = dist.all_gather_into_tensor
    with trace_collectives():  # a backend created inside a trace binds the wrappers
        deepspeed.init_distributed(dist_backend="gloo")
    backend_restored = ds_comm.cdb.all_gather_function is original_gather
    shm_built = ds_comm.cdb.shm_comm_op is not None

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    reference = copy.deepcopy(model)
    # eps far above the gradients' rounding noise: Adam's first step, lr * g / (|g| + eps),
    # would otherwise blow up the last-bit differences of gradients near zero.
    adam = {"lr": 1e-2, "eps": 1e-3}
    config = {
        "train_batch_size": WORLD,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,  # DeepSpeed's default, spelled out
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), **adam),
        config=config,
        dist_init_required=False,
    )
    x = torch.randn(WORLD, 1, 16)  # one sample per rank
    with trace_collectives() as tracer:
        backend_wrapped = ds_comm.cdb.all_gather_function is dist.all_gather_into_tensor
        loss = engine(x[rank]).sum()
        engine.backward(loss)
        engine.step()

    # The same step in one process: DeepSpeed averages the ranks' gradients.
    optimizer = torch.optim.AdamW(reference.parameters(), **adam)
    (sum(reference(sample).sum() for sample in x) / WORLD).backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    return {
        "records": tracer.records,
        "n_params": sum(p.numel() for p in reference.parameters()),
        "params": [p.detach().clone() for p in model.parameters()],
        "reference": [p.detach().clone() for p in reference.parameters()],
        "backend_wrapped": backend_wrapped,
        "restored": dist.all_gather_into_tensor is original_gather
        and ds_comm.cdb.all_gather_function is original_gather,
        "backend_restored": backend_restored,
        "shm_built": shm_built,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {"known": _known_collectives(rank), "zero2": _zero2_step(rank)}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results from one two-process gloo launch."""
    out_dir = tmp_path_factory.mktemp("trace")
    spawn_ranks(_worker, WORLD, out_dir, TIMEOUT_S)
    results = []
    for rank in range(WORLD):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


@pytest.mark.integration
def test_known_collectives_recorded_exactly(ranks):
    for rank, result in enumerate(ranks):
        known = result["known"]
        lines = known["lines"]

        def site(kind, lines=lines):
            return f"{HERE}:{lines[kind]} in _known_collectives"

        expected = [
            CommRecord("all_reduce", (0, 1), 1000 * 4, site("all_reduce"), False),
            CommRecord(
                "all_gather_into_tensor", (0, 1), 8 * 8, site("all_gather_into_tensor"), True
            ),
        ]
        if rank == 1:
            expected.append(CommRecord("broadcast", (1,), 10 * 8, site("broadcast"), False))
        expected += [
            CommRecord("isend", (0, 1), 4 * 4, site("batch_isend_irecv"), True),
            CommRecord("irecv", (0, 1), 4 * 4, site("batch_isend_irecv"), True),
        ]
        assert known["records"] == expected
        assert known["inner"] == expected[:1]  # nested tracers both record

        # Results are what they would be untraced.
        torch.testing.assert_close(known["summed"], torch.full((1000,), 3.0))
        torch.testing.assert_close(known["gathered"], torch.arange(16))
        torch.testing.assert_close(known["received"], torch.full((4,), float(1 - rank)))


@pytest.mark.integration
def test_summary_and_table(ranks):
    known = ranks[0]["known"]
    by_kind = {row.kind: row for row in known["summary"]}
    assert by_kind["all_reduce"].group == (0, 1)
    assert (by_kind["all_reduce"].calls, by_kind["all_reduce"].bytes) == (1, 4000)
    assert [row.bytes for row in known["summary"]] == sorted(
        (row.bytes for row in known["summary"]), reverse=True
    )
    table = known["table"].splitlines()
    assert table[0].split() == ["kind", "group", "calls", "MB", "top", "call", "site"]
    assert table[1].split()[:4] == ["all_reduce", "2", "1", "0.004"]
    assert table[-1].split() == ["total", "4", "0.004"]


@pytest.mark.integration
def test_deepspeed_zero2_step(ranks):
    for result in ranks:
        zero2 = result["zero2"]
        n = zero2["n_params"]
        assert n == 2 * (16 * 16 + 16)
        records = zero2["records"]
        assert records, "no collective recorded from the DeepSpeed step"
        assert all(r.site.startswith("deepspeed/runtime/") for r in records), records
        assert all(r.group == (0, 1) for r in records)

        # DeepSpeed 0.19.8 ZeRO-2 (reduce_scatter and use_multi_rank_bucket_allreduce on, the
        # defaults) reduces gradients by all-reducing the whole IPG bucket, then each rank
        # keeps its partition: one all_reduce of all N fp32 gradients (the bucket holds them
        # all), not a reduce-scatter, on gloo as on NCCL.
        grads = [r for r in records if r.site.endswith(" in allreduce_bucket")]
        assert [(r.kind, r.bytes) for r in grads] == [("all_reduce", 4 * n)]
        assert grads[0].site.startswith("deepspeed/runtime/zero/stage_1_and_2.py:")
        # After the step each rank all-gathers the partition it updated: N / world params.
        gathers = [r for r in records if r.kind == "all_gather_into_tensor"]
        assert [r.bytes for r in gathers] == [4 * n // WORLD]
        # Everything else is scalars (the gradient norm, for clipping).
        rest = [r for r in records if r not in grads and r not in gathers]
        assert all(r.kind == "all_reduce" and r.bytes <= 8 for r in rest), rest

        assert zero2["backend_wrapped"], "DeepSpeed's bound all_gather_function was not wrapped"
        assert not zero2["shm_built"], "DeepSpeed built its shared-memory CPU op"
        # The traced step is the single-process step (Adam moves each parameter by up to
        # lr = 1e-2, so a lost reduction or gather shows).
        for p, ref in zip(zero2["params"], zero2["reference"], strict=True):
            torch.testing.assert_close(p, ref)


@pytest.mark.integration
def test_originals_restored(ranks):
    for result in ranks:
        assert result["known"]["restored"]
        assert result["zero2"]["restored"]
        assert result["zero2"]["backend_restored"]


def test_patches_undone_in_process():
    names = ("all_reduce", "all_gather_into_tensor", "isend", "batch_isend_irecv")
    before = {(ns, name): getattr(ns, name) for ns in (dist, c10d) for name in names}
    tracer = trace_collectives()
    with tracer:
        assert all(getattr(ns, name) is not fn for (ns, name), fn in before.items())
        with pytest.raises(RuntimeError, match="already active"), tracer:
            pass
    assert all(getattr(ns, name) is fn for (ns, name), fn in before.items())
