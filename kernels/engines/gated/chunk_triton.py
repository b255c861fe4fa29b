"""Chunkwise gated linear attention in Triton: forward and a recomputing backward.

Legend: B batch, T tokens (per sample; T_all = B * T, or the packed length), H heads,
K key dim, V value dim, N documents (N = B for a fixed-length batch), BT = C the chunk
length, NT the number of chunks over all documents, BC the sub-chunk length of the
per-channel intra-chunk blocks, NC = BT // BC, BK / BV the key / value blocks one program
owns (powers of two, at least 16 so that every tl.dot has all dims >= 16).

Recurrence per head, with row vectors q_t, k_t in R^K, v_t in R^V and log decay g_t <= 0::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

g is one of: None (no decay, ``linear_attn``), [B, T, H] (one decay per head and token,
``simple_gla``) or [B, T, H, K] (one per key channel, ``gla``). One set of kernels serves
all three through the constexpr ``GATE`` = 0, 1, 2.

Chunkwise, with g_cum the inclusive cumulative log decay inside a chunk (fp32, <= 0 and
non-increasing along the chunk), h the state entering the chunk and g_L = g_cum at its last
token::

    o_i = scale * ( sum_{j <= i} (q_i . k_j exp(g_i - g_j)) v_j  +  (q_i exp(g_i)) h )
    h'  = Diag(exp(g_L)) h + sum_j (k_j exp(g_L - g_j))^T v_j

Every exponent is kept <= 0, so nothing overflows at any decay: exp(g_i) and
exp(g_L - g_j) are so by construction, and exp(g_i - g_j) is only formed for i >= j (the
exponent is zeroed before exp elsewhere). For per-channel gates the intra-chunk scores
are not a plain matmul; they are split GLA-style into BC x BC blocks: an off-diagonal
block (query sub-chunk I after key sub-chunk J) factors through a reference row r of I,
exp(g_i - g_j) = exp(g_i - g_r) exp(g_r - g_j) with both factors <= 1, so it is a tl.dot;
diagonal blocks are formed elementwise, as [BC, BC, 16] tiles over K. Rows past the end of a partial last chunk
read g_cum of the chunk's last token (the pointer is clamped), so g_cum stays non-increasing over
the whole padded chunk and the same bounds hold there.

Layout: every fixed-length batch is run as B packed documents of length T, so one code
path (``cu_seqlens``, chunks aligned to document starts, a partial last chunk per
document) serves both. Tensors are indexed in their [T_all, H, *] layout directly.

Kernels (grids in brackets):
    local_cumsum    [D/BD, NT, H]   g_cum = cumsum of g inside each chunk
    _state_scan      [K/BK, V/BV, N*H] states entering every chunk (+ final): a scan
    _fwd_A           [NT, NC*NC, H]  intra-chunk scores A [T_all, H, BT], scale included
    chunk_out        [V/BV, NT, H]   o = scale (q exp(g_cum)) h + A v
    _state_scan      [K/BK, V/BV, N*H] gradient of the state leaving every chunk (+ dh0),
                                    the same scan run backward (REVERSE)
    _bwd_dA          [NT, H]         dA = scale dO v^T, causal
    chunk_out        [V/BV, NT, H]   dv = A^T dO + (k exp(g_L - g_cum)) dh (REVERSE)
    _bwd_dqk_intra   [K/BK, NT*NC, H] intra-chunk parts of dq, dk (BK = 16 for per-channel)
    _bwd_dqk         [K/BK, NT, H]   inter-chunk parts, totals, and q dq - k dk for the gate
    _rev_cumsum      [D/BD, N*H]     per-document reverse cumsum: the gate gradient

The backward recomputes g_cum, the chunk states and A from the inputs instead of keeping them
from the forward: the [NT, H, K, V] states are the largest activation of the layer.

Gate gradient: with G_t the cumulative log decay from the document start, o and the final
state depend on G only through q_t exp(G_t), k_t exp(-G_t) and exp(G_last), so
dL/dG_t = q_t dq_t - k_t dk_t (+ sum_v ht dht at the last token), and dg is the reverse
cumsum of that over the document.

Precision: every load is cast to fp32 (bf16 arithmetic is unreliable in the interpreter,
and decays need fp32 anyway). tl.dot runs in TF32 for 16-bit inputs, whose own precision
is below TF32's, and as three TF32 products ("tf32x3": each fp32 operand split into a TF32
high part and a TF32 remainder) for fp32 inputs: close to fp32 accuracy, on tensor cores.
Plain IEEE fp32 dots run on CUDA cores; they were 4x slower to compile, and spill heavily
at these tiles.

Launches: ``gpu_limits.launch_options`` gives every launch its pipelining depth and warps
from the device's shared memory per block (docs/architecture.md, "Kernels on real GPUs");
the GPU compile gate (tests/gpu_compile_gate.py) checks every kernel against sm_80, sm_89
and sm_90. H, K, V and D are runtime values: they only index and mask, so heads of 96 and
of 128 run the same compiled kernel.

The pieces the delta-rule engine shares with this one (flags, index helpers, the chunk
scores and output kernels) live in ``engines/triton_blocks.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylas.kernels.common import CHUNK
from hylas.kernels.engines.autograd import run
from hylas.kernels.engines.triton_blocks import (
    CHANNEL_BC,
    CHANNEL_BKD,
    GATE_CHANNEL,
    GATE_NONE,
    GATE_SCALAR,
    block_size,
    chunk_out_kernel,
    chunk_scores,
    chunk_span,
    document_span,
    dot_precision,
    gram,
    load_cols,
    load_rows,
    local_cumsum,
    store_causal,
)
from hylas.kernels.gpu_limits import launch_options
from hylas.kernels.layout import ChunkLayout, Documents, chunk_layout

# ----------------------------------------------------------------------------------------
# Helpers


@triton.jit
def _rev_cumsum_kernel(
    x,
    y,
    init,
    cu_seqlens,
    chunk_offsets,
    H,
    D,
    BT: tl.constexpr,
    BD: tl.constexpr,
    USE_INIT: tl.constexpr,
):
    """x, y [T_all, H, D], init [N, H, D]: y_t = init + sum_{s >= t in the document} x_s."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, NT, _ = document_span(cu_seqlens, chunk_offsets, i_nh, H, BT)
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_carry = tl.zeros([BD], dtype=tl.float32)
    if USE_INIT:
        b_carry += tl.load(init + i_nh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    # Last chunk first: the carry is the sum over every later chunk of the document.
    for it in range(NT):
        t0 = bos + (NT - 1 - it) * BT
        m = (o_t < eos - t0)[:, None] & m_d[None, :]
        p = (t0 + o_t)[:, None] * (H * D) + i_h * D + o_d[None, :]
        b_x = tl.load(x + p, mask=m, other=0.0)
        tl.store(y + p, tl.cumsum(b_x, 0, reverse=True) + b_carry[None, :], mask=m)
        b_carry += tl.sum(b_x, 0)


# ----------------------------------------------------------------------------------------
# Forward


@triton.jit
def _state_scan_kernel(
    x,
    y,
    g_cum,
    s,
    s_in,
    s_out,
    cu_seqlens,
    chunk_offsets,
    scale,
    H,
    K,
    V,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    REVERSE: tl.constexpr,
    USE_IN: tl.constexpr,
    STORE_OUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """A scan over one document's chunks, s = Diag(exp(g_L)) s + scale X^T Y, storing s
    [NT, H, K, V] at every chunk before its update:

    - forward (REVERSE = 0): the states entering every chunk, X = k exp(g_L - g_cum), Y = v,
      from h0 (``s_in``) to the final state (``s_out``), scale = 1;
    - backward (REVERSE = 1), last chunk first: the gradients of the states leaving every
      chunk, X = q exp(g_cum), Y = dO, from dht to dh0.

    The state block stays in registers (K and V split across programs: every update acts
    on rows and columns independently)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, eos, NT, boh = document_span(cu_seqlens, chunk_offsets, i_nh, H, BT)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_IN:
        b_s += tl.load(s_in + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)

    for it in range(NT):
        i_t = NT - 1 - it if REVERSE else it
        t0 = bos + i_t * BT
        L = tl.minimum(eos - t0, BT)
        tl.store(s + ((boh + i_t) * H + i_h) * K * V + p_kv, b_s, mask=m_kv)
        m_t = o_t < L
        o_tc = tl.minimum(o_t, L - 1)  # padded rows read the last token's decay
        # X^T [BK, BT] straight from memory.
        b_xt = load_cols(x, t0, o_t, m_t, i_h, H, K, o_k, m_k)
        b_y = load_rows(y, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        if GATE == 1:
            b_gl = tl.load(g_cum + (t0 + L - 1) * H + i_h)
            b_g = tl.load(g_cum + (t0 + o_tc) * H + i_h)
            b_s *= tl.exp(b_gl)
            if REVERSE:
                b_xt *= tl.exp(b_g)[None, :]
            else:  # the scalar decay is per token: fold it into v (BT x BV) rather than k
                b_y *= tl.exp(b_gl - b_g)[:, None]
        if GATE == 2:
            b_gl = tl.load(g_cum + (t0 + L - 1) * (H * K) + i_h * K + o_k, mask=m_k, other=0.0)
            b_gt = tl.load(
                g_cum + (t0 + o_tc)[None, :] * (H * K) + i_h * K + o_k[:, None],
                mask=m_k[:, None],
                other=0.0,
            )
            b_s *= tl.exp(b_gl)[:, None]
            if REVERSE:
                b_xt *= tl.exp(b_gt)
            else:
                b_xt *= tl.exp(b_gl[:, None] - b_gt)
        b_s += tl.dot(b_xt, b_y, input_precision=DOT_PREC) * scale

    if STORE_OUT:
        tl.store(s_out + i_nh.to(tl.int64) * K * V + p_kv, b_s, mask=m_kv)


# ----------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_dA_kernel(
    do,
    v,
    dA,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    V,
    BT: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dA [T_all, H, BT] = scale dO_i . v_j for j <= i in the chunk, else 0."""
    i_tg, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    b_dA = gram(do, v, t0, o_t, m_t, o_t, m_t, i_h, H, V, BT, BV, DOT_PREC)
    store_causal(dA, b_dA, scale, t0, o_t, m_t, o_t, i_h, H, BT)


@triton.jit
def _bwd_dqk_intra_kernel(
    q,
    k,
    g_cum,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_indices,
    H,
    K,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Intra-chunk parts, fp32 [T_all, H, K], for the rows of one BC sub-chunk I:
    dq_i = sum_{j <= i} dA_ij k_j exp(g_i - g_j), dk_j = sum_{i >= j} dA_ij q_i exp(g_i - g_j).
    """
    i_k, i_tc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_tg, i_i = i_tc // NC, i_tc % NC
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    if i_i * BC >= L:
        return

    o_i = i_i * BC + tl.arange(0, BC)
    m_i = o_i < L
    o_ic = tl.minimum(o_i, L - 1)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_i = (t0 + o_i)[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_ik = m_i[:, None] & m_k[None, :]
    b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)

    if GATE == 2:
        b_gi = tl.load(
            g_cum + (t0 + o_ic)[:, None] * (H * K) + i_h * K + o_k[None, :],
            mask=m_k[None, :],
            other=0.0,
        )
        b_dq = tl.zeros([BC, BK], dtype=tl.float32)
        b_dk = tl.zeros([BC, BK], dtype=tl.float32)

        # dq from earlier sub-chunks J < I (all inside the chunk), through r = first row of I.
        b_gr = tl.load(g_cum + (t0 + i_i * BC) * (H * K) + i_h * K + o_k, mask=m_k, other=0.0)
        for i_j in range(0, i_i):
            o_j = i_j * BC + tl.arange(0, BC)
            p_j = (t0 + o_j)[:, None] * (H * K) + i_h * K + o_k[None, :]
            b_kj = tl.load(k + p_j, mask=m_k[None, :], other=0.0).to(tl.float32)
            b_gj = tl.load(g_cum + p_j, mask=m_k[None, :], other=0.0)
            b_dA = tl.load(
                dA + (t0 + o_i)[:, None] * (H * BT) + i_h * BT + o_j[None, :],
                mask=m_i[:, None],
                other=0.0,
            )
            b_dq += tl.dot(b_dA, b_kj * tl.exp(b_gr[None, :] - b_gj), input_precision=DOT_PREC)
        b_dq *= tl.exp(b_gi - b_gr[None, :])

        # dk from later sub-chunks J > I, through r = last row of I. There are later ones only
        # when I is full, so that row is inside the chunk; padded rows of J read g_L <= g_r.
        b_gr = tl.load(
            g_cum + (t0 + tl.minimum(i_i * BC + BC - 1, L - 1)) * (H * K) + i_h * K + o_k,
            mask=m_k,
            other=0.0,
        )
        for i_j in range(i_i + 1, tl.cdiv(L, BC)):
            o_j = i_j * BC + tl.arange(0, BC)
            m_j = o_j < L
            o_jc = tl.minimum(o_j, L - 1)
            b_qj = load_rows(q, t0, o_j, m_j, i_h, H, K, o_k, m_k)
            b_gj = tl.load(
                g_cum + (t0 + o_jc)[:, None] * (H * K) + i_h * K + o_k[None, :],
                mask=m_k[None, :],
                other=0.0,
            )
            # dA^T block [I (keys), J (queries)] read transposed from memory.
            b_dAt = tl.load(
                dA + (t0 + o_j)[None, :] * (H * BT) + i_h * BT + o_i[:, None],
                mask=m_j[None, :],
                other=0.0,
            )
            b_dk += tl.dot(b_dAt, b_qj * tl.exp(b_gj - b_gr[None, :]), input_precision=DOT_PREC)
        b_dk *= tl.exp(b_gr[None, :] - b_gi)

        # Diagonal block elementwise as a [BC (i), BC (j), BK] tile (BK is small here); one
        # exponent tile serves dq and dk. dA is already zero above the diagonal.
        m_ge = (o_i[:, None] >= o_i[None, :])[:, :, None]
        b_e = tl.exp(tl.where(m_ge, b_gi[:, None, :] - b_gi[None, :, :], 0.0))
        b_dA = tl.load(
            dA + (t0 + o_i)[:, None] * (H * BT) + i_h * BT + o_i[None, :],
            mask=m_i[:, None],
            other=0.0,
        )
        b_dAe = b_dA[:, :, None] * b_e
        b_dq += tl.sum(b_dAe * b_k[None, :, :], 1)
        b_dk += tl.sum(b_dAe * b_q[:, None, :], 0)
    else:
        # BC == BT: one dot each with the decay as a rank-1 mask; dA is already causal.
        b_dA = tl.load(
            dA + (t0 + o_i)[:, None] * (H * BT) + i_h * BT + o_i[None, :],
            mask=m_i[:, None],
            other=0.0,
        )
        if GATE == 1:
            b_g = tl.load(g_cum + (t0 + o_ic) * H + i_h)
            m_ge = o_i[:, None] >= o_i[None, :]
            b_dA *= tl.exp(tl.where(m_ge, b_g[:, None] - b_g[None, :], 0.0))
        b_dq = tl.dot(b_dA, b_k, input_precision=DOT_PREC)
        b_dk = tl.dot(tl.trans(b_dA), b_q, input_precision=DOT_PREC)

    tl.store(dq + p_i, b_dq, mask=m_ik)
    tl.store(dk + p_i, b_dk, mask=m_ik)


@triton.jit
def _bwd_dqk_kernel(
    q,
    k,
    v,
    g_cum,
    h,
    do,
    dh,
    dq_intra,
    dk_intra,
    dq,
    dk,
    dg,
    cu_seqlens,
    chunk_indices,
    scale,
    T_all,
    H,
    K,
    V,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dq = scale exp(g_cum) (dO h^T) + intra, dk = exp(g_L - g_cum) (v dh^T) + intra, and the
    gate's local term q dq - k dk: dg [T_all, H, K] (GATE 2) or its sum over this K block,
    dg [K / BK, T_all, H] (GATE 1)."""
    i_k, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    o_tc = tl.minimum(o_t, L - 1)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_hh = (i_tg.to(tl.int64) * H + i_h) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        # h^T, dh^T [BV, BK] read transposed from the [K, V] states.
        p_t = p_hh + o_k[None, :] * V + o_v[:, None]
        m_t_kv = m_v[:, None] & m_k[None, :]
        b_ht = tl.load(h + p_t, mask=m_t_kv, other=0.0)
        b_dht = tl.load(dh + p_t, mask=m_t_kv, other=0.0)
        b_dq += tl.dot(b_do, b_ht, input_precision=DOT_PREC)
        b_dk += tl.dot(b_v, b_dht, input_precision=DOT_PREC)

    if GATE == 0:
        b_dq *= scale
    if GATE == 1:
        b_g = tl.load(g_cum + (t0 + o_tc) * H + i_h)
        b_gl = tl.load(g_cum + (t0 + L - 1) * H + i_h)
        b_dq *= (scale * tl.exp(b_g))[:, None]
        b_dk *= tl.exp(b_gl - b_g)[:, None]
    if GATE == 2:
        b_g = tl.load(
            g_cum + (t0 + o_tc)[:, None] * (H * K) + i_h * K + o_k[None, :],
            mask=m_k[None, :],
            other=0.0,
        )
        b_gl = tl.load(g_cum + (t0 + L - 1) * (H * K) + i_h * K + o_k, mask=m_k, other=0.0)
        b_dq *= scale * tl.exp(b_g)
        b_dk *= tl.exp(b_gl[None, :] - b_g)

    p_k = (t0 + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_dq += tl.load(dq_intra + p_k, mask=m_tk, other=0.0)
    b_dk += tl.load(dk_intra + p_k, mask=m_tk, other=0.0)
    if GATE > 0:
        b_q = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_dg = b_q * b_dq - b_k * b_dk
        if GATE == 1:
            p_g = (i_k * T_all + t0 + o_t) * H + i_h
            tl.store(dg + p_g, tl.sum(b_dg, 1), mask=m_t)
        else:
            tl.store(dg + p_k, b_dg, mask=m_tk)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


# ----------------------------------------------------------------------------------------
# Host side


def _gate_kind(g, q) -> int:
    if g is None:
        return GATE_NONE
    if tuple(g.shape) == tuple(q.shape[:3]):
        return GATE_SCALAR
    if tuple(g.shape) == tuple(q.shape):
        return GATE_CHANNEL
    raise ValueError(
        f"g must be None, [B, T, H] = {list(q.shape[:3])} or [B, T, H, K] = {list(q.shape)} "
        f"(log decay), got {list(g.shape)}"
    )


def _states(k, v, g_cum, gate, h0, store_ht, lay, prec):
    """-> h [NT, H, K, V] entering states, ht [N, H, K, V] or None."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = block_size(K), block_size(V)
    h = k.new_empty(lay.NT, H, K, V, dtype=torch.float32)
    ht = k.new_empty(lay.docs, H, K, V, dtype=torch.float32) if store_ht else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), lay.docs * H)
    _state_scan_kernel[grid](
        k, v, g_cum, h, h0, ht, lay.cu_seqlens, lay.chunk_offsets, 1.0,
        H=H, K=K, V=V, BT=lay.C, BK=BK, BV=BV, GATE=gate, REVERSE=False,
        USE_IN=h0 is not None, STORE_OUT=store_ht, DOT_PREC=prec, **launch_options(),
    )  # fmt: skip
    return h, ht


class GatedTriton:
    """The gated engine's Triton kernels, in the engines' autograd pattern
    (``hylas.kernels.engines.autograd``): [T_all, H, *] tensors, B folded into documents."""

    @staticmethod
    def forward(ctx, lay: ChunkLayout, scale, output_final_state, h0, q, k, v, g):
        gate = GATE_NONE if g is None else (GATE_SCALAR if g.dim() == 2 else GATE_CHANNEL)
        prec = dot_precision(q, k, v)
        _, H, K = q.shape
        V = v.shape[-1]
        BV = block_size(V)

        g_cum = None if g is None else local_cumsum(g, gate, lay)
        h, ht = _states(k, v, g_cum, gate, h0, output_final_state, lay, prec)
        A = chunk_scores(q, k, g_cum, gate, scale, lay, prec)
        o = torch.empty_like(v)
        chunk_out_kernel[(triton.cdiv(V, BV), lay.NT, H)](
            q, v, g_cum, h, A, o, lay.cu_seqlens, lay.chunk_indices, scale,
            H=H, K=K, V=V, BT=lay.C, BK=block_size(K), BV=BV, GATE=gate, REVERSE=False,
            DOT_PREC=prec, **launch_options(),
        )  # fmt: skip

        # Only the inputs are kept: g_cum, the states and A are recomputed in the backward.
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.gate, ctx.scale, ctx.lay, ctx.prec = gate, scale, lay, prec
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        gate, scale, lay, prec = ctx.gate, ctx.scale, ctx.lay, ctx.prec
        T_all, H, K = q.shape
        V = v.shape[-1]
        BT, BK, BV = lay.C, block_size(K), block_size(V)
        NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)

        # Recompute what the forward dropped. The final state is needed only for the
        # gate gradient's sum_v ht dht term.
        g_cum = None if g is None else local_cumsum(g, gate, lay)
        need_ht = gate != GATE_NONE and dht is not None
        h, ht = _states(k, v, g_cum, gate, h0, need_ht, lay, prec)
        A = chunk_scores(q, k, g_cum, gate, scale, lay, prec)

        dh = q.new_empty(lay.NT, H, K, V, dtype=torch.float32)
        dh0 = None if h0 is None else torch.empty_like(h0)
        _state_scan_kernel[(NK, NV, lay.docs * H)](
            q, do, g_cum, dh, dht, dh0, lay.cu_seqlens, lay.chunk_offsets, scale,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate, REVERSE=True,
            USE_IN=dht is not None, STORE_OUT=h0 is not None, DOT_PREC=prec, **launch_options(),
        )  # fmt: skip
        dA = q.new_empty(T_all, H, BT, dtype=torch.float32)
        _bwd_dA_kernel[(lay.NT, H)](
            do, v, dA, lay.cu_seqlens, lay.chunk_indices, scale,
            H=H, V=V, BT=BT, BV=BV, DOT_PREC=prec, **launch_options(),
        )  # fmt: skip
        dv = torch.empty_like(v)
        chunk_out_kernel[(NV, lay.NT, H)](
            k, do, g_cum, dh, A, dv, lay.cu_seqlens, lay.chunk_indices, 1.0,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate, REVERSE=True, DOT_PREC=prec,
            **launch_options(),
        )  # fmt: skip
        del A

        # Per-channel gates: narrow K blocks keep the [BC, BC, BK] diagonal tile small.
        BC, BKI = (min(CHANNEL_BC, BT), CHANNEL_BKD) if gate == GATE_CHANNEL else (BT, BK)
        dq_intra = q.new_empty(T_all, H, K, dtype=torch.float32)
        dk_intra = torch.empty_like(dq_intra)
        _bwd_dqk_intra_kernel[(triton.cdiv(K, BKI), lay.NT * (BT // BC), H)](
            q, k, g_cum, dA, dq_intra, dk_intra, lay.cu_seqlens, lay.chunk_indices,
            H=H, K=K, BT=BT, BC=BC, BK=BKI, GATE=gate, DOT_PREC=prec, **launch_options(),
        )  # fmt: skip
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        if gate == GATE_SCALAR:
            dg_local = q.new_empty(NK, T_all, H, dtype=torch.float32)
        elif gate == GATE_CHANNEL:
            dg_local = q.new_empty(T_all, H, K, dtype=torch.float32)
        else:
            dg_local = None
        _bwd_dqk_kernel[(NK, lay.NT, H)](
            q, k, v, g_cum, h, do, dh, dq_intra, dk_intra, dq, dk, dg_local,
            lay.cu_seqlens, lay.chunk_indices, scale, T_all,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=gate, DOT_PREC=prec, **launch_options(),
        )  # fmt: skip

        dg = None
        if gate != GATE_NONE:
            # The final state's own term sum_v ht dht seeds the reverse cumsum.
            init = None if ht is None else (ht * dht).sum(-1)  # [N, H, K]
            if gate == GATE_SCALAR:
                x = dg_local.sum(0)  # [T_all, H]
                init = None if init is None else init.sum(-1).contiguous()
                H_, D = 1, H
            else:
                x, H_, D = dg_local, H, K
            dg = torch.empty_like(x)
            BD = block_size(D)
            _rev_cumsum_kernel[(triton.cdiv(D, BD), lay.docs * H_)](
                x, dg, init, lay.cu_seqlens, lay.chunk_offsets,
                H=H_, D=D, BT=BT, BD=BD, USE_INIT=init is not None, **launch_options(),
            )  # fmt: skip
        return dh0, dq, dk, dv, dg


def chunk_gated_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | Documents | None = None,
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise gated linear attention with Triton forward and backward kernels. The
    family call (``hylas.kernels.engines.gated``) has checked the shapes; this launches.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (K != V allowed, neither need be a power of two).
            Any float dtype; all arithmetic is fp32.
        g: log decay (<= 0, fp32): None (no decay), [B, T, H] (per head and token) or
            [B, T, H, K] (per key channel).
        scale: multiplies q (commonly K ** -0.5).
        initial_state: [N, H, K, V] fp32 or None (zeros); N = B, or the number of
            documents with ``cu_seqlens``.
        output_final_state: also return the state after each document's last token.
        cu_seqlens: int32 [N + 1] offsets of packed documents (B must be 1), or the
            ``Documents`` read from them once per batch. The state restarts from
            ``initial_state[n]`` at each document start; chunks never straddle documents.
        chunk_size: BT, a power of two >= 16.

    Returns:
        o [B, T, H, V] in v's dtype and ht [N, H, K, V] fp32 (or None). Differentiable in
        q, k, v, g and initial_state; the backward recomputes the chunk states.
    """
    B, T = q.shape[:2]
    _gate_kind(g, q)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    lay = chunk_layout(B, T, Documents.of(cu_seqlens, B, T), q.device, chunk_size)
    return run(GatedTriton, lay, scale, initial_state, output_final_state, q, k, v, g)
