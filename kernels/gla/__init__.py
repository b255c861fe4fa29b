"""Gated linear attention: a data-dependent log decay per key channel (GLA, HGRN2).

    S_t = Diag(exp(gk_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; gk [B, T, H, K] log decay, <= 0 (e.g.
``logsigmoid(x) / 16``), used in fp32. q and k need no normalisation. States are
[N, H, K, V] fp32 (N = B, or the number of documents with ``cu_seqlens``, where B == 1).
Outputs are in v's dtype; ``scale=None`` means K ** -0.5.
"""

from hylas.kernels.common import check_gate
from hylas.kernels.engines import gated
from hylas.kernels.family import FamilySpec, Gate

# LASP-2 (docs/architecture.md, "Sequence parallelism"): the output from an entering state
# S is the output from zero plus scale * (q * exp(cumsum g)) S (``entering_read``), so a
# rank runs its whole local kernel while the states are being gathered.
SPEC = FamilySpec("gla", (Gate("gk", "channel"),), split_output=True)


def chunk(
    q,
    k,
    v,
    gk,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Chunkwise, with gradients for q, k, v, gk and initial_state. backend: auto | torch | triton."""
    check_gate(gk, q, "channel", "gk")
    return gated.chunk(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, backend)


def naive(q, k, v, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The fp32 per-token recurrence: the oracle."""
    check_gate(gk, q, "channel", "gk")
    return gated.naive_gated(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)


def recurrent(q, k, v, gk, scale=None, initial_state=None, output_final_state=True, backend="auto"):
    """Decode a few tokens from ``initial_state`` [B, H, K, V] (fused Triton on CUDA).

    backend: auto | torch | triton, as for ``chunk``."""
    check_gate(gk, q, "channel", "gk")
    return gated.recurrent(q, k, v, gk, scale, initial_state, output_final_state, backend)


def transition(q, k, v, gk, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: (A [N, H, K], B [N, H, K, V]) with S_out = A[..., None] * S_in + B."""
    check_gate(gk, q, "channel", "gk")
    return gated.transition(q, k, v, gk, scale, cu_seqlens, starts_document)


def entering_state_grad(q, k, v, gk, do, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: G [N, H, K, V], the gradient of the segment's outputs on its entering state."""
    check_gate(gk, q, "channel", "gk")
    return gated.entering_state_grad(q, k, v, gk, do, scale, cu_seqlens, starts_document)


# LASP-2 on the local kernel: the gated engine's, called with this family's checked gates.
local_transition = gated.local_transition
entering_read = gated.entering_read
