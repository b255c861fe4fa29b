"""DeltaNet's delta rule: each token overwrites the value stored under its key.

    S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale * q_t S_t

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H] write strength. Keys are expected
L2-normalised (||k_t|| = 1, e.g. ``F.normalize(k, dim=-1)``) and beta in [0, 1]
(``sigmoid``), or in [0, 2] with negative eigenvalues (``2 * sigmoid``, for state
tracking): then every transition has norm <= 1. Unnormalised keys are not refused (that
would cost a pass over k) but can make the state grow without bound. States are
[N, H, K, V] fp32 (N = B, or the number of documents with ``cu_seqlens``, where B == 1);
outputs are in v's dtype; ``scale=None`` means K ** -0.5. The chunkwise form is the WY / UT
transform (``hylas.kernels.engines.delta.chunk_torch``), solved in fp32.
"""

from hylas.kernels.engines import delta
from hylas.kernels.family import FamilySpec, Gate

# LASP-2 (docs/architecture.md, "Sequence parallelism"): the entering state changes every
# chunk's writes (u - w S), so the local kernel waits for it.
SPEC = FamilySpec("delta_rule", (Gate("beta", "beta"),), split_output=False, delta=True)


def chunk(
    q,
    k,
    v,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Chunkwise, with gradients for q, k, v, beta and initial_state. backend: auto | torch | triton."""
    delta.check_beta(beta, q)
    return delta.chunk(
        q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens, backend
    )


def naive(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The fp32 per-token recurrence: the oracle."""
    delta.check_beta(beta, q)
    return delta.naive_delta(
        q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens
    )


def recurrent(
    q, k, v, beta, scale=None, initial_state=None, output_final_state=True, backend="auto"
):
    """Decode a few tokens from ``initial_state`` [B, H, K, V] (fused Triton on CUDA).

    backend: auto | torch | triton, as for ``chunk``."""
    delta.check_beta(beta, q)
    return delta.recurrent(q, k, v, None, beta, scale, initial_state, output_final_state, backend)


def transition(q, k, v, beta, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: (A [N, H, K, K], B [N, H, K, V]) with S_out = A @ S_in + B."""
    delta.check_beta(beta, q)
    return delta.transition(q, k, v, None, beta, scale, cu_seqlens, starts_document)


def entering_state_grad(q, k, v, beta, do, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: G [N, H, K, V], the gradient of the segment's outputs on its entering state."""
    delta.check_beta(beta, q)
    return delta.entering_state_grad(q, k, v, None, beta, do, scale, cu_seqlens, starts_document)


def local_transition(q, k, v, beta, scale=None, backend="auto"):
    """LASP-2: A [B, H, K, K] of S_out = A S_in + B for each row, by this family's own
    chunk kernel (a run from the identity with zero values), fp32."""
    delta.check_beta(beta, q)
    return delta.local_transition(q, k, v, None, beta, scale, backend)
