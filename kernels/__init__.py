"""Hylas's chunkwise linear-recurrence ops, one module per op family.

Every family offers the same calls (docs/architecture.md, "One op family, three
implementations"): ``naive`` (the fp32 per-token oracle), ``chunk`` (the chunkwise
algorithm, ``backend="auto" | "torch" | "triton"``), ``recurrent`` (decoding from a
state) and the LASP-2 protocol ``transition`` / ``entering_state_grad``. Kernels import
nothing from the rest of Hylas.
"""

from hylas.kernels import delta_rule, gated_delta_rule, gla, linear_attn, simple_gla
from hylas.kernels.common import resolve_backend

__all__ = [
    "delta_rule",
    "gated_delta_rule",
    "gla",
    "linear_attn",
    "resolve_backend",
    "simple_gla",
]
