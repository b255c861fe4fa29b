"""The engine across layouts, with real ranks (gloo, torchrun) compared with the 1-process
run: per-step losses, held-out and MoE losses, sequence parallelism (sp = 2, 4 and
dp = 2 x sp = 2 on two simulated nodes), resume on the same and on other layouts, signals,
a killed worker, a killed checkpoint write, skipped steps.

Reference runs are shared between tests (module fixtures); every launch has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hylas.train.checkpoint import find_checkpoint, open_checkpoint
from tests.train.launch import (
    SMALL,
    VENV_BIN,
    eval_losses,
    free_port,
    launch,
    losses,
    metrics,
    start,
)

pytestmark = pytest.mark.integration  # torchrun launches

RTOL = 1e-5  # dp=2 against dp=1: the same sums in another order
# sp against one process: the same sums, and the recurrences' states folded across ranks
SP_RTOL = 1e-4


def assert_losses_close(actual: dict, expected: dict, steps=range(1, 11), what="", rtol=RTOL):
    for s in steps:
        rel = abs(actual[s] - expected[s]) / abs(expected[s])
        assert rel <= rtol, f"{what} step {s}: {actual[s]} vs {expected[s]} (relative {rel:.1e})"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


def run(root: Path, name: str, nproc: int, *extra: str, **kw) -> Path:
    out = root / name
    launch(nproc, [*SMALL, *extra, f"train.out_dir={out}"], **kw)
    return out


@pytest.fixture(scope="module")
def straight1(root):
    """1 process, ZeRO 2, 10 steps, a checkpoint every 5."""
    return run(root, "straight1", 1, "parallel.zero_stage=2", "train.save_every=5")


@pytest.fixture(scope="module")
def straight2(root):
    """dp=2, ZeRO 2, 10 steps, a checkpoint every 5."""
    return run(root, "straight2", 2, "parallel.zero_stage=2", "train.save_every=5")


def test_stop_and_resume_auto_equals_the_straight_run_bitwise(root, straight1):
    """One process here; two ranks stop at a step and resume bitwise in the sequence-parallel
    test below, and on SIGTERM at dp = 2 further down (the launches are shared that way)."""
    extra = ["parallel.zero_stage=2", "train.save_every=5", "train.exit_at_step=5"]
    out = run(root, "stopped1", 1, *extra)
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_000005"]
    run(root, "stopped1", 1, *extra, resume="auto")
    assert losses(out) == losses(straight1)  # fp32, bitwise
    assert eval_losses(out) == eval_losses(straight1)


@pytest.fixture(scope="module")
def no_compiler(root) -> dict[str, str]:
    """An environment whose PATH has python and torchrun but no C or C++ compiler."""
    bare = root / "bin"
    bare.mkdir()
    for tool in ("python", "torchrun"):
        os.symlink(VENV_BIN / tool, bare / tool)
    for compiler in ("gcc", "g++", "cc", "c++"):
        assert shutil.which(compiler, path=str(bare)) is None
    return {"PATH": str(bare), "CC": "", "CXX": ""}


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        (0, ["train.micro_batch_size=2"]),  # two micro-batches per rank: accumulation
        (1, []),
        (2, []),
        (3, []),
    ],
)
def test_dp2_matches_dp1_at_every_zero_stage(root, straight1, straight2, no_compiler, stage, extra):
    if stage == 2:
        out = straight2
    else:
        # ZeRO 1 also trains with no compiler on PATH: DeepSpeed's CPU collectives would
        # otherwise be JIT-built with g++ when the engine starts.
        env_ = no_compiler if stage == 1 else {}
        out = run(root, f"zero{stage}", 2, f"parallel.zero_stage={stage}", *extra, extra_env=env_)
    assert_losses_close(losses(out), losses(straight1), what=f"ZeRO {stage}")
    a, b = eval_losses(out), eval_losses(straight1)
    assert a.keys() == b.keys() == {0, 10}
    for s in a:
        assert abs(a[s] - b[s]) / b[s] <= RTOL


def test_a_moe_model_at_dp2_sp2_zero3_matches_one_process(root):
    """Router statistics and auxiliary losses pooled over dp x sp equal one process's."""
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2"]
    one = run(root, "moe1", 1, *moe)
    four = run(root, "moe4", 4, *moe, "parallel.sp=2", "parallel.zero_stage=3")
    assert_losses_close(losses(four), losses(one), what="MoE", rtol=SP_RTOL)
    aux = [{r["step"]: r["moe_aux_loss"] for r in metrics(d) if "loss" in r} for d in (four, one)]
    assert_losses_close(aux[0], aux[1], what="MoE aux loss", rtol=SP_RTOL)
    assert aux[1][1] > 0.01  # the aux loss is really in there (coefficient 0.01, E f P >= 1)
    counts = [[r["moe_expert_counts"] for r in metrics(d) if "loss" in r] for d in (four, one)]
    assert counts[0] == counts[1]  # the router statistics are pooled over the ranks
    a, b = eval_losses(four), eval_losses(one)
    assert all(abs(a[s] - b[s]) / b[s] <= SP_RTOL for s in b)


