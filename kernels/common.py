"""Pieces shared by every op family: argument checks and the backend choice."""

from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("auto", "torch", "triton")
# The chunk length of every chunkwise kernel, torch and Triton.
CHUNK = 64


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``, tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_takes_cpu_tensors() -> bool:
    """Whether Triton may run on CPU tensors here: under its interpreter
    (``TRITON_INTERPRET=1``, the numerical tests) or while a compile-only Triton driver is
    active (the GPU compile gate, which launches nothing; docs/architecture.md)."""
    if triton_interpreted():
        return True
    triton = sys.modules.get("triton")
    if triton is None:
        return False
    active = getattr(triton.runtime.driver, "_active", None)
    return bool(getattr(active, "accepts_cpu_tensors", False))


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn ``backend`` into the implementation that runs on ``x``: the one rule every
    ``chunk`` and ``recurrent`` call goes through.

    ``auto`` is Triton for CUDA tensors and torch otherwise. Triton on CPU tensors runs
    only where ``triton_takes_cpu_tensors()``; otherwise it is refused with one sentence.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not triton_takes_cpu_tensors():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
            f"these are on {x.device}, use backend='torch' or 'auto'"
        )
    return backend


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Check q, k [B, T, H, K] and v [B, T, H, V]; return (B, T, H, K, V)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q's [B, T, H], got {tuple(v.shape)}")
    B, T, H, K = q.shape
    return B, T, H, K, v.shape[-1]


def check_gate(g: torch.Tensor | None, q: torch.Tensor, kind: str, name: str) -> None:
    """kind: "none", "scalar" ([B, T, H]) or "channel" ([B, T, H, K])."""
    if kind == "none":
        return
    want = tuple(q.shape[:3]) if kind == "scalar" else tuple(q.shape)
    if g is None or tuple(g.shape) != want:
        got = None if g is None else tuple(g.shape)
        raise ValueError(f"{name} must be {list(want)} (log decay), got {got}")


def check_state(
    initial_state: torch.Tensor | None, n: int, h: int, k: int, v: int
) -> torch.Tensor | None:
    if initial_state is None:
        return None
    if initial_state.shape != (n, h, k, v):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = {(n, h, k, v)}, got {tuple(initial_state.shape)}"
        )
    return initial_state


def default_scale(scale: float | None, k: int) -> float:
    return k**-0.5 if scale is None else scale
