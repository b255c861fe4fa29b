"""The chunkwise algorithm for the gated linear families, in torch: the CPU path.

One engine serves ``linear_attn`` (no gate), ``simple_gla`` (a scalar log decay per head
and token) and ``gla`` (a log decay per key channel). Per head, with state S [K, V]::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

Legend: B batch, T tokens, H heads, K key dim, V value dim, P sequences in the chunked
layout (B, or 1 when packed), N chunks per layout row, C chunk length, S sub-chunks per
chunk, c sub-chunk length (C = S * c), D documents.

Within a chunk, g_cum is the inclusive cumulative log decay (fp32, <= 0, non-increasing),
b_L its value at the chunk's end, h the state entering the chunk:

    o_i = scale * ( sum_{j <= i} (q_i . k_j exp(b_i - b_j)) v_j + (q_i exp(b_i)) h )
    h'  = exp(b_L) h + sum_j (k_j exp(b_L - b_j))^T v_j

Every exponent is <= 0. For a per-channel decay the intra-chunk term factors through a
reference r = the first position of the query's sub-chunk, exp(b_i - b_j) =
exp(b_i - b_r) exp(b_r - b_j), so blocks below the diagonal are matmuls; diagonal
blocks are formed elementwise over K. A scalar decay needs no such care: its C x C
decay matrix is formed directly. Never form exp(g_cum) and exp(-g_cum) separately: at a log
decay of -20 per token that is exp(1280).

Memory: the forward keeps only its inputs; the backward recomputes the chunk states and
works through the sequence in groups of chunks, so peak memory does not grow with the
square of the chunk or with every intermediate of every chunk.

Gate gradient: per document, for every key channel,
    dg_t = sum_{s >= t} (q_s dq_s - k_s dk_s) + sum_V (h_T * dh_T),
because each term of the output (and of the final state h_T) carries exp(sum of the
gates between its key and its query); that sum covers g_t exactly when the key is before
t and the query (or the end) at or after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylas.kernels.engines.autograd import run
from hylas.kernels.layout import ChunkLayout

SUB_CHUNK = 8
# Tokens per group of chunks, for heads of K * V <= 128 * 128: a group's states and blocks
# stay in cache. Smaller heads get longer groups (up to 2048 tokens), fewer torch calls.
GROUP_TOKENS = 512
MAX_GROUP_TOKENS = 2048


def to_chunks(x: torch.Tensor, lay: ChunkLayout) -> torch.Tensor:
    """[P * T, H, *] (the layout's rows end to end) -> [P, N, C, H, *], zero-padded."""
    if lay.packed:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[lay.index]  # -1 reads the zero row
        return x.view(1, lay.N, lay.C, *x.shape[1:])
    x = x.reshape(lay.P, lay.T, *x.shape[1:])
    pad = lay.N * lay.C - lay.T
    if pad:
        x = F.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, pad))
    return x.view(lay.P, lay.N, lay.C, *x.shape[2:])


def from_chunks(x: torch.Tensor, lay: ChunkLayout) -> torch.Tensor:
    """[P, N, C, H, *] -> [P * T, H, *] (the inverse of :func:`to_chunks`)."""
    flat = x.reshape(x.shape[0], lay.N * lay.C, *x.shape[3:])
    if lay.packed:
        return flat[0].index_select(0, lay.slot)
    return flat[:, : lay.T].reshape(lay.P * lay.T, *flat.shape[2:])


def gate_cumsum(
    g: torch.Tensor | None, lay: ChunkLayout, K: int, ref: torch.Tensor
) -> torch.Tensor:
    """Within-chunk inclusive cumsum of the log decay g [P * T, H(, K)], fp32:
    [P, N, C, H, 1 or K]."""
    if g is None:
        return ref.new_zeros(lay.P, lay.N, lay.C, ref.shape[-2], 1, dtype=torch.float32)
    if g.dim() == 2:
        g = g.unsqueeze(-1)
    return to_chunks(g.float(), lay).cumsum(dim=2)


def initial_states(h0: torch.Tensor | None, P: int, H: int, K: int, V: int, ref: torch.Tensor):
    return ref.new_zeros(P, H, K, V, dtype=torch.float32) if h0 is None else h0.float()


def chunk_writes(kc, vc, g_cum):
    """A group's chunk writes from a zero state and decays: k_dec [P,G,C,H,K], writes [P,G,H,K,V], decay [P,G,H,K|1,1]."""
    b_last = g_cum[:, :, -1:]
    k_dec = kc * (b_last - g_cum).exp()  # exponent <= 0
    writes = torch.einsum("pnchk,pnchv->pnhkv", k_dec.to(vc.dtype), vc).float()
    return k_dec, writes, b_last.squeeze(2).exp().unsqueeze(-1)