def test_resume_on_another_layout(root, straight1, straight2):
    # saved at dp=2 (ZeRO 2), resumed by one process
    out = root / "dp2_to_dp1"
    launch(
        1,
        [*SMALL, "parallel.zero_stage=2", f"train.out_dir={out}"],
        resume=str(straight2 / "checkpoints" / "step_000005"),
    )
    assert_losses_close(losses(out), losses(straight2), steps=range(6, 11), what="dp2 -> dp1")
    # saved by one process at ZeRO 2, resumed at dp=2 with ZeRO 3
    out = root / "dp1_to_dp2"
    launch(
        2,
        [*SMALL, "parallel.zero_stage=3", f"train.out_dir={out}"],
        resume=str(straight1 / "checkpoints" / "step_000005"),
    )
    assert_losses_close(losses(out), losses(straight1), steps=range(6, 11), what="dp1 -> dp2")
    assert open_checkpoint(out).manifest["world"] == {
        "world_size": 2,
        "dp": 2,
        "sp": 1,
        "zero_stage": 3,
    }


@pytest.fixture(scope="module")
def sp2(root):
    """dp=1 x sp=2, ZeRO 2, a checkpoint every 5."""
    return run(root, "sp2", 2, "parallel.sp=2", "parallel.zero_stage=2", "train.save_every=5")


@pytest.mark.parametrize("sp", [2, 4])
def test_sequence_parallel_training_matches_one_process(root, straight1, sp2, sp):
    out = sp2 if sp == 2 else run(root, f"sp{sp}", sp, f"parallel.sp={sp}")
    assert_losses_close(losses(out), losses(straight1), what=f"sp={sp}", rtol=SP_RTOL)
    a, b = eval_losses(out), eval_losses(straight1)
    assert a.keys() == b.keys() == {0, 10}
    assert all(abs(a[s] - b[s]) / b[s] <= SP_RTOL for s in b), (a, b)
    assert open_checkpoint(out).manifest["world"]["sp"] == sp


def test_sequence_parallel_resume_same_and_other_layout(root, straight2, sp2):
    # stopped and resumed at dp=1 x sp=2: the straight sp=2 run, bitwise
    extra = ["parallel.sp=2", "parallel.zero_stage=2", "train.save_every=5"]
    out = run(root, "sp2_stopped", 2, *extra, "train.exit_at_step=5")
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_000005"]
    run(root, "sp2_stopped", 2, *extra, resume="auto")
    assert losses(out) == losses(sp2)
    assert eval_losses(out) == eval_losses(sp2)
    # saved at dp=2 x sp=1, resumed at dp=1 x sp=2
    out = root / "dp2_to_sp2"
    launch(
        2,
        [*SMALL, *extra, f"train.out_dir={out}"],
        resume=str(straight2 / "checkpoints" / "step_000005"),
    )
    assert_losses_close(losses(out), losses(straight2), steps=range(6, 11), what="dp2 -> sp2")


