"""The Triton pieces both chunkwise engines share (the gated engine in
``engines/gated/chunk_triton.py``, the delta-rule engine in ``engines/delta/chunk_triton.py``).

Legend and conventions: as in ``engines/gated/chunk_triton.py`` (B batch, T_all = B * T or
the packed length, H heads, K/V key and value dims, BT the chunk length, NT chunks over all
documents; tensors indexed in their [T_all, H, *] layout; every load cast to fp32).

- ``GATE`` flag: 0 no decay, 1 one log decay per head and token, 2 one per key channel.
- Index helpers: ``chunk_span`` (a chunk's document and tokens), ``document_span`` (a
  document's tokens and first chunk), ``load_rows`` / ``load_cols`` (a token tile, or its
  transpose, straight from memory), ``gram`` (x_i . y_j over all columns),
  ``store_causal`` (a scaled causal tile into A [T_all, H, BT]).
- Kernels: ``local_cumsum`` (g_cum, the cumsum of g inside each chunk), ``chunk_scores``
  (A = scale q k^T with the decay, causal) and ``chunk_out_kernel`` (a chunk's output,
  o = scale (q exp(g_cum)) h + A v; run in REVERSE it gives dv).
- ``dot_precision``: the tl.dot precision of a call (three TF32 products for fp32 inputs,
  TF32 for 16-bit ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylas.kernels.gpu_limits import launch_options

GATE_NONE, GATE_SCALAR, GATE_CHANNEL = 0, 1, 2
# Sub-chunk of the per-channel diagonal blocks: the elementwise work grows with BC**2 * K,
# and 16 is the smallest tile tl.dot takes for the off-diagonal blocks.
CHANNEL_BC = 16
# Key channels per [BC, BC, BKD] tile of a per-channel diagonal block: 4096 fp32 values,
# 32 registers a thread at 4 warps.
CHANNEL_BKD = 16
_MAX_BLOCK = 64


def block_size(n: int) -> int:
    """Power-of-two block covering n (masked), between 16 (tl.dot's minimum) and 64."""
    return min(_MAX_BLOCK, max(16, triton.next_power_of_2(n)))


# ----------------------------------------------------------------------------------------
# Device


@triton.jit
def chunk_span(cu_seqlens, chunk_indices, i_tg, BT: tl.constexpr):
    """Chunk i_tg -> (document, first token t0 as int64, number of tokens L <= BT)."""
    i_n = tl.load(chunk_indices + 2 * i_tg)
    i_t = tl.load(chunk_indices + 2 * i_tg + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    return i_n, t0, tl.minimum(eos - t0, BT).to(tl.int32)


@triton.jit
def document_span(cu_seqlens, chunk_offsets, i_nh, H, BT: tl.constexpr):
    """Program (document, head) i_nh of a scan -> (head i_h, the document's first token bos
    and end eos as int64, its number of chunks NT, the index of its first chunk boh)."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    return i_h, bos, eos, NT, boh


@triton.jit
def load_rows(x, t0, o_t, m_t, i_h, H, D, o_d, m_d):
    """[BT, BD] fp32 tile of x [T_all, H, D]: tokens t0 + o_t where m_t, head i_h,
    columns o_d where m_d (0 elsewhere)."""
    p = x + (t0 + o_t)[:, None] * (H * D) + i_h * D + o_d[None, :]
    return tl.load(p, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_cols(x, t0, o_t, m_t, i_h, H, D, o_d, m_d):
    """The same tile transposed, [BD, BT], read straight from memory."""
    p = x + (t0 + o_t)[None, :] * (H * D) + i_h * D + o_d[:, None]
    return tl.load(p, mask=m_d[:, None] & m_t[None, :], other=0.0).to(tl.float32)


@triton.jit
def gram(
    x,
    y,
    t0,
    o_i,
    m_i,
    o_j,
    m_j,
    i_h,
    H,
    D,
    BT: tl.constexpr,
    BD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """[BT, BT] fp32: x_i . y_j over all D columns, for tokens t0 + o_i (rows, where m_i)
    and t0 + o_j (columns, where m_j) of x, y [T_all, H, D], BD columns at a time."""
    b = tl.zeros([BT, BT], dtype=tl.float32)
    for i_d in range(tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        b_x = load_rows(x, t0, o_i, m_i, i_h, H, D, o_d, m_d)
        b_yt = load_cols(y, t0, o_j, m_j, i_h, H, D, o_d, m_d)
        b += tl.dot(b_x, b_yt, input_precision=DOT_PREC)
    return b


@triton.jit
def store_causal(A, b_A, scale, t0, o_i, m_i, o_j, i_h, H, BT: tl.constexpr):
    """A [T_all, H, BT] at rows t0 + o_i (where m_i), columns o_j: scale b_A on and below
    the diagonal, 0 above."""
    b_A = tl.where(o_i[:, None] >= o_j[None, :], b_A * scale, 0.0)
    p_A = A + (t0 + o_i)[:, None] * (H * BT) + i_h * BT + o_j[None, :]
    tl.store(p_A, b_A, mask=m_i[:, None])


@triton.jit
def _local_cumsum_kernel(
    g,
    g_cum,
    cu_seqlens,
    chunk_indices,
    H,
    D,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """g, g_cum [T_all, H, D]: g_cum = inclusive cumsum of g inside each chunk, fp32."""
    i_d, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m = (o_t < L)[:, None] & (o_d < D)[None, :]
    p = (t0 + o_t)[:, None] * (H * D) + i_h * D + o_d[None, :]
    x = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
    tl.store(g_cum + p, tl.cumsum(x, 0), mask=m)


@triton.jit
def _fwd_A_kernel(
    q,
    k,
    g_cum,
    A,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    K,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
    GATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """A [T_all, H, BT]: row t, column j = scale q_t . k_j exp(g_t - g_j) for j <= t in
    t's chunk, else 0. One program per BC x BC block (BC = BT unless GATE == 2)."""
    i_tg, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_i, i_j = i_c // NC, i_c % NC
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    if i_i * BC >= L:
        return  # the query sub-chunk holds no token of this chunk

    o_i = i_i * BC + tl.arange(0, BC)
    o_j = i_j * BC + tl.arange(0, BC)
    m_i = o_i < L
    o_ic = tl.minimum(o_i, L - 1)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)

    if GATE == 2:
        if i_i > i_j:
            # Off-diagonal block through r = first row of I: both factors <= 1, one dot.
            # Key sub-chunk J < I is wholly inside the chunk.
            for i_k in range(tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                p_bi = g_cum + (t0 + o_ic)[:, None] * (H * K) + i_h * K + o_k[None, :]
                b_gi = tl.load(p_bi, mask=m_k[None, :], other=0.0)
                b_gr = tl.load(
                    g_cum + (t0 + i_i * BC) * (H * K) + i_h * K + o_k, mask=m_k, other=0.0
                )
                b_q = load_rows(q, t0, o_i, m_i, i_h, H, K, o_k, m_k)
                b_kt = tl.load(
                    k + (t0 + o_j)[None, :] * (H * K) + i_h * K + o_k[:, None],
                    mask=m_k[:, None],
                    other=0.0,
                ).to(tl.float32)
                b_gjt = tl.load(
                    g_cum + (t0 + o_j)[None, :] * (H * K) + i_h * K + o_k[:, None],
                    mask=m_k[:, None],
                    other=0.0,
                )
                b_qg = b_q * tl.exp(b_gi - b_gr[None, :])
                b_kg = b_kt * tl.exp(b_gr[:, None] - b_gjt)
                b_A += tl.dot(b_qg, b_kg, input_precision=DOT_PREC)
        elif i_i == i_j:
            # Diagonal block elementwise over K, BKD channels at a time as a [BC, BC, BKD]
            # tile; exponents above the diagonal are zeroed first and masked out below.
            m_ge = (o_i[:, None] >= o_i[None, :])[:, :, None]
            for i_k in range(tl.cdiv(K, BKD)):
                o_k = i_k * BKD + tl.arange(0, BKD)
                m_k = o_k < K
                p_i = (t0 + o_i)[:, None] * (H * K) + i_h * K + o_k[None, :]
                m_ik = m_i[:, None] & m_k[None, :]
                b_q = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
                b_k = tl.load(k + p_i, mask=m_ik, other=0.0).to(tl.float32)
                b_gi = tl.load(
                    g_cum + (t0 + o_ic)[:, None] * (H * K) + i_h * K + o_k[None, :],
                    mask=m_k[None, :],
                    other=0.0,
                )
                b_e = tl.exp(tl.where(m_ge, b_gi[:, None, :] - b_gi[None, :, :], 0.0))
                b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_e, 2)
    else:
        # One block per chunk (BC == BT): scores are a single dot, the decay a rank-1 mask.
        b_A += gram(q, k, t0, o_i, m_i, o_j, o_j < L, i_h, H, K, BT, BK, DOT_PREC)
        if GATE == 1:
            b_g = tl.load(g_cum + (t0 + o_ic) * H + i_h)
            m_ge = o_i[:, None] >= o_j[None, :]
            b_A *= tl.exp(tl.where(m_ge, b_g[:, None] - b_g[None, :], 0.0))

    store_causal(A, b_A, scale, t0, o_i, m_i, o_j, i_h, H, BT)


@triton.jit
def chunk_out_kernel(
    x,
    y,
    g_cum,
    h,
    A,
    out,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    K,
    V,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    REVERSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """A chunk's state term plus its intra-chunk mix, one [BT, BV] block of out [T_all, H, V]
    per program:

    - forward (REVERSE = 0): o = scale (q exp(g_cum)) h + A v, with x = q, y = v (or the
      delta rule's corrected writes) and h the states entering the chunks;
    - backward (REVERSE = 1): dv = (k exp(g_L - g_cum)) dh + A^T dO, with x = k, y = dO,
      h the gradients of the states leaving the chunks and scale = 1.
    """
    i_v, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    o_tc = tl.minimum(o_t, L - 1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_h = h + (i_tg.to(tl.int64) * H + i_h) * K * V

    b_out = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_x = load_rows(x, t0, o_t, m_t, i_h, H, K, o_k, m_k)
        if GATE == 2:
            b_g = tl.load(
                g_cum + (t0 + o_tc)[:, None] * (H * K) + i_h * K + o_k[None, :],
                mask=m_k[None, :],
                other=0.0,
            )
            if REVERSE:
                b_gl = tl.load(g_cum + (t0 + L - 1) * (H * K) + i_h * K + o_k, mask=m_k, other=0.0)
                b_x *= tl.exp(b_gl[None, :] - b_g)
            else:
                b_x *= tl.exp(b_g)
        b_h = tl.load(
            p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0
        )
        b_out += tl.dot(b_x, b_h, input_precision=DOT_PREC)
    if GATE == 1:
        b_g = tl.load(g_cum + (t0 + o_tc) * H + i_h)
        if REVERSE:
            b_out *= tl.exp(tl.load(g_cum + (t0 + L - 1) * H + i_h) - b_g)[:, None]
        else:
            b_out *= tl.exp(b_g)[:, None]
    b_out *= scale

    if REVERSE:  # A^T [BT, BT] read transposed from memory
        b_A = tl.load(
            A + (t0 + o_t)[None, :] * (H * BT) + i_h * BT + o_t[:, None],
            mask=m_t[None, :],
            other=0.0,
        )
    else:
        b_A = tl.load(
            A + (t0 + o_t)[:, None] * (H * BT) + i_h * BT + o_t[None, :],
            mask=m_t[:, None],
            other=0.0,
        )
    p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_y = tl.load(y + p_v, mask=m_tv, other=0.0).to(tl.float32)
    b_out += tl.dot(b_A, b_y, input_precision=DOT_PREC)
    tl.store(out + p_v, b_out.to(out.dtype.element_ty), mask=m_tv)


# ----------------------------------------------------------------------------------------
# Host side


def local_cumsum(g, gate, lay):
    """g [T_all, H] or [T_all, H, K] -> g_cum, the fp32 cumsum inside each chunk."""
    H_, D = (1, g.shape[1]) if gate == GATE_SCALAR else (g.shape[1], g.shape[2])
    g_cum = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    BD = block_size(D)
    grid = (triton.cdiv(D, BD), lay.NT, H_)
    _local_cumsum_kernel[grid](
        g, g_cum, lay.cu_seqlens, lay.chunk_indices, H=H_, D=D, BT=lay.C, BD=BD, **launch_options()
    )
    return g_cum


def chunk_scores(q, k, g_cum, gate, scale, lay, prec):
    """-> A [T_all, H, BT] fp32."""
    T_all, H, K = q.shape
    BT = lay.C
    BC = min(CHANNEL_BC, BT) if gate == GATE_CHANNEL else BT
    NC = BT // BC
    A = q.new_empty(T_all, H, BT, dtype=torch.float32)
    _fwd_A_kernel[(lay.NT, NC * NC, H)](
        q, k, g_cum, A, lay.cu_seqlens, lay.chunk_indices, scale,
        H=H, K=K, BT=BT, BC=BC, BK=block_size(K), BKD=CHANNEL_BKD, GATE=gate, DOT_PREC=prec, **launch_options(),
    )  # fmt: skip
    return A


def dot_precision(*xs) -> str:
    # fp32 callers expect fp32-level results (three TF32 products); 16-bit inputs lose
    # nothing to TF32's 10-bit mantissa. The interpreter computes every dot in fp32.
    return "tf32x3" if all(x.dtype == torch.float32 for x in xs) else "tf32"
