"""What the Triton kernels may ask of the GPU they launch on (docs/architecture.md,
"Kernels on real GPUs").

A kernel that needs more shared memory per block than the GPU has does not launch:
sm_80 (A100) has 166,912 bytes, sm_86 / sm_89 (RTX 3090 / 4090, L40S) 101,376 and sm_90
(H100) 232,448. The tiles of every kernel are sized so that it fits the smallest of these
without pipelining; Triton's software pipelining (``num_stages``) then keeps that many
copies of a loop's loaded tiles in shared memory, so its depth is chosen here from the
device's limit, by one table for every kernel. The GPU compile gate
(``tests/gpu_compile_gate.py``) compiles every kernel at every supported head size for
sm_80, sm_89 and sm_90 and checks the table's choices against those limits.

One table rather than ``triton.autotune``: the choice is a function of the device alone, so
every rank of a job runs the same kernels (the same rounding, the same losses), and the
first step does not stop to benchmark.
"""

from __future__ import annotations

import functools

from hylas.kernels.common import triton_interpreted

# Head sizes both engines' kernels serve (a family's ``SPEC.max_head_size`` by default).
# The delta-rule scans hold a state column block of all of K in registers, as at most
# four 64-row blocks.
MAX_HEAD_SIZE = 256
# Shared memory per block at or above which loops are pipelined two deep (sm_80, sm_90).
_TWO_STAGES_FROM = 160 * 1024


def check_head_sizes(family: str, k: int, v: int, limit: int = MAX_HEAD_SIZE) -> None:
    """Refuse, with one sentence, head sizes the Triton kernels do not serve."""
    if k > limit or v > limit:
        raise ValueError(
            f"{family}: head sizes K={k}, V={v} are over the {limit} the GPU kernels "
            f"serve; use more heads (a smaller head size)"
        )


@functools.lru_cache
def _shared_memory_per_block(device: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device)["max_shared_mem"]


def shared_memory_per_block() -> int | None:
    """Of the device Triton launches on now; None under the interpreter (no limit)."""
    if triton_interpreted():
        return None
    from triton.runtime import driver

    return _shared_memory_per_block(driver.active.get_current_device())


def launch_options(max_stages: int = 2) -> dict:
    """``num_stages`` and ``num_warps`` for a launch, from the device's limit.

    Loops are pipelined two deep where a block has 160 KB of shared memory or more (sm_80,
    sm_90), and not at all below (sm_86, sm_89). A kernel whose loop loads many tiles
    at once passes ``max_stages=1``."""
    smem = shared_memory_per_block()
    stages = 1 if smem is not None and smem < _TWO_STAGES_FROM else max_stages
    return {"num_stages": stages, "num_warps": 4}