def test_two_nodes_with_static_rendezvous_train_dp2_sp2_like_one_process(root, straight1):
    """Two torchrun launches of 2 processes each: dp = 2 x sp = 2, each sp group on one
    node. Also: the four processes start with no prepared corpus; one per node prepares it."""
    out = root / "nodes"
    port = free_port()
    cold = {"HYLAS_CACHE_DIR": str(root / "cold-cache")}
    overrides = [*SMALL, "parallel.sp=2", "parallel.zero_stage=2", f"train.out_dir={out}"]
    procs = [
        start(2, overrides, extra_env=cold, nnodes=2, node_rank=rank, port=port) for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    # both "nodes" share the cache directory: the processes took turns, one prepared it
    cache = root / "cold-cache"
    assert (cache / ".prepare.lock").exists()
    assert len(list(cache.glob("shakespeare-*"))) == 1
    assert open_checkpoint(out).manifest["world"] == {
        "world_size": 4,
        "dp": 2,
        "sp": 2,
        "zero_stage": 2,
    }
    assert_losses_close(losses(out), losses(straight1), what="2 nodes x 2", rtol=SP_RTOL)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, what: str = ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return max((r["step"] for r in metrics(out) if "loss" in r), default=0) if path.exists() else 0


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()]


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(root, straight2):
    out = root / "sigterm"
    overrides = [*SMALL, "parallel.zero_stage=2", "train.save_every=5", f"train.out_dir={out}"]
    proc = start(2, overrides)
    wait_for(lambda: logged_steps(out) >= 2, proc, what="step 2")
    for pid in workers_of(proc.pid):  # as a cluster scheduler signals every task
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-4000:]
    assert "stopped on SIGTERM" in stdout and "--resume auto" in stdout
    ckpt = open_checkpoint(out)  # complete and verified
    assert 2 <= ckpt.step < 10
    launch(2, overrides, resume="auto")
    assert losses(out) == losses(straight2)  # fp32, bitwise
    assert eval_losses(out) == eval_losses(straight2)


def test_a_killed_worker_restarts_under_torchrun_and_the_run_continues_exactly(root, straight2):
    out = root / "sigkill"
    overrides = [*SMALL, "parallel.zero_stage=2", "train.save_every=2", f"train.out_dir={out}"]
    proc = start(2, overrides, max_restarts=1, resume="auto")
    wait_for(lambda: logged_steps(out) >= 5, proc, what="step 5")
    os.kill(workers_of(proc.pid)[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert "resuming from" in stderr  # the new workers continued from a checkpoint
    assert losses(out) == losses(straight2)
    kept = sorted(c.name for c in (out / "checkpoints").iterdir())
    assert kept == ["step_000006", "step_000008", "step_000010"]  # train.keep_checkpoints=3


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one(root, straight1):
    out = root / "killed_write"
    overrides = [*SMALL, "parallel.zero_stage=2", "train.save_every=2", f"train.out_dir={out}"]
    proc = start(1, overrides, worker=["--stall-save-step", "4"])
    partial = out / "checkpoints" / ".step_000004.partial"
    wait_for(lambda: (partial / "rng-00000.safetensors").exists(), proc, what="the stall")
    for pid in workers_of(proc.pid):  # the writing process itself
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert find_checkpoint(out).name == "step_000002"
    open_checkpoint(out)  # intact: every checksum holds
    launch(1, overrides, resume="auto")
    assert not partial.exists()  # cleaned up by the next save
    assert_losses_close(losses(out), losses(straight1), what="after the killed write")


def test_a_non_finite_loss_on_one_rank_skips_the_step_everywhere(root):
    out = root / "nan"
    extra = ["train.steps=4", "train.save_every=1", "train.keep_checkpoints=0"]
    launch(
        2,
        [*SMALL, *extra, "parallel.zero_stage=2", f"train.out_dir={out}"],
        worker=["--nan-steps", "3", "--nan-ranks", "1"],
    )
    records = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert records[3]["loss"] != records[3]["loss"]  # NaN is logged as it was
    before, after = (out / "checkpoints" / f"step_00000{s}" for s in (2, 3))
    for name in ("model.safetensors", "optimizer-00000.safetensors", "optimizer-00001.safetensors"):
        a = safetensors.torch.load_file(before / name)
        b = safetensors.torch.load_file(after / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} changed in a skipped step"
    state = [json.loads((d / "trainer.json").read_text()) for d in (before, after)]
    assert state[0]["optimizer_steps"] == state[1]["optimizer_steps"] == 2
    assert records[4]["loss"] == records[4]["loss"]  # training goes on


def test_too_many_bad_steps_in_a_row_stop_the_run(root):
    out = root / "nan_stop"
    proc = launch(
        1,
        [*SMALL, "parallel.zero_stage=0", "train.max_bad_steps=2", f"train.out_dir={out}"],
        worker=["--nan-steps", "2,3"],
        check=False,
    )
    assert proc.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient norm" in proc.stderr
    assert "(train.max_bad_steps=2), up to step 3; stopping" in proc.stderr


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused_by_every_rank(root):
    out = root / "refused"
    proc = launch(2, [*SMALL, "train.batch_size=5", f"train.out_dir={out}"], check=False)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (
            f"hylas: error (rank {rank}): train.batch_size (5) does not split evenly over "
            "dp = 2 ranks; make it a multiple of 2" in proc.stderr
        )
    assert "exitcode  : 2" in proc.stderr
    assert not out.exists()
