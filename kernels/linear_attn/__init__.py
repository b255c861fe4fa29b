"""Linear attention without decay (M_t = I); feature maps are the mixer's business.

    S_t = S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

Shapes: q, k [B, T, H, K]; v [B, T, H, V]. States are [N, H, K, V] fp32 (N = B, or the
number of documents with ``cu_seqlens``). Outputs are in v's dtype; ``scale=None`` means
K ** -0.5. Without decay the state grows with T: keep q and k normalised (feature maps,
L2 or sum normalisation) for long sequences.
"""

from hylas.kernels.engines import gated
from hylas.kernels.family import FamilySpec

# LASP-2 (docs/architecture.md, "Sequence parallelism"): the output from an entering state
# S is the output from zero plus scale * (q * exp(cumsum g)) S (``entering_read``), so a
# rank runs its whole local kernel while the states are being gathered.
SPEC = FamilySpec("linear_attn", (), split_output=True)


def chunk(
    q,
    k,
    v,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Chunkwise, with gradients for q, k, v and initial_state. backend: auto | torch | triton."""
    return gated.chunk(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens, backend)


def naive(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The fp32 per-token recurrence: the oracle."""
    return gated.naive_gated(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens)


def recurrent(q, k, v, scale=None, initial_state=None, output_final_state=True, backend="auto"):
    """Decode a few tokens from ``initial_state`` [B, H, K, V] (fused Triton on CUDA).

    backend: auto | torch | triton, as for ``chunk``."""
    return gated.recurrent(q, k, v, None, scale, initial_state, output_final_state, backend)


def transition(q, k, v, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: (A [N, H], B [N, H, K, V]) with S_out = A[..., None, None] * S_in + B."""
    return gated.transition(q, k, v, None, scale, cu_seqlens, starts_document)


def entering_state_grad(q, k, v, do, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: G [N, H, K, V], the gradient of the segment's outputs on its entering state."""
    return gated.entering_state_grad(q, k, v, None, do, scale, cu_seqlens, starts_document)


def local_transition(q, k, v, scale=None, backend="auto"):
    """LASP-2: A of S_out = A * S_in + B for each row: ones, nothing decays (fp32)."""
    return gated.local_transition(q, k, v, None, scale, backend)


def entering_read(q, state, scale):
    """LASP-2: what an entering state [B, H, K, V] adds to each output, [B, L, H, V] fp32."""
    return gated.entering_read(q, None, state, scale)
