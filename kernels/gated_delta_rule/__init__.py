"""Gated DeltaNet: the delta rule with a data-dependent scalar decay per head.

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t     o_t = scale * q_t S_t

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log decay, <= 0, used in fp32 (Gated
DeltaNet's is -exp(A_log) * softplus(a + dt_bias)); beta [B, T, H] write strength. Keys
are expected L2-normalised and beta in [0, 1], or [0, 2] with negative eigenvalues (see
``hylas.kernels.delta_rule``). States are [N, H, K, V] fp32 (N = B, or the number of
documents with ``cu_seqlens``, where B == 1); outputs are in v's dtype; ``scale=None`` means
K ** -0.5.
"""

from hylas.kernels.common import check_gate
from hylas.kernels.engines import delta
from hylas.kernels.family import FamilySpec, Gate

# LASP-2 (docs/architecture.md, "Sequence parallelism"): the entering state changes every
# chunk's writes (u - w S), so the local kernel waits for it.
SPEC = FamilySpec(
    "gated_delta_rule", (Gate("g", "scalar"), Gate("beta", "beta")), split_output=False, delta=True
)


def _check(q, g, beta):
    check_gate(g, q, "scalar", "g")
    delta.check_beta(beta, q)


def chunk(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Chunkwise, with gradients for q, k, v, g, beta and initial_state. backend: auto | torch | triton."""
    _check(q, g, beta)
    return delta.chunk(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, backend
    )


def naive(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The fp32 per-token recurrence: the oracle."""
    _check(q, g, beta)
    return delta.naive_delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def recurrent(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True, backend="auto"
):
    """Decode a few tokens from ``initial_state`` [B, H, K, V] (fused Triton on CUDA).

    backend: auto | torch | triton, as for ``chunk``."""
    _check(q, g, beta)
    return delta.recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, backend)


def transition(q, k, v, g, beta, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: (A [N, H, K, K], B [N, H, K, V]) with S_out = A @ S_in + B."""
    _check(q, g, beta)
    return delta.transition(q, k, v, g, beta, scale, cu_seqlens, starts_document)


def entering_state_grad(q, k, v, g, beta, do, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: G [N, H, K, V], the gradient of the segment's outputs on its entering state."""
    _check(q, g, beta)
    return delta.entering_state_grad(q, k, v, g, beta, do, scale, cu_seqlens, starts_document)


def local_transition(q, k, v, g, beta, scale=None, backend="auto"):
    """LASP-2: A [B, H, K, K] of S_out = A S_in + B for each row, by this family's own
    chunk kernel (a run from the identity with zero values), fp32."""
    _check(q, g, beta)
    return delta.local_transition(q, k, v, g, beta, scale, backend)
