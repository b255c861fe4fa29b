"""The delta engine's oracle: the delta rule token by token, in fp32.

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t

g is None (DeltaNet) or [B, T, H] (Gated DeltaNet); beta [B, T, H].
"""

from __future__ import annotations

import torch

from hylas.kernels.engines.oracle import run_documents


def _delta_recurrence(q, k, v, g, beta, scale, state):
    """q, k [T, H, K], v [T, H, V], g, beta [T, H], state [H, K, V] fp32 -> o, state."""
    outputs = []
    for t in range(q.shape[0]):
        state = g[t].exp()[:, None, None] * state
        correction = v[t] - torch.einsum("hk,hkv->hv", k[t], state)  # v_t - k_t a_t S_{t-1}
        state = state + beta[t][:, None, None] * k[t].unsqueeze(-1) * correction.unsqueeze(-2)
        outputs.append(torch.einsum("hk,hkv->hv", q[t] * scale, state))
    return torch.stack(outputs), state


def naive_delta(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
):
    """The delta rule token by token, in fp32 (g None: DeltaNet; [B, T, H]: Gated DeltaNet).

        S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t    o_t = scale q_t S_t

    Returns o [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32 (or None).
    """
    if g is None:
        g = q.new_zeros(q.shape[:3], dtype=torch.float32)
    return run_documents(
        _delta_recurrence, q, k, v, [g, beta], scale, initial_state, output_final_state, cu_seqlens
    )
