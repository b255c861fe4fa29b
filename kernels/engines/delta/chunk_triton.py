"""Chunkwise delta rule in Triton (DeltaNet, Gated DeltaNet): forward and a recomputing backward.

Legend: B batch, T tokens (per sample; T_all = B * T, or the packed length), H heads,
K key dim, V value dim, N documents (N = B for a fixed-length batch), BT = 64 the chunk
length, NT the number of chunks over all documents, BC = 16 the diagonal blocks of the
triangular solve, BK / BV the key / value blocks one program owns (powers of two, at
least 16 so that every tl.dot has all dims >= 16). The state scans hold all of K (w h
contracts over it) as NKB = ceil(K / 64) <= 4 register blocks of [64, BV], with BV = 32
when NKB > 2: every tile they load is [BT, 64] or [BT, BV], so their shared memory does
not grow with K, and K up to 256 fits every supported GPU (gpu_limits).

Recurrence per head, with row vectors q_t, k_t in R^K, v_t in R^V, a write strength
beta_t (in [0, 1], or [0, 2] for negative eigenvalues) and a log decay g_t <= 0 (g = 0
for DeltaNet)::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t

Chunkwise, this is the UT transform stated once, with every gradient derived, in the
docstring of ``chunk_delta_torch`` (the torch path, the readable statement of these
kernels): g_cum the inclusive cumulative log decay inside a chunk, Gam[i, j] =
exp(g_cum_i - g_cum_j) for j <= i, Akk the chunk's strictly lower [BT, BT] matrix,
Ai = (I + Akk)^{-1}, u = Ai (beta v), w = Ai (beta k exp(g_cum)), delta = u - w h,
o = scale (q exp(g_cum)) h + (scale q k^T * Gam) delta. The kernels below compute those
formulas; each kernel's docstring names the ones it covers.

Ai is formed in fp32: forward substitution inverts each BC x BC diagonal block, and the
blocks below the diagonal follow with tl.dot (Ai_ij = -Ai_ii sum_{j <= m < i} Akk_im Ai_mj).
The gate gradient dg_cum (Po, Pa, the Xw term and the last token's terms in
``chunk_delta_torch``) is q . dq - k . dk_o per token (dk_o the first line of dk) plus the
Pa and Xw terms and the last token's sum(h' * dh'), h' the state leaving the chunk; dg is
its reverse cumsum inside the chunk.

Every exponent is kept <= 0, so nothing overflows at any decay: exp(g_cum),
exp(g_cum_L - g_cum) and exp(g_cum_L) are so by construction, and exp(g_cum_i - g_cum_j)
is only formed for i >= j (the exponent is zeroed before exp elsewhere). Rows past the
end of a partial last chunk read g_cum of the chunk's last token (the pointer is
clamped) and load k = q = v = beta = 0, so Akk is the identity there, u = w = delta = 0,
and nothing padded reaches a result.

Layout: every fixed-length batch is run as B packed documents of length T, so one code
path (``cu_seqlens``, chunks aligned to document starts, a partial last chunk per
document) serves both. Tensors are indexed in their [T_all, H, *] layout directly; the
intermediates are fp32.

Kernels (grids in brackets):
    local_cumsum   [H/BD, NT, 1]      g_cum = cumsum of g inside each chunk (chunk_triton)
    _fwd_kkt        [NT, H]            Akk [T_all, H, BT]
    _solve_tril     [NT, H]            Ai = (I + Akk)^{-1} [T_all, H, BT] (lower triangle)
    _fwd_wu         [NT, H]            w [T_all, H, K], u [T_all, H, V]
    _delta_fwd_h    [V/BV, N*H]        states entering every chunk (+ final) and delta: a scan
    _fwd_A          [NT, 1, H]         scale q k^T * Gam, causal (chunk_triton)
    chunk_out       [V/BV, NT, H]      o = scale (q exp(g_cum)) h + A delta (chunk_triton)
    _delta_bwd_dh   [V/BV, N*H]        reverse scan: dh' of every chunk (+ dh0) and ddelta
    _bwd_dqkwg      [K/BK, NT, H]      dq, the first line of dk, dw = -ddelta h^T, and the
                                       g_cum terms of dq and dk per K block
    _bwd_wy         [NT, H]            dk, dv, dbeta; dg_cum completed and reverse-cumsummed

The backward recomputes g_cum, the UT transform, the chunk states and delta from the
inputs instead of keeping them from the forward: the [NT, H, K, V] states are the
largest activation of the layer.

Precision: every load is cast to fp32 (bf16 arithmetic is unreliable in the interpreter,
and decays need fp32 anyway). The triangular inverse always runs in IEEE fp32; the other
tl.dot run as three TF32 products for fp32 inputs and in TF32 for 16-bit inputs (see
chunk_triton). Keys are expected
L2-normalised (||k_t|| = 1) with beta in [0, 2]: then every transition has norm <= 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylas.kernels.engines.autograd import run
from hylas.kernels.engines.triton_blocks import (
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
)
from hylas.kernels.gpu_limits import launch_options
from hylas.kernels.layout import ChunkLayout, Documents, chunk_layout

# Diagonal blocks of the triangular solve: the forward substitution runs row by row over
# these, and 16 is the smallest tile tl.dot takes to combine them.
_BC = 16


# ----------------------------------------------------------------------------------------
# Forward: the UT transform


@triton.jit
def _fwd_kkt_kernel(
    k,
    beta,
    g_cum,
    A,
    cu_seqlens,
    chunk_indices,
    H,
    K,
    BT: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    DOT_PREC: tl.constexpr,
):
    """A [T_all, H, BT]: row t, column j = beta_t (k_t . k_j) exp(g_cum_t - g_cum_j) for
    j < t in t's chunk, else 0 (every column of a chunk's rows is written)."""
    i_tg, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L

    b_A = gram(k, k, t0, o_t, m_t, o_t, m_t, i_h, H, K, BT, BK, DOT_PREC)

    m_lt = o_t[:, None] > o_t[None, :]
    b_beta = tl.load(beta + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_A *= b_beta[:, None]
    if GATE == 1:
        b_g = tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h)
        b_A *= tl.exp(tl.where(m_lt, b_g[:, None] - b_g[None, :], 0.0))
    b_A = tl.where(m_lt, b_A, 0.0)
    tl.store(A + (t0 + o_t)[:, None] * (H * BT) + i_h * BT + o_t[None, :], b_A, mask=m_t[:, None])


@triton.jit
def _dot_ieee(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _inv_diag_blocks(A, t0, i_h, L, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """(I + A_bb)^{-1} of the BT / BC strictly lower BC x BC diagonal blocks of a chunk's
    A, all at once as one [BT / BC, BC, BC] tile, by forward substitution: with X = the
    inverse - I, row i of X is -a_i - a_i X (a_i row i of A_bb, zero from column i on);
    rows 0 and 1 are just -a_i. Rows past the chunk's end load 0: those of I."""
    NB: tl.constexpr = BT // BC
    o_b = tl.arange(0, NB)
    o_c = tl.arange(0, BC)
    # p_b [NB, BC]: the first row of diagonal block b (token t0 + b BC), columns b BC + c.
    p_b = A + (t0 + o_b * BC)[:, None] * (H * BT) + i_h * BT + (o_b * BC)[:, None] + o_c[None, :]
    o_r = o_b[:, None, None] * BC + o_c[None, :, None]
    b_X = -tl.load(
        p_b[:, None, :] + o_c[None, :, None] * (H * BT), mask=o_r < L, other=0.0
    )  # [NB, BC (rows), BC (columns)]
    for i in range(2, tl.minimum(BC, L)):
        b_a = -tl.load(p_b + i * (H * BT), mask=(o_b * BC + i < L)[:, None], other=0.0)
        b_a += tl.sum(b_a[:, :, None] * b_X, 1)
        b_X = tl.where((o_c == i)[None, :, None], b_a[:, None, :], b_X)
    return b_X + tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)[None, :, :]


