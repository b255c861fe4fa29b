"""The gated engine's oracle: the per-token recurrence in fp32.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

g is None (no decay), [B, T, H] (one log decay per head) or [B, T, H, K] (per key channel).
"""

from __future__ import annotations

import torch

from hylas.kernels.common import check_qkv
from hylas.kernels.engines.oracle import run_documents


def _recurrence(q, k, v, g, scale, state):
    """q, k, g [T, H, K], v [T, H, V], state [H, K, V] fp32 -> o [T, H, V], state."""
    outputs = []
    for t in range(q.shape[0]):
        state = g[t].exp().unsqueeze(-1) * state + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        outputs.append(torch.einsum("hk,hkv->hv", q[t] * scale, state))
    return torch.stack(outputs), state


def naive_gated(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Token-by-token; o [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32."""
    B, T, H, K, _ = check_qkv(q, k, v)
    if g is None:
        g = q.new_zeros(B, T, H, K, dtype=torch.float32)
    elif g.dim() == 3:
        g = g.unsqueeze(-1).expand(B, T, H, K)
    return run_documents(
        _recurrence, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens
    )
