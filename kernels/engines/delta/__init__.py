"""The calls of the delta-rule families (``delta_rule``, ``gated_delta_rule``).

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t

The family modules check their gates and call these with ``g`` = None (DeltaNet) or
[B, T, H] (Gated DeltaNet, log decay <= 0) and ``beta`` [B, T, H].

The LASP-2 protocol (docs/architecture.md, "Sequence parallelism (LASP-2)"): the segment's transition
is dense, so ``transition`` gives A [N, H, K, K], the ordered product
M_last ... M_first of M_t = exp(g_t) (I - beta_t k_t^T k_t), and B [N, H, K, V], the final
state from zero, with S_out = A @ S_in + B (fp32). ``entering_state_grad`` gives G, the
gradient the segment's own outputs put on its entering state. Packed segments
(``cu_seqlens``, one row) and ``starts_document`` follow the gated families: a document
starting after the segment's first token makes A = 0; a segment whose first token starts a
document has A = 0 and G = 0.
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
from hylas.kernels.engines.delta import chunk_torch as engine
from hylas.kernels.engines.delta.naive import naive_delta
from hylas.kernels.engines.gated.chunk_torch import chunk_groups, to_chunks
from hylas.kernels.layout import Documents, chunk_layout

__all__ = ["check_beta", "chunk", "entering_state_grad", "naive_delta", "recurrent", "transition"]


def check_beta(beta: torch.Tensor | None, q: torch.Tensor) -> None:
    want = tuple(q.shape[:3])
    if beta is None or tuple(beta.shape) != want:
        got = None if beta is None else tuple(beta.shape)
        raise ValueError(f"beta must be {list(want)} (write strength, in [0, 2]), got {got}")


def chunk(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, backend):
    B, T, H, K, V = check_qkv(q, k, v)
    docs = Documents.of(cu_seqlens, B, T)
    check_state(initial_state, B if docs is None else len(docs), H, K, V)
    scale = default_scale(scale, K)
    if resolve_backend(backend, q) == "triton":
        from hylas.kernels.engines.delta.chunk_triton import chunk_delta_triton

        return chunk_delta_triton(q, k, v, g, beta, scale, initial_state, output_final_state, docs)
    lay = chunk_layout(B, T, docs, q.device)
    return engine.chunk_delta_torch(q, k, v, g, beta, scale, initial_state, output_final_state, lay)


def recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, backend):
    B, _T, H, K, V = check_qkv(q, k, v)
    check_state(initial_state, B, H, K, V)
    scale = default_scale(scale, K)
    if resolve_backend(backend, q) == "triton":
        from hylas.kernels.engines.recurrent_triton import fused_recurrent_delta

        return fused_recurrent_delta(q, k, v, g, beta, scale, initial_state, output_final_state)
    return naive_delta(q, k, v, g, beta, scale, initial_state, output_final_state)


def _chunks(q, k, v, g, beta, scale, cu_seqlens):
    """The layout and a per-group generator of the engine's chunk quantities."""
    B, T, H, K, V = check_qkv(q, k, v)
    lay = chunk_layout(B, T, Documents.of(cu_seqlens, B, T), q.device)
    qc, kc, vc, gc, beta_c = engine.prepare_chunks(*(fold(x) for x in (q, k, v, g, beta)), lay)
    scale = default_scale(scale, K)

    def group(grp):
        return engine.DeltaChunk(
            qc[:, grp], kc[:, grp], vc[:, grp], beta_c[:, grp], gc[:, grp], scale
        )

    return lay, group, q.new_zeros(lay.docs, H, K, V, dtype=torch.float32)


@torch.no_grad()
def transition(q, k, v, g, beta, scale=None, cu_seqlens=None, starts_document=False):
    """(A [N, H, K, K], B [N, H, K, V]) of the segment, fp32; see the module docstring."""
    lay, group, zeros = _chunks(q, k, v, g, beta, scale, cu_seqlens)
    K = q.shape[-1]
    A = torch.eye(K, device=q.device).expand(lay.P, q.shape[2], K, K)
    state, finals = None, []
    for grp in chunk_groups(lay.N, lay.C):
        ch = group(grp)
        _, _, state = engine.scan_states(ch, grp.start, state, zeros, lay, finals)
        for A_chunk in ch.transition().unbind(1):  # later chunks multiply on the left
            A = A_chunk @ A
    B_state = finals[-1] if lay.packed else finals[0]
    if starts_document or (lay.packed and lay.docs > 1):
        A = torch.zeros_like(A)
    return A, B_state


@torch.no_grad()
def entering_state_grad(q, k, v, g, beta, do, scale=None, cu_seqlens=None, starts_document=False):
    """G [N, H, K, V] fp32 (N = B, or 1 when packed): d(own outputs)/d(entering state).

    A reverse pass over the chunks of the segment's first document:
    G_chunk = (scale q exp(g_cum) - QK w)^T dO + A_chunk^T G_next.
    """
    lay, group, _ = _chunks(q, k, v, g, beta, scale, cu_seqlens)
    doc = engine.heads_first(to_chunks(fold(do.float()), lay))
    first_doc_chunks = lay.doc_last[0] + 1 if lay.packed else lay.N
    grad = None  # w.r.t. the state leaving the current chunk
    for grp in reversed(chunk_groups(first_doc_chunks, lay.C)):
        ch = group(grp)
        through_h = (ch.q_dec - ch.QK @ ch.w).transpose(-1, -2) @ doc[:, grp]  # [P,G,H,K,V]
        A_chunk = ch.transition()
        for i in reversed(range(grp.stop - grp.start)):
            step = through_h[:, i]
            grad = step if grad is None else step + A_chunk[:, i].transpose(-1, -2) @ grad
    return torch.zeros_like(grad) if starts_document else grad


# -- LASP-2 on the local kernel (parallel/sp.py) ------------------------------------------


def local_transition(q, k, v, g, beta, scale=None, backend="auto") -> torch.Tensor:
    """A [B, H, K, K] of S_out = A S_in + B for each row: the final state of a run from the
    identity with zero values (S_out = A I + 0), by the family's own chunk kernel."""
    B, _, H, K = q.shape
    eye = torch.eye(K, device=q.device).expand(B, H, K, K).contiguous()
    zeros = v.new_zeros(*v.shape[:-1], K)
    _, A = chunk(q, k, zeros, g, beta, scale, eye, True, None, backend)
    return A
