"""The calls every gated linear family offers, for any of the three gate kinds.

The family modules (``linear_attn``, ``simple_gla``, ``gla``) check their own gate and
call these with ``g`` = None, [B, T, H] or [B, T, H, K] (log decays, <= 0).

The LASP-2 protocol (docs/architecture.md, "Sequence parallelism (LASP-2)"): for a segment,
``transition`` gives (A, B) with S_out = A * S_in + B (A broadcast over V: [N, H] for a
scalar or no decay, [N, H, K] per channel; B [N, H, K, V], the final state from zero),
and ``entering_state_grad`` gives G, the gradient the segment's own outputs put on its
entering state. With ``cu_seqlens`` (one packed row) a document starting after the
segment's first token makes A = 0 and B that last document's state; with
``starts_document`` the segment's first token begins a document, so A = 0 and G = 0.
"""

from __future__ import annotations

import torch

from hylas.kernels.common import (
    check_qkv,
    check_state,
    default_scale,
    resolve_backend,
)
from hylas.kernels.engines.autograd import fold
from hylas.kernels.engines.gated import chunk_torch
from hylas.kernels.engines.gated.naive import naive_gated
from hylas.kernels.layout import Documents, chunk_layout

__all__ = ["chunk", "entering_state_grad", "naive_gated", "recurrent", "transition"]


def chunk(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    B, T, H, K, V = check_qkv(q, k, v)
    docs = Documents.of(cu_seqlens, B, T)
    check_state(initial_state, B if docs is None else len(docs), H, K, V)
    scale = default_scale(scale, K)
    if resolve_backend(backend, q) == "triton":
        from hylas.kernels.engines.gated.chunk_triton import chunk_gated_triton

        return chunk_gated_triton(q, k, v, g, scale, initial_state, output_final_state, docs)
    lay = chunk_layout(B, T, docs, q.device)
    return chunk_torch.chunk_gated_torch(q, k, v, g, scale, initial_state, output_final_state, lay)


def recurrent(q, k, v, g, scale, initial_state, output_final_state, backend):
    B, _T, H, K, V = check_qkv(q, k, v)
    check_state(initial_state, B, H, K, V)
    scale = default_scale(scale, K)
    if resolve_backend(backend, q) == "triton":
        from hylas.kernels.engines.recurrent_triton import fused_recurrent_gated

        return fused_recurrent_gated(q, k, v, g, scale, initial_state, output_final_state)
    return naive_gated(q, k, v, g, scale, initial_state, output_final_state)


def _segment(q, k, v, g, cu_seqlens):
    B, T, H, K, V = check_qkv(q, k, v)
    lay = chunk_layout(B, T, Documents.of(cu_seqlens, B, T), q.device)
    g_cum = chunk_torch.gate_cumsum(fold(g), lay, K, q)
    return lay, g_cum, q.new_zeros(lay.docs, H, K, V, dtype=torch.float32)


@torch.no_grad()
def transition(q, k, v, g, scale=None, cu_seqlens=None, starts_document=False):
    """(A, B) of the segment; see the module docstring. fp32."""
    lay, g_cum, zeros = _segment(q, k, v, g, cu_seqlens)
    kc, vc = (chunk_torch.to_chunks(fold(x), lay) for x in (k, v))
    state, finals = None, []
    for grp in chunk_torch.chunk_groups(lay.N, lay.C):
        _, writes, decay = chunk_torch.chunk_writes(kc[:, grp], vc[:, grp], g_cum[:, grp])
        _, state = chunk_torch.scan_forward(writes, decay, grp.start, state, zeros, lay, finals)
    B_state = finals[-1] if lay.packed else finals[0]
    A = g_cum[:, :, -1].sum(1).exp()  # [P, H, K|1]: the product of every decay
    if g is None or g.dim() == 3:
        A = A[..., 0]
    if starts_document or (lay.packed and lay.docs > 1):
        A = torch.zeros_like(A)
    return A, B_state


@torch.no_grad()
def entering_state_grad(q, k, v, g, do, scale=None, cu_seqlens=None, starts_document=False):
    """G [N, H, K, V] fp32 (N = B, or 1 when packed): d(own outputs)/d(entering state)."""
    lay, g_cum, zeros = _segment(q, k, v, g, cu_seqlens)
    scale = default_scale(scale, q.shape[-1])
    qc, doc = (chunk_torch.to_chunks(fold(x), lay) for x in (q, do))
    grad, dh0 = None, []
    for grp in reversed(chunk_torch.chunk_groups(lay.N, lay.C)):
        bg = g_cum[:, grp]
        q_dec = qc[:, grp].float() * scale * bg.exp()
        q_dec_do = torch.einsum("pnchk,pnchv->pnhkv", q_dec, doc[:, grp].float())
        decay = bg[:, :, -1].exp().unsqueeze(-1)
        _, grad = chunk_torch.scan_backward(q_dec_do, decay, grp.start, grad, zeros, lay, dh0)
    G = dh0[-1] if lay.packed else dh0[0]  # the first document's, reached last
    return torch.zeros_like(G) if starts_document else G


# -- LASP-2 on the local kernel (parallel/sp.py) ------------------------------------------


def local_transition(q, k, v, g, scale=None, backend="auto") -> torch.Tensor:
    """A of S_out = A * S_in + B for each row, in closed form: the product of every decay,
    exp(sum_t g_t) ([B, H] for a scalar or no decay, [B, H, K] per channel), fp32."""
    if g is None:
        return q.new_ones(q.shape[0], q.shape[2], dtype=torch.float32)
    return g.float().sum(1).exp()


def entering_read(q, g, state, scale) -> torch.Tensor:
    """What an entering state S [B, H, K, V] adds to each token's output: scale (q_t *
    exp(sum of g up to t)) S, [B, L, H, V] fp32 (the split-output form)."""
    read = q.float() * scale
    if g is not None:
        decay = g.float().cumsum(1).exp()  # <= 1: log decays are <= 0
        read = read * (decay if decay.dim() == 4 else decay.unsqueeze(-1))
    return torch.einsum("blhk,bhkv->blhv", read, state)