def scan_forward(writes, decay, n0, state, h0, lay: ChunkLayout, finals: list):
    """States entering chunks n0.. of a group [P,G,H,K,V]; the carried state goes on.

    Documents restart from their row of h0; the state leaving a document's last chunk is
    appended to ``finals``.
    """
    entering = []
    for i in range(writes.shape[1]):
        n = n0 + i
        if n in lay.start_doc:
            d = lay.start_doc[n]
            state = h0 if not lay.packed else h0[d : d + 1]
        entering.append(state)
        state = decay[:, i] * state + writes[:, i]
        if n in lay.end_doc:
            finals.append(state)
    return torch.stack(entering, dim=1), state


def scan_backward(q_dec_do, decay, n0, grad, dht, lay: ChunkLayout, dh0: list):
    """Reverse pass over a group. q_dec_do [P,G,H,K,V] = (q exp(g_cum))^T dO per chunk.

    Returns the gradients w.r.t. the states LEAVING the group's chunks [P,G,H,K,V] and the
    carried gradient; a document's first chunk appends d(its initial state) to ``dh0``.
    """
    leaving = [None] * q_dec_do.shape[1]
    for i in reversed(range(q_dec_do.shape[1])):
        n = n0 + i
        if n in lay.end_doc:
            d = lay.end_doc[n]
            grad = dht if not lay.packed else dht[d : d + 1]
        leaving[i] = grad
        grad = decay[:, i] * grad + q_dec_do[:, i]  # w.r.t. the state entering chunk n
        if n in lay.start_doc:
            dh0.append(grad)
    return torch.stack(leaving, dim=1), grad


