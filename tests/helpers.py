"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_rms / ||expected||_rms in fp64; NaN or Inf anywhere fails."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "actual holds NaN or Inf"
    assert torch.isfinite(expected).all(), "expected holds NaN or Inf"
    a, e = actual.double(), expected.double()
    denom = e.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((a - e).pow(2).mean().sqrt() / denom).item()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", atol: float = 0.0
) -> None:
    """Relative RMS error <= tol, or an RMS difference <= atol where the reference is ~0
    (e.g. a gate gradient that is exactly zero, computed through a cancelling identity)."""
    err = rel_rms_error(actual, expected)
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt().item()
    assert err <= tol or diff <= atol, f"{what}: relative RMS error {err:.3e} > {tol:.1e}"


def outputs_and_grads(fn, inputs, h0, **kw):
    """o, final state and the gradients (inputs, then h0) of a fixed random projection of
    both, for a kernel call ``fn(*inputs, initial_state=h0, output_final_state=True, **kw)``."""
    o, ht = fn(*inputs, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    leaves = [*inputs] + ([h0] if h0 is not None else [])
    return o, ht, torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves)


def spawn_ranks(worker, world: int, out_dir, timeout_s: float = 120) -> None:
    """Run ``worker(rank, port, out_dir)`` in ``world`` spawned processes on a free port;
    kill them all and fail the test if they run past ``timeout_s``."""
    import socket
    import time

    import pytest
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        worker, args=(port, str(out_dir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-rank launch ran past {timeout_s} s")
