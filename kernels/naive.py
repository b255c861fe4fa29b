"""The per-token recurrences in fp32: the test oracles of every family.

Gated families (``naive_gated``)::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

g is None (no decay), [B, T, H] (one log decay per head) or [B, T, H, K] (per key channel).

Delta-rule families (``naive_delta``)::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t

g is None (DeltaNet) or [B, T, H] (Gated DeltaNet); beta [B, T, H].
"""

from __future__ import annotations

import itertools

import torch

from hylas.kernels.common import check_qkv, check_state, default_scale
from hylas.kernels.layout import Documents


def _recurrence(q, k, v, g, scale, state):
    """q, k, g [T, H, K], v [T, H, V], state [H, K, V] fp32 -> o [T, H, V], state."""
    outputs = []
    for t in range(q.shape[0]):
        state = g[t].exp().unsqueeze(-1) * state + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        outputs.append(torch.einsum("hk,hkv->hv", q[t] * scale, state))
    return torch.stack(outputs), state


def _run_documents(
    recurrence, q, k, v, gates, scale, initial_state, output_final_state, cu_seqlens
):
    """Run ``recurrence`` over each sequence (a batch row, or a packed document) in fp32.

    gates: per-token tensors [B, T, H, *] handed to the recurrence after v.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    scale = default_scale(scale, K)
    docs = Documents.of(cu_seqlens, B, T)
    if docs is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, s, e) for s, e in itertools.pairwise(docs.offsets)]
    check_state(initial_state, len(spans), H, K, V)
    out_dtype = v.dtype
    q, k, v, *gates = (x.float() for x in (q, k, v, *gates))
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(spans):
        state = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].float()
        pieces = [x[b, s:e] for x in (q, k, v, *gates)]
        o[b, s:e], state = recurrence(*pieces, scale, state)
        finals.append(state)
    return o.to(out_dtype), torch.stack(finals) if output_final_state else None


def naive_gated(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Token-by-token; o [B, T, H, V] in v's dtype and the final state [N, H, K, V] fp32."""
    B, T, H, K, _ = check_qkv(q, k, v)
    if g is None:
        g = q.new_zeros(B, T, H, K, dtype=torch.float32)
    elif g.dim() == 3:
        g = g.unsqueeze(-1).expand(B, T, H, K)
    return _run_documents(
        _recurrence, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens
    )


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
    return _run_documents(
        _delta_recurrence, q, k, v, [g, beta], scale, initial_state, output_final_state, cu_seqlens
    )