def _decay_matrix(b_i, b_j):
    """exp(b_i - b_j) for j <= i, else 0: [.., C, C] from scalar cumsums [.., C]."""
    C = b_i.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=b_i.device).tril()
    diff = (b_i.unsqueeze(-1) - b_j.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    return diff.exp()


def _channel_blocks(q, k, g_cum, sub):
    """Pieces of the per-channel intra-chunk product, all exponents <= 0.

    q, k, g_cum: [.., C, K] with g_cum fp32. Returns (q_rel, k_fac, within) where, with sub-chunks
    of length c, q_rel = q exp(g_cum - b_r(I)), k_fac(d) = k_J exp(b_r(J+d) - b_J) for query
    sub-chunk I = J + d, and within [.., S, c, c, K] = exp(b_i - b_j) inside a sub-chunk.
    """
    *lead, C, K = q.shape
    S = C // sub
    q = q.reshape(*lead, S, sub, K)
    k = k.reshape(*lead, S, sub, K)
    g_cum = g_cum.reshape(*lead, S, sub, K)
    b_ref = g_cum[..., :1, :]  # [.., S, 1, K]
    q_rel = q * (g_cum - b_ref).exp()
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    rel = (g_cum.unsqueeze(-2) - g_cum.unsqueeze(-3)).masked_fill(
        ~causal[:, :, None], float("-inf")
    )
    return q, k, g_cum, b_ref, q_rel, rel.exp()


def _blocks(X, d):
    """The blocks (I = J + d, J) of X [.., S, c, S, c] as a view [.., S - d, c, c]."""
    return torch.diagonal(X, offset=-d, dim1=-4, dim2=-2).movedim(-1, -3)


def _intra_scores_channel(qs, k, g_cum, sub):
    """A[i, j] = sum_K qs_i k_j exp(b_i - b_j), j <= i: [.., C, C] for per-channel decays."""
    *lead, C, _K = qs.shape
    S = C // sub
    q, k, g_cum, b_ref, q_rel, within = _channel_blocks(qs, k, g_cum, sub)
    A = qs.new_zeros(*lead, S, sub, S, sub, dtype=torch.float32)
    diag = torch.einsum("...xik,...xijk->...xij", q.float(), within * k.float().unsqueeze(-3))
    _blocks(A, 0).copy_(diag)
    for d in range(1, S):  # key sub-chunk J = I - d
        k_fac = k[..., : S - d, :, :] * (b_ref[..., d:, :, :] - g_cum[..., : S - d, :, :]).exp()
        _blocks(A, d).copy_(q_rel[..., d:, :, :] @ k_fac.transpose(-1, -2))
    return A.reshape(*lead, C, C)


def _intra_channel_backward(qs, k, g_cum, dA, sub):
    """A = _intra_scores_channel(qs, k, g_cum) and, given dA [.., C, C] (causal), d(qs) and dk.

    One pass over the sub-chunk blocks: each block's decay factors are formed once and
    serve the scores and both gradients."""
    *lead, C, K = qs.shape
    S = C // sub
    q, k_s, b_s, b_ref, q_rel, within = _channel_blocks(qs.float(), k.float(), g_cum, sub)
    A = qs.new_zeros(*lead, S, sub, S, sub, dtype=torch.float32)
    dA = dA.reshape(*lead, S, sub, S, sub)
    k_within = within * k_s.unsqueeze(-3)  # [.., S, c_i, c_j, K]
    _blocks(A, 0).copy_(torch.einsum("...xik,...xijk->...xij", q, k_within))
    dA_diag = _blocks(dA, 0)  # [.., S, c, c]
    dq = torch.einsum("...xij,...xijk->...xik", dA_diag, k_within)
    dk = torch.einsum("...xij,...xijk->...xjk", dA_diag, within * q.unsqueeze(-2))
    q_scale = (b_s - b_ref).exp()  # d(q_rel) -> d(q)
    for d in range(1, S):  # key sub-chunk J = I - d
        to_ref = (b_ref[..., d:, :, :] - b_s[..., : S - d, :, :]).exp()  # exp(b_r(J+d) - b_J)
        k_fac = k_s[..., : S - d, :, :] * to_ref
        _blocks(A, d).copy_(q_rel[..., d:, :, :] @ k_fac.transpose(-1, -2))
        dA_off = _blocks(dA, d)  # [.., S-d, c_i, c_j]
        dq[..., d:, :, :] += (dA_off @ k_fac) * q_scale[..., d:, :, :]
        dk[..., : S - d, :, :] += (dA_off.transpose(-1, -2) @ q_rel[..., d:, :, :]) * to_ref
    return A.reshape(*lead, C, C), dq.reshape(*lead, C, K), dk.reshape(*lead, C, K)


def chunk_groups(N: int, C: int, K: int = 128, V: int = 128):
    tokens = min(MAX_GROUP_TOKENS, GROUP_TOKENS * max(1, (128 * 128) // (K * V)))
    size = max(1, tokens // C)
    return [slice(s, min(N, s + size)) for s in range(0, N, size)]


def _forward(q, k, v, g, scale, h0, lay: ChunkLayout, sub: int):
    """In the chunked layout: o [P,N,C,H,V] and the final states [D,H,K,V]."""
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    g_cum = gate_cumsum(g, lay, K, q)  # [P,N,C,H,K|1]
    qc, kc, vc = to_chunks(q, lay), to_chunks(k, lay), to_chunks(v, lay)
    h0 = initial_states(h0, lay.docs, H, K, V, q)
    o = torch.empty(*qc.shape[:-1], V, dtype=vc.dtype, device=q.device)
    state, finals = None, []
    for grp in chunk_groups(lay.N, lay.C, K, V):  # the group's states stay in cache
        _, writes, decay = chunk_writes(kc[:, grp], vc[:, grp], g_cum[:, grp])
        entering, state = scan_forward(writes, decay, grp.start, state, h0, lay, finals)
        o[:, grp] = _output_group(
            qc[:, grp] * scale, kc[:, grp], vc[:, grp], g_cum[:, grp], entering, sub
        )
    return o, stack_states(finals, lay)


def stack_states(states: list, lay: ChunkLayout) -> torch.Tensor:
    return states[0] if not lay.packed else torch.cat(states)


def heads_first(x):
    """[P,N,C,H,*] -> [P,N,H,C,*]."""
    return x.transpose(2, 3)


def _output_group(qs, kc, vc, g_cum, h, sub):
    qh, kh, vh, bh = (heads_first(x) for x in (qs, kc, vc, g_cum))  # [P,G,H,C,*]
    if bh.shape[-1] == 1:
        A = (qh @ kh.transpose(-1, -2)).float() * _decay_matrix(bh[..., 0], bh[..., 0])
    else:
        A = _intra_scores_channel(qh, kh, bh, sub)
    o = A.to(vh.dtype) @ vh + (qh * bh.exp()).to(vh.dtype) @ h.to(vh.dtype)
    return heads_first(o)


class GatedTorch:
    """The gated engine in torch, in the engines' autograd pattern (``hylas.kernels.engines.autograd``)."""

    @staticmethod
    def forward(ctx, lay: ChunkLayout, scale, output_final_state, h0, q, k, v, g):
        sub = min(SUB_CHUNK, lay.C)
        o, finals = _forward(q, k, v, g, scale, h0, lay, sub)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.meta = (scale, lay, sub)
        return from_chunks(o, lay), (finals if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        scale, lay, sub = ctx.meta
        H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
        g_cum = gate_cumsum(g, lay, K, q)
        qc, kc, vc, doc = (to_chunks(x, lay) for x in (q, k, v, do))
        states_in = initial_states(h0, lay.docs, H, K, V, q)
        groups = chunk_groups(lay.N, lay.C, K, V)

        # Pass 1: only the states entering each group are kept (and the final states).
        group_states, finals, state = [], [], None
        for grp in groups:
            group_states.append(state)
            _, writes, decay = chunk_writes(kc[:, grp], vc[:, grp], g_cum[:, grp])
            _, state = scan_forward(writes, decay, grp.start, state, states_in, lay, finals)
        finals = stack_states(finals, lay)
        dht = torch.zeros_like(finals) if dht is None else dht

        # Pass 2, last group first: recompute the group's states, carry the state gradient.
        dq = torch.empty(qc.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(dq), torch.empty(vc.shape, dtype=torch.float32, device=q.device)
        grad, dh0 = None, []
        for grp, state in zip(reversed(groups), reversed(group_states), strict=True):
            qs, kg, vg, bg, dog = (
                qc[:, grp] * scale,
                kc[:, grp],
                vc[:, grp],
                g_cum[:, grp],
                doc[:, grp],
            )
            k_dec, writes, decay = chunk_writes(kg, vg, bg)
            entering, _ = scan_forward(writes, decay, grp.start, state, states_in, lay, [])
            q_dec_do = torch.einsum(
                "pnchk,pnchv->pnhkv", (qs * bg.exp()).to(dog.dtype), dog
            ).float()
            leaving, grad = scan_backward(q_dec_do, decay, grp.start, grad, dht, lay, dh0)
            dq[:, grp], dk[:, grp], dv[:, grp] = _backward_group(
                qs, kg, vg, bg, dog, entering, leaving, k_dec, sub
            )
        dq_t, dk_t, dv_t = (from_chunks(x, lay) for x in (dq * scale, dk, dv))
        dg = None
        if g is not None:
            dg = _gate_grad(q, k, dq_t, dk_t, finals, dht, lay, per_channel=g.dim() == 3)
        dh0 = None if h0 is None else stack_states(dh0[::-1], lay)
        return dh0, dq_t, dk_t, dv_t, dg


def _backward_group(qs, kc, vc, g_cum, do, h, dh, k_dec, sub):
    """dq (w.r.t. scaled q), dk, dv for a group of chunks, all [P,G,C,H,*] fp32."""
    qh, kh, vh, bh, doh = (heads_first(x) for x in (qs, kc, vc, g_cum, do))
    k_dec_h = heads_first(k_dec)
    dA = (doh @ vh.transpose(-1, -2)).float()  # [P,G,H,C,C]
    if bh.shape[-1] == 1:
        Dm = _decay_matrix(bh[..., 0], bh[..., 0])
        A = (qh @ kh.transpose(-1, -2)).float() * Dm
        W = dA * Dm
        dq = W @ kh.float()
        dk = W.transpose(-1, -2) @ qh.float()
    else:
        C = dA.shape[-1]
        causal = torch.ones(C, C, dtype=torch.bool, device=dA.device).tril()
        A, dq, dk = _intra_channel_backward(qh, kh, bh, dA * causal, sub)
    dv = A.transpose(-1, -2) @ doh.float()
    # inter-chunk: o += (q exp(g_cum)) h ; h' gets (k exp(b_L - g_cum))^T v
    dq = dq + bh.exp() * (doh.float() @ h.transpose(-1, -2))
    dk = dk + (bh[..., -1:, :] - bh).exp() * (vh.float() @ dh.transpose(-1, -2))
    dv = dv + k_dec_h.float() @ dh
    return heads_first(dq), heads_first(dk), heads_first(dv)


def _gate_grad(q, k, dq, dk, finals, dht, lay: ChunkLayout, per_channel: bool):
    """dg_t = reverse cumsum over the document of (q dq - k dk), plus sum_V(h_T dh_T)."""
    term = q.float() * dq - k.float() * dk  # [P*T,H,K]
    end = (finals * dht).sum(-1)  # [D,H,K]
    if not per_channel:
        term, end = term.sum(-1), end.sum(-1)
    term = term.view(lay.P, lay.T, *term.shape[1:])
    rc = term.flip(1).cumsum(1).flip(1)  # sum over s >= t, across documents
    if lay.packed:
        offsets = lay.cu_seqlens.long()
        lengths, T = offsets[1:] - offsets[:-1], lay.T
        # subtract what later documents added, then add each document's end term
        after = torch.cat([rc[:, offsets[1:-1]], rc.new_zeros(1, 1, *rc.shape[2:])], dim=1)
        rc = (
            rc
            - after.repeat_interleave(lengths, dim=1, output_size=T)
            + end.unsqueeze(0).repeat_interleave(lengths, dim=1, output_size=T)
        )
    else:
        rc = rc + end.unsqueeze(1)
    return rc.view(lay.P * lay.T, *rc.shape[2:])


def chunk_gated_torch(q, k, v, g, scale, initial_state, output_final_state, lay: ChunkLayout):
    """o [B,T,H,V] (v's dtype), final states [D,H,K,V] fp32 or None; see the module docstring."""
    return run(GatedTorch, lay, scale, initial_state, output_final_state, q, k, v, g)