@triton.jit
def _block_of(x, i_b, NB: tl.constexpr):
    """Block i_b of an [NB, BC, BC] tile, as [BC, BC]."""
    return tl.sum(tl.where((tl.arange(0, NB) == i_b)[:, None, None], x, 0.0), 0)


@triton.jit
def _solve_tril_kernel(
    A,
    Ai,
    cu_seqlens,
    chunk_indices,
    H,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """Ai [T_all, H, BT] = (I + A)^{-1} of every chunk, lower triangle only (the blocks
    above the diagonal are not written). BT = 4 BC: the four diagonal blocks D_i are
    inverted by forward substitution, then Ai_ij = -D_i sum_{j <= m < i} A_im Ai_mj, one
    sub-diagonal at a time (each block needs those of the rows above it)."""
    tl.static_assert(BT == 4 * BC)
    i_tg, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_c = tl.arange(0, BC)
    # Block (i, j) of the chunk: p_00 + i BC rows + j BC columns, rows masked to the chunk.
    p_A = A + (t0 + o_c)[:, None] * (H * BT) + i_h * BT + o_c[None, :]
    p_Ai = Ai + (t0 + o_c)[:, None] * (H * BT) + i_h * BT + o_c[None, :]
    R = BC * H * BT  # BC rows down
    m_1 = (BC + o_c < L)[:, None]
    m_2 = (2 * BC + o_c < L)[:, None]
    m_3 = (3 * BC + o_c < L)[:, None]

    b_D = _inv_diag_blocks(A, t0, i_h, L, H, BT, BC)
    b_D0 = _block_of(b_D, 0, 4)
    b_D1 = _block_of(b_D, 1, 4)
    b_D2 = _block_of(b_D, 2, 4)
    b_D3 = _block_of(b_D, 3, 4)
    b_A10 = tl.load(p_A + R, mask=m_1, other=0.0)
    b_A20 = tl.load(p_A + 2 * R, mask=m_2, other=0.0)
    b_A21 = tl.load(p_A + 2 * R + BC, mask=m_2, other=0.0)
    b_A30 = tl.load(p_A + 3 * R, mask=m_3, other=0.0)
    b_A31 = tl.load(p_A + 3 * R + BC, mask=m_3, other=0.0)
    b_A32 = tl.load(p_A + 3 * R + 2 * BC, mask=m_3, other=0.0)

    b_X10 = -_dot_ieee(b_D1, _dot_ieee(b_A10, b_D0))
    b_X21 = -_dot_ieee(b_D2, _dot_ieee(b_A21, b_D1))
    b_X32 = -_dot_ieee(b_D3, _dot_ieee(b_A32, b_D2))
    b_X20 = -_dot_ieee(b_D2, _dot_ieee(b_A20, b_D0) + _dot_ieee(b_A21, b_X10))
    b_X31 = -_dot_ieee(b_D3, _dot_ieee(b_A31, b_D1) + _dot_ieee(b_A32, b_X21))
    b_X30 = _dot_ieee(b_A30, b_D0) + _dot_ieee(b_A31, b_X10) + _dot_ieee(b_A32, b_X20)
    b_X30 = -_dot_ieee(b_D3, b_X30)

    tl.store(p_Ai, b_D0, mask=(o_c < L)[:, None])
    tl.store(p_Ai + R, b_X10, mask=m_1)
    tl.store(p_Ai + R + BC, b_D1, mask=m_1)
    tl.store(p_Ai + 2 * R, b_X20, mask=m_2)
    tl.store(p_Ai + 2 * R + BC, b_X21, mask=m_2)
    tl.store(p_Ai + 2 * R + 2 * BC, b_D2, mask=m_2)
    tl.store(p_Ai + 3 * R, b_X30, mask=m_3)
    tl.store(p_Ai + 3 * R + BC, b_X31, mask=m_3)
    tl.store(p_Ai + 3 * R + 2 * BC, b_X32, mask=m_3)
    tl.store(p_Ai + 3 * R + 3 * BC, b_D3, mask=m_3)


@triton.jit
def _fwd_wu_kernel(
    k,
    v,
    beta,
    g_cum,
    Ai,
    w,
    u,
    cu_seqlens,
    chunk_indices,
    H,
    K,
    V,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    DOT_PREC: tl.constexpr,
):
    """w [T_all, H, K] = Ai (beta k exp(g_cum)), u [T_all, H, V] = Ai (beta v), fp32."""
    i_tg, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    b_Ai = tl.load(
        Ai + (t0 + o_t)[:, None] * (H * BT) + i_h * BT + o_t[None, :],
        mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]),
        other=0.0,
    )
    b_beta = tl.load(beta + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_bk = b_beta
    if GATE == 1:
        b_bk *= tl.exp(tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h))

    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k = (t0 + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.dot(b_Ai, b_k * b_bk[:, None], input_precision=DOT_PREC)
        tl.store(w + p_k, b_w, mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_u = tl.dot(b_Ai, b_v * b_beta[:, None], input_precision=DOT_PREC)
        tl.store(u + p_v, b_u, mask=m_tv)


# ----------------------------------------------------------------------------------------
# Forward: the state scan


@triton.jit
def _state_ptrs(base, i_kb: tl.constexpr, o_v, m_v, K, V):
    """Pointers and mask of rows [64 i_kb, 64 i_kb + 64) x columns o_v of a [K, V] state."""
    o_k = i_kb * 64 + tl.arange(0, 64)
    return base + o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & m_v[None, :]


@triton.jit
def _load_state(base, i_kb: tl.constexpr, o_v, m_v, K, V):
    p, m = _state_ptrs(base, i_kb, o_v, m_v, K, V)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_state(base, x, i_kb: tl.constexpr, o_v, m_v, K, V):
    p, m = _state_ptrs(base, i_kb, o_v, m_v, K, V)
    tl.store(p, x, mask=m)


@triton.jit
def _load_states(base, NKB: tl.constexpr, o_v, m_v, K, V):
    """The NKB row blocks [64, BV] of columns o_v of a [K, V] state (zeros past NKB)."""
    b_1 = _load_state(base, 0, o_v, m_v, K, V)
    b_2 = tl.zeros_like(b_1)
    b_3 = tl.zeros_like(b_1)
    b_4 = tl.zeros_like(b_1)
    if NKB > 1:
        b_2 = _load_state(base, 1, o_v, m_v, K, V)
    if NKB > 2:
        b_3 = _load_state(base, 2, o_v, m_v, K, V)
    if NKB > 3:
        b_4 = _load_state(base, 3, o_v, m_v, K, V)
    return b_1, b_2, b_3, b_4


@triton.jit
def _store_states(base, b_1, b_2, b_3, b_4, NKB: tl.constexpr, o_v, m_v, K, V):
    _store_state(base, b_1, 0, o_v, m_v, K, V)
    if NKB > 1:
        _store_state(base, b_2, 1, o_v, m_v, K, V)
    if NKB > 2:
        _store_state(base, b_3, 2, o_v, m_v, K, V)
    if NKB > 3:
        _store_state(base, b_4, 3, o_v, m_v, K, V)


@triton.jit
def _key_cols(i_kb: tl.constexpr, K):
    """Columns [64 i_kb, 64 i_kb + 64) of a K axis, and their mask."""
    o_k = i_kb * 64 + tl.arange(0, 64)
    return o_k, o_k < K


@triton.jit
def _first_states(
    s_in, i_nh, USE_IN: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, o_v, m_v, K, V
):
    """A scan's starting state as four [64, BV] blocks (NKB of them used): document i_nh's
    row of ``s_in``, or zeros."""
    if USE_IN:
        b_1, b_2, b_3, b_4 = _load_states(s_in + i_nh.to(tl.int64) * K * V, NKB, o_v, m_v, K, V)
    else:
        b_1 = tl.zeros([64, BV], dtype=tl.float32)
        b_2, b_3, b_4 = tl.zeros_like(b_1), tl.zeros_like(b_1), tl.zeros_like(b_1)
    return b_1, b_2, b_3, b_4


@triton.jit
def _delta_fwd_h_kernel(
    k,
    u,
    w,
    g_cum,
    h,
    delta,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    H,
    K,
    V,
    BT: tl.constexpr,
    NKB: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """h [NT, H, K, V] entering states, delta [T_all, H, V] = u - w h, ht [N, H, K, V].
    Sequential over one document's chunks. A program owns BV columns of the state (columns
    are independent) and all of K, as NKB <= 4 row blocks of 64 in registers (w h
    contracts over K); every tile it loads is [BT, 64] or [BT, BV], so its shared memory
    does not grow with K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, NT, boh = document_span(cu_seqlens, chunk_offsets, i_nh, H, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_k1, m_k1 = _key_cols(0, K)
    o_k2, m_k2 = _key_cols(1, K)
    o_k3, m_k3 = _key_cols(2, K)
    o_k4, m_k4 = _key_cols(3, K)

    b_h1, b_h2, b_h3, b_h4 = _first_states(h0, i_nh, USE_H0, NKB, BV, o_v, m_v, K, V)

    for i_t in range(NT):
        t0 = bos + i_t * BT
        L = tl.minimum(eos - t0, BT)
        m_t = o_t < L
        p_h = h + ((boh + i_t) * H + i_h) * K * V
        _store_states(p_h, b_h1, b_h2, b_h3, b_h4, NKB, o_v, m_v, K, V)

        # delta = u - w h, one K block at a time.
        b_d = load_rows(u, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        b_w = load_rows(w, t0, o_t, m_t, i_h, H, K, o_k1, m_k1)
        b_d -= tl.dot(b_w, b_h1, input_precision=DOT_PREC)
        if NKB > 1:
            b_w = load_rows(w, t0, o_t, m_t, i_h, H, K, o_k2, m_k2)
            b_d -= tl.dot(b_w, b_h2, input_precision=DOT_PREC)
        if NKB > 2:
            b_w = load_rows(w, t0, o_t, m_t, i_h, H, K, o_k3, m_k3)
            b_d -= tl.dot(b_w, b_h3, input_precision=DOT_PREC)
        if NKB > 3:
            b_w = load_rows(w, t0, o_t, m_t, i_h, H, K, o_k4, m_k4)
            b_d -= tl.dot(b_w, b_h4, input_precision=DOT_PREC)
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        tl.store(delta + p_v, b_d, mask=m_t[:, None] & m_v[None, :])

        if GATE == 1:
            b_gl = tl.load(g_cum + (t0 + L - 1) * H + i_h)
            b_g = tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h)
            # The decay is per token: fold exp(g_cum_L - g_cum) into delta (BT x BV).
            b_d *= tl.exp(b_gl - b_g)[:, None]
            b_h1 *= tl.exp(b_gl)
            b_h2 *= tl.exp(b_gl)
            b_h3 *= tl.exp(b_gl)
            b_h4 *= tl.exp(b_gl)
        # h' = decayed h + k^T delta; k^T [64, BT] straight from memory.
        b_h1 += tl.dot(
            load_cols(k, t0, o_t, m_t, i_h, H, K, o_k1, m_k1), b_d, input_precision=DOT_PREC
        )
        if NKB > 1:
            b_h2 += tl.dot(
                load_cols(k, t0, o_t, m_t, i_h, H, K, o_k2, m_k2), b_d, input_precision=DOT_PREC
            )
        if NKB > 2:
            b_h3 += tl.dot(
                load_cols(k, t0, o_t, m_t, i_h, H, K, o_k3, m_k3), b_d, input_precision=DOT_PREC
            )
        if NKB > 3:
            b_h4 += tl.dot(
                load_cols(k, t0, o_t, m_t, i_h, H, K, o_k4, m_k4), b_d, input_precision=DOT_PREC
            )

    if STORE_HT:
        p_ht = ht + i_nh.to(tl.int64) * K * V
        _store_states(p_ht, b_h1, b_h2, b_h3, b_h4, NKB, o_v, m_v, K, V)


# ----------------------------------------------------------------------------------------
# Backward


@triton.jit
def _dh_block(
    b_dh, q, w, t0, o_t, m_t, i_h, H, K, o_k, m_k, b_qdec, b_do, b_dd, DOT_PREC: tl.constexpr
):
    """One 64-row block of dh += (scale q exp(g_cum))^T dO - w^T ddelta."""
    b_qt = load_cols(q, t0, o_t, m_t, i_h, H, K, o_k, m_k) * b_qdec[None, :]
    b_wt = load_cols(w, t0, o_t, m_t, i_h, H, K, o_k, m_k)
    b_dh += tl.dot(b_qt, b_do, input_precision=DOT_PREC)
    return b_dh - tl.dot(b_wt, b_dd, input_precision=DOT_PREC)


@triton.jit
def _delta_bwd_dh_kernel(
    q,
    k,
    w,
    g_cum,
    A,
    do,
    dh,
    ddelta,
    dht,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    H,
    K,
    V,
    BT: tl.constexpr,
    NKB: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dh [NT, H, K, V]: gradient of the state LEAVING every chunk; ddelta [T_all, H, V];
    dh0 [N, H, K, V]. Reverse scan, last chunk first, with A = scale q k^T * Gam (causal):
    ddelta = A^T dO + (k exp(g_cum_L - g_cum)) dh',
    dh = exp(g_cum_L) dh' + scale (q exp(g))^T dO - w^T ddelta.
    All of K per program, in NKB <= 4 row blocks of 64, as in _delta_fwd_h_kernel."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, NT, boh = document_span(cu_seqlens, chunk_offsets, i_nh, H, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_k1, m_k1 = _key_cols(0, K)
    o_k2, m_k2 = _key_cols(1, K)
    o_k3, m_k3 = _key_cols(2, K)
    o_k4, m_k4 = _key_cols(3, K)

    b_dh1, b_dh2, b_dh3, b_dh4 = _first_states(dht, i_nh, USE_DHT, NKB, BV, o_v, m_v, K, V)

    for it in range(NT):
        i_t = NT - 1 - it
        t0 = bos + i_t * BT
        L = tl.minimum(eos - t0, BT)
        m_t = o_t < L
        p_dh = dh + ((boh + i_t) * H + i_h) * K * V
        _store_states(p_dh, b_dh1, b_dh2, b_dh3, b_dh4, NKB, o_v, m_v, K, V)

        if GATE == 1:
            b_gl = tl.load(g_cum + (t0 + L - 1) * H + i_h)
            b_g = tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h)
            b_kdec = tl.exp(b_gl - b_g)  # k's factor exp(g_cum_L - g_cum)
            b_qdec = tl.exp(b_g) * scale  # q's factor scale exp(g_cum)
        else:
            b_kdec = tl.full([BT], 1.0, dtype=tl.float32)
            b_qdec = tl.full([BT], scale, dtype=tl.float32)

        # ddelta = A^T dO + (k exp(g_cum_L - g_cum)) dh', one K block at a time.
        b_do = load_rows(do, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        b_At = tl.load(  # A^T [BT, BT] read transposed from memory
            A + (t0 + o_t)[None, :] * (H * BT) + i_h * BT + o_t[:, None],
            mask=m_t[None, :],
            other=0.0,
        )
        b_dd = tl.dot(b_At, b_do, input_precision=DOT_PREC)
        b_k = load_rows(k, t0, o_t, m_t, i_h, H, K, o_k1, m_k1) * b_kdec[:, None]
        b_dd += tl.dot(b_k, b_dh1, input_precision=DOT_PREC)
        if NKB > 1:
            b_k = load_rows(k, t0, o_t, m_t, i_h, H, K, o_k2, m_k2) * b_kdec[:, None]
            b_dd += tl.dot(b_k, b_dh2, input_precision=DOT_PREC)
        if NKB > 2:
            b_k = load_rows(k, t0, o_t, m_t, i_h, H, K, o_k3, m_k3) * b_kdec[:, None]
            b_dd += tl.dot(b_k, b_dh3, input_precision=DOT_PREC)
        if NKB > 3:
            b_k = load_rows(k, t0, o_t, m_t, i_h, H, K, o_k4, m_k4) * b_kdec[:, None]
            b_dd += tl.dot(b_k, b_dh4, input_precision=DOT_PREC)
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        tl.store(ddelta + p_v, b_dd, mask=m_t[:, None] & m_v[None, :])

        # dh = exp(g_cum_L) dh' + (scale q exp(g_cum))^T dO - w^T ddelta, per K block.
        if GATE == 1:
            b_dh1 *= tl.exp(b_gl)
            b_dh2 *= tl.exp(b_gl)
            b_dh3 *= tl.exp(b_gl)
            b_dh4 *= tl.exp(b_gl)
        b_dh1 = _dh_block(
            b_dh1, q, w, t0, o_t, m_t, i_h, H, K, o_k1, m_k1, b_qdec, b_do, b_dd, DOT_PREC
        )
        if NKB > 1:
            b_dh2 = _dh_block(
                b_dh2, q, w, t0, o_t, m_t, i_h, H, K, o_k2, m_k2, b_qdec, b_do, b_dd, DOT_PREC
            )
        if NKB > 2:
            b_dh3 = _dh_block(
                b_dh3, q, w, t0, o_t, m_t, i_h, H, K, o_k3, m_k3, b_qdec, b_do, b_dd, DOT_PREC
            )
        if NKB > 3:
            b_dh4 = _dh_block(
                b_dh4, q, w, t0, o_t, m_t, i_h, H, K, o_k4, m_k4, b_qdec, b_do, b_dd, DOT_PREC
            )

    if STORE_DH0:
        p_dh0 = dh0 + i_nh.to(tl.int64) * K * V
        _store_states(p_dh0, b_dh1, b_dh2, b_dh3, b_dh4, NKB, o_v, m_v, K, V)


@triton.jit
def _bwd_dqkwg_kernel(
    q,
    k,
    delta,
    g_cum,
    h,
    do,
    dh,
    ddelta,
    dq,
    dk,
    dw,
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
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    DOT_PREC: tl.constexpr,
):
    """For one K block of one chunk, with dS = scale (dO delta^T) * Gam (causal):
    dq = dS k + scale exp(g_cum) (dO h^T) (final), dk [T_all, H, K] fp32 = dS^T q +
    exp(g_cum_L - g_cum) (delta dh'^T) (its first line), dw [T_all, H, K] = -ddelta h^T,
    and dg [K / BK, T_all, H] = q . dq - k . dk over this K block, plus at the chunk's last
    token sum(exp(g_cum_L) h * dh') + sum_j r_j over it (g only)."""
    i_k, i_tg, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_hh = (i_tg.to(tl.int64) * H + i_h) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO h^T
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)  # delta dh'^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # ddelta h^T
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dO delta^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # sum_V h * dh'
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_d = tl.load(delta + p_v, mask=m_tv, other=0.0)
        b_dd = tl.load(ddelta + p_v, mask=m_tv, other=0.0)
        b_dt = load_cols(delta, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        # h^T, dh'^T [BV, BK] read transposed from the [K, V] states.
        p_t = p_hh + o_k[None, :] * V + o_v[:, None]
        m_vk = m_v[:, None] & m_k[None, :]
        b_ht = tl.load(h + p_t, mask=m_vk, other=0.0)
        b_dht = tl.load(dh + p_t, mask=m_vk, other=0.0)
        b_dq += tl.dot(b_do, b_ht, input_precision=DOT_PREC)
        b_dks += tl.dot(b_d, b_dht, input_precision=DOT_PREC)
        b_dw += tl.dot(b_dd, b_ht, input_precision=DOT_PREC)
        b_ds += tl.dot(b_do, b_dt, input_precision=DOT_PREC)
        b_hdh += tl.sum(b_ht * b_dht, 0)

    p_k = (t0 + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
    m_ge = o_t[:, None] >= o_t[None, :]
    b_ds = tl.where(m_ge, b_ds * scale, 0.0)
    b_dq *= scale
    if GATE == 1:
        b_g = tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h)
        b_gl = tl.load(g_cum + (t0 + L - 1) * H + i_h)
        b_ds *= tl.exp(tl.where(m_ge, b_g[:, None] - b_g[None, :], 0.0))
        b_dq *= tl.exp(b_g)[:, None]
        b_dks *= tl.exp(b_gl - b_g)[:, None]
    b_dq += tl.dot(b_ds, b_k, input_precision=DOT_PREC)
    b_dk = tl.dot(tl.trans(b_ds), b_q, input_precision=DOT_PREC) + b_dks
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk, mask=m_tk)
    tl.store(dw + p_k, -b_dw, mask=m_tk)
    if GATE == 1:
        b_dg = tl.sum(b_q * b_dq, 1) - tl.sum(b_k * b_dk, 1)
        b_end = tl.exp(b_gl) * tl.sum(b_hdh, 0) + tl.sum(tl.sum(b_k * b_dks, 1), 0)
        b_dg += tl.where(o_t == L - 1, b_end, 0.0)
        tl.store(dg + (i_k * T_all + t0 + o_t) * H + i_h, b_dg, mask=m_t)


@triton.jit
def _bwd_wy_kernel(
    k,
    v,
    beta,
    g_cum,
    Ai,
    u,
    w,
    ddelta,
    dw,
    dk_o,
    dg_o,
    dk,
    dv,
    dbeta,
    dg,
    cu_seqlens,
    chunk_indices,
    T_all,
    NK_O,
    H,
    K,
    V,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    DOT_PREC: tl.constexpr,
):
    """Back through the UT transform of one chunk: dXu = Ai^T ddelta, dXw = Ai^T dw,
    dAkk = -strict_lower(dXu u^T + dXw w^T); then dv, dbeta, dk = dk_o + beta exp(g_cum)
    dXw + (dAkk * beta_i Gam) k + (dAkk * beta_i Gam)^T k, and dg = the reverse cumsum
    inside the chunk of dg_cum = sum of the NK_O blocks of dg_o + sum_K(Xw dXw) + the row
    sums minus the column sums of dAkk * Akk."""
    i_tg, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, L = chunk_span(cu_seqlens, chunk_indices, i_tg, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    # Ai^T [BT, BT] read transposed: lower triangle of Ai, so upper triangle here.
    b_Ait = tl.load(
        Ai + (t0 + o_t)[None, :] * (H * BT) + i_h * BT + o_t[:, None],
        mask=m_t[None, :] & (o_t[:, None] <= o_t[None, :]),
        other=0.0,
    )
    b_beta = tl.load(beta + (t0 + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if GATE == 1:
        b_g = tl.load(g_cum + (t0 + tl.minimum(o_t, L - 1)) * H + i_h)
        b_eg = tl.exp(b_g)
    else:
        b_eg = tl.full([BT], 1.0, dtype=tl.float32)

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # dXu u^T + dXw w^T
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)  # k k^T
    b_db = tl.zeros([BT], dtype=tl.float32)  # sum_V v dXu
    b_dbw = tl.zeros([BT], dtype=tl.float32)  # sum_K k dXw
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_v = (t0 + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_dd = tl.load(ddelta + p_v, mask=m_tv, other=0.0)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_ut = load_cols(u, t0, o_t, m_t, i_h, H, V, o_v, m_v)
        b_dxu = tl.dot(b_Ait, b_dd, input_precision=DOT_PREC)
        tl.store(dv + p_v, (b_dxu * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_db += tl.sum(b_v * b_dxu, 1)
        b_dA += tl.dot(b_dxu, b_ut, input_precision=DOT_PREC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = (t0 + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_kt = m_k[:, None] & m_t[None, :]
        p_kt = (t0 + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None]
        b_dw = tl.load(dw + p_k, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_kt = tl.load(k + p_kt, mask=m_kt, other=0.0).to(tl.float32)
        b_wt = tl.load(w + p_kt, mask=m_kt, other=0.0)
        b_dxw = tl.dot(b_Ait, b_dw, input_precision=DOT_PREC)
        b_dA += tl.dot(b_dxw, b_wt, input_precision=DOT_PREC)
        b_dbw += tl.sum(b_k * b_dxw, 1)
        b_kk += tl.dot(b_k, b_kt, input_precision=DOT_PREC)

    m_lt = o_t[:, None] > o_t[None, :]
    b_dA = tl.where(m_lt, -b_dA, 0.0)  # dAkk
    if GATE == 1:
        b_dA *= tl.exp(tl.where(m_lt, b_g[:, None] - b_g[None, :], 0.0))  # dAkk * Gam
    b_dbw *= b_eg  # sum_K(k exp(g_cum) dXw)
    b_dA_kk = b_dA * b_kk  # dAkk * KK * Gam
    b_db += b_dbw + tl.sum(b_dA_kk, 1)
    tl.store(dbeta + (t0 + o_t) * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    b_dA *= b_beta[:, None]  # dAkk * beta_i Gam: the gradient of k_i . k_j

    if GATE == 1:
        b_pa = b_dA_kk * b_beta[:, None]  # dAkk * Akk
        b_dgam = b_beta * b_dbw + tl.sum(b_pa, 1) - tl.sum(b_pa, 0)
        for i_k in range(NK_O):
            b_dgam += tl.load(dg_o + (i_k * T_all + t0 + o_t) * H + i_h, mask=m_t, other=0.0)
        b_dgam = tl.where(m_t, b_dgam, 0.0)
        b_dg = tl.cumsum(b_dgam, 0, reverse=True)
        tl.store(dg + (t0 + o_t) * H + i_h, b_dg.to(dg.dtype.element_ty), mask=m_t)

    b_dAt = tl.trans(b_dA)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_k = (t0 + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_dw = tl.load(dw + p_k, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_dk = tl.load(dk_o + p_k, mask=m_tk, other=0.0)
        # dXw again (one [BT, BT] x [BT, BK] dot) rather than keeping all of K in registers.
        b_dxw = tl.dot(b_Ait, b_dw, input_precision=DOT_PREC)
        b_dk += b_dxw * (b_beta * b_eg)[:, None]
        b_dk += tl.dot(b_dA, b_k, input_precision=DOT_PREC)
        b_dk += tl.dot(b_dAt, b_k, input_precision=DOT_PREC)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


# ----------------------------------------------------------------------------------------
# Host side


def _scan_blocks(K: int, V: int) -> tuple[int, int]:
    """(NKB, BV) of the state scans: all of K as 64-row blocks, and a block of value
    columns small enough that the NKB blocks stay in registers (32 a thread at 4 warps
    for each 64 x BV block at BV = 32)."""
    nkb = triton.cdiv(K, 64)
    return nkb, 32 if nkb > 2 else min(64, block_size(V))


def _ut_transform(k, v, beta, g_cum, lay, prec):
    """-> Ai [T_all, H, BT] (lower triangle), w [T_all, H, K], u [T_all, H, V], fp32."""
    T_all, H, K = k.shape
    V = v.shape[-1]
    BT = lay.C
    use_g = g_cum is not None
    A = k.new_empty(T_all, H, BT, dtype=torch.float32)
    _fwd_kkt_kernel[(lay.NT, H)](
        k, beta, g_cum, A, lay.cu_seqlens, lay.chunk_indices,
        H=H, K=K, BT=BT, BK=block_size(K), GATE=int(use_g), DOT_PREC=prec, **launch_options(),
    )  # fmt: skip
    Ai = torch.empty_like(A)
    _solve_tril_kernel[(lay.NT, H)](
        A, Ai, lay.cu_seqlens, lay.chunk_indices, H=H, BT=BT, BC=_BC, **launch_options()
    )
    del A
    w = k.new_empty(T_all, H, K, dtype=torch.float32)
    u = k.new_empty(T_all, H, V, dtype=torch.float32)
    _fwd_wu_kernel[(lay.NT, H)](
        k, v, beta, g_cum, Ai, w, u, lay.cu_seqlens, lay.chunk_indices,
        H=H, K=K, V=V, BT=BT, BK=block_size(K), BV=block_size(V), GATE=int(use_g), DOT_PREC=prec, **launch_options(),
    )  # fmt: skip
    return Ai, w, u


def _states(k, u, w, g_cum, h0, store_ht, lay, prec):
    """-> h [NT, H, K, V] entering states, delta [T_all, H, V], ht [N, H, K, V] or None."""
    _, H, K = k.shape
    V = u.shape[-1]
    NKB, BV = _scan_blocks(K, V)
    h = k.new_empty(lay.NT, H, K, V, dtype=torch.float32)
    delta = torch.empty_like(u)
    ht = k.new_empty(lay.docs, H, K, V, dtype=torch.float32) if store_ht else None
    _delta_fwd_h_kernel[(triton.cdiv(V, BV), lay.docs * H)](
        k, u, w, g_cum, h, delta, h0, ht, lay.cu_seqlens, lay.chunk_offsets,
        H=H, K=K, V=V, BT=lay.C, NKB=NKB, BV=BV, GATE=int(g_cum is not None),
        USE_H0=h0 is not None, STORE_HT=store_ht, DOT_PREC=prec, **launch_options(),
    )  # fmt: skip
    return h, delta, ht


class DeltaTriton:
    """The delta engine's Triton kernels, in the engines' autograd pattern
    (``hylas.kernels.engines.autograd``): [T_all, H, *] tensors, B folded into documents."""

    @staticmethod
    def forward(ctx, lay: ChunkLayout, scale, output_final_state, h0, q, k, v, g, beta):
        gate = GATE_NONE if g is None else GATE_SCALAR
        prec = dot_precision(q, k, v)
        _, H, K = q.shape
        V = v.shape[-1]
        BV = block_size(V)

        g_cum = None if g is None else local_cumsum(g, gate, lay)
        _, w, u = _ut_transform(k, v, beta, g_cum, lay, prec)
        h, delta, ht = _states(k, u, w, g_cum, h0, output_final_state, lay, prec)
        del w, u
        A = chunk_scores(q, k, g_cum, gate, scale, lay, prec)
        o = torch.empty_like(v)
        chunk_out_kernel[(triton.cdiv(V, BV), lay.NT, H)](
            q, delta, g_cum, h, A, o, lay.cu_seqlens, lay.chunk_indices, scale,
            H=H, K=K, V=V, BT=lay.C, BK=block_size(K), BV=BV, GATE=gate, REVERSE=False,
            DOT_PREC=prec, **launch_options(),
        )  # fmt: skip

        # Only the inputs are kept: the UT transform and the states are recomputed.
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.scale, ctx.lay, ctx.prec = scale, lay, prec
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        scale, lay, prec = ctx.scale, ctx.lay, ctx.prec
        T_all, H, K = q.shape
        V = v.shape[-1]
        BT, BK, BV = lay.C, block_size(K), block_size(V)
        NK = triton.cdiv(K, BK)
        gate = GATE_NONE if g is None else GATE_SCALAR
        use_g = g is not None

        # Recompute what the forward dropped.
        g_cum = None if g is None else local_cumsum(g, gate, lay)
        Ai, w, u = _ut_transform(k, v, beta, g_cum, lay, prec)
        h, delta, _ = _states(k, u, w, g_cum, h0, False, lay, prec)
        A = chunk_scores(q, k, g_cum, gate, scale, lay, prec)

        NKB, BVs = _scan_blocks(K, V)
        dh = q.new_empty(lay.NT, H, K, V, dtype=torch.float32)
        ddelta = torch.empty_like(delta)
        dh0 = None if h0 is None else torch.empty_like(h0)
        _delta_bwd_dh_kernel[(triton.cdiv(V, BVs), lay.docs * H)](
            q, k, w, g_cum, A, do, dh, ddelta, dht, dh0, lay.cu_seqlens, lay.chunk_offsets,
            scale, H=H, K=K, V=V, BT=BT, NKB=NKB, BV=BVs, GATE=int(use_g),
            USE_DHT=dht is not None, STORE_DH0=h0 is not None, DOT_PREC=prec,
            # A chunk loads 3 NKB key tiles. Two stages of them pass A100's limit from
            # NKB x element size > 4 (fp32 at K > 64, 16-bit at K > 128), H100's at K > 128.
            **launch_options(max_stages=1 if NKB * q.element_size() > 4 else 2),
        )  # fmt: skip
        del A

        dq = torch.empty_like(q)
        dk_o = q.new_empty(T_all, H, K, dtype=torch.float32)
        dw = torch.empty_like(dk_o)
        dg_o = q.new_empty(NK, T_all, H, dtype=torch.float32) if use_g else None
        _bwd_dqkwg_kernel[(NK, lay.NT, H)](
            q, k, delta, g_cum, h, do, dh, ddelta, dq, dk_o, dw, dg_o,
            lay.cu_seqlens, lay.chunk_indices, scale, T_all,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=int(use_g), DOT_PREC=prec, **launch_options(),
        )  # fmt: skip
        del h, dh, delta

        dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
        dg = torch.empty_like(g) if use_g else None
        _bwd_wy_kernel[(lay.NT, H)](
            k, v, beta, g_cum, Ai, u, w, ddelta, dw, dk_o, dg_o, dk, dv, dbeta, dg,
            lay.cu_seqlens, lay.chunk_indices, T_all, NK,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, GATE=int(use_g), DOT_PREC=prec, **launch_options(),
        )  # fmt: skip
        return dh0, dq, dk, dv, dg, dbeta


def chunk_delta_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | Documents | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise delta rule (DeltaNet, Gated DeltaNet) with Triton forward and backward.
    The family call (``hylas.kernels.engines.delta``) has checked the shapes; this launches.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (K != V allowed, neither need be a power of two).
            Any float dtype; all arithmetic is fp32. Keys are expected L2-normalised.
        g: None (DeltaNet) or [B, T, H] log decay <= 0 (Gated DeltaNet).
        beta: [B, T, H] write strength (in [0, 1], or [0, 2] for negative eigenvalues).
        scale: multiplies q (commonly K ** -0.5).
        initial_state: [N, H, K, V] fp32 or None (zeros); N = B, or the number of
            documents with ``cu_seqlens``.
        output_final_state: also return the state after each document's last token.
        cu_seqlens: int32 [N + 1] offsets of packed documents (B must be 1), or the
            ``Documents`` read from them once per batch. The state restarts from
            ``initial_state[n]`` at each document start; chunks never straddle documents.

    Returns:
        o [B, T, H, V] in v's dtype and ht [N, H, K, V] fp32 (or None). Differentiable in
        q, k, v, g, beta and initial_state; the backward recomputes the chunk states.
    """
    B, T = q.shape[:2]
    lay = chunk_layout(B, T, Documents.of(cu_seqlens, B, T), q.device)
    return run(DeltaTriton, lay, scale, initial_state, output_final_state, q, k, v, g, beta)
