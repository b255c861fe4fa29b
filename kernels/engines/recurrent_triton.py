"""Fused recurrent gated linear attention in Triton: the decoding step (a few tokens at a time).

Legend: B batch, T tokens, H heads, K key dim, V value dim, BK = K rounded up to a power of
two, BV the block of value columns one program owns.

Recurrence per head, with row vectors q_t, k_t in R^K, v_t in R^V and the log decay g_t <= 0::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

The decay g_t is one of: absent (plain linear attention), one scalar per head [B, T, H]
(RetNet / Mamba2 / Lightning style), or one value per key channel [B, T, H, K] (GLA / HGRN2).

The same kernel (``DELTA``, ``fused_recurrent`` given beta) decodes the delta rule
(DeltaNet, g absent; Gated DeltaNet, g [B, T, H]) with a write strength beta_t [B, T, H]::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t

One program per (value block, batch x head) keeps its [BK, BV] slice of the state in fp32
registers and walks the T tokens in order, so the state is read from and written to memory
once per call however many tokens are decoded. Columns of S are independent (every update
acts on rows), which is why V can be split across programs with no reduction; K cannot.

Inference only: there is no backward, and gradients do not flow through the outputs.
Inputs are made contiguous; the kernel indexes the [B, T, H, *] layout directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylas.kernels.gpu_limits import launch_options

# Cap on the fp32 state slice one program holds (BK * BV elements): 4096 is 32 registers a
# thread at 4 warps, leaving room for q, k, v and the products without spilling.
_MAX_STATE_BLOCK = 4096
_MIN_BV = 16


# ----------------------------------------------------------------------------------------
# Delta rule (DeltaNet, Gated DeltaNet)
#
#     S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t
#
# computed as S' = exp(g_t) S_{t-1}, then S_t = S' + k_t^T (beta_t (v_t - k_t S')). The
# correction k_t S' reduces over K for each value column, so a program holds all of K (BK)
# and a block of V; columns stay independent, so V is still split across programs.


@triton.jit
def _fused_recurrent_kernel(
    q,
    k,
    v,
    beta,
    g,
    o,
    h0,
    ht,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,  # 0 no decay, 1 one per head and token, 2 one per key channel
    DELTA: tl.constexpr,  # the delta rule: write beta (v - k S') instead of v
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    i_v = tl.program_id(0)
    # int64 before any multiplication: B * T * H * K and B * H * K * V can pass 2**31.
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]

    # Token 0 of this (batch, head); each step moves one token, i.e. H rows, forward.
    p_q = q + (i_b * T * H + i_h) * K + offs_k
    p_k = k + (i_b * T * H + i_h) * K + offs_k
    p_v = v + (i_b * T * H + i_h) * V + offs_v
    p_o = o + (i_b * T * H + i_h) * V + offs_v
    if DELTA:
        p_beta = beta + i_b * T * H + i_h
    if GATE == 1:
        p_g = g + i_b * T * H + i_h
    if GATE == 2:
        p_g = g + (i_b * T * H + i_h) * K + offs_k

    # State slice [BK, BV] (all of K) in row-major [K, V] of head i_bh.
    offs_state = i_bh * K * V + offs_k[:, None] * V + offs_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + offs_state, mask=mask_kv, other=0.0).to(tl.float32)

    for _ in range(T):
        # Cast right after the load: all arithmetic is fp32 whatever the input dtype.
        # Padded rows (k >= K) load q = k = 0, so they stay 0 and add nothing to o.
        b_q = tl.load(p_q, mask=mask_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(p_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=mask_v, other=0.0).to(tl.float32)
        if GATE == 1:
            b_h *= tl.exp(tl.load(p_g).to(tl.float32))
        if GATE == 2:
            b_gk = tl.load(p_g, mask=mask_k, other=0.0).to(tl.float32)
            b_h *= tl.exp(b_gk)[:, None]
        if DELTA:  # the corrected write beta (v - k S') for this value block: a K-reduction
            b_beta = tl.load(p_beta).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_v[None, :]
        # q_t S_t for this value block: a K-reduction of a [BK, BV] tile (too small for dot).
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=mask_v)

        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
        if DELTA:
            p_beta += H
        if GATE == 1:
            p_g += H
        if GATE == 2:
            p_g += H * K

    if STORE_FINAL_STATE:
        tl.store(ht + offs_state, b_h, mask=mask_kv)


def fused_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode T tokens from ``initial_state`` with one fused Triton kernel -> (o, ht): the
    gated recurrence, or with ``beta`` the delta rule. The family facade has checked the
    shapes (``hylas.kernels.common``); this only launches.

    Args:
        q, k: [B, T, H, K] (delta rule: keys L2-normalised); v: [B, T, H, V].
        g: log decay (<= 0): None, [B, T, H] (per head) or, without beta, [B, T, H, K]
            (per key channel).
        beta: None (gated), or [B, T, H] write strength (in [0, 1], or [0, 2] for negative
            eigenvalues).
        scale: multiplies q (commonly K ** -0.5).
        initial_state: [B, H, K, V], read in fp32; None starts from zeros.
        output_final_state: return the state after the last token.

    Returns:
        o [B, T, H, V] in v's dtype, and ht [B, H, K, V] fp32 (None unless
        ``output_final_state``).

    Inference only: no backward is defined. On CPU tensors this needs ``TRITON_INTERPRET=1``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.contiguous() if g is not None else None
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o = torch.empty_like(v)
    ht = (
        torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
        if output_final_state
        else None
    )
    BK = triton.next_power_of_2(K)
    # Smaller value blocks when K is large keep the state slice in registers; they also give
    # more programs, which decoding (small B * H) needs to fill the GPU.
    BV = min(triton.next_power_of_2(V), max(_MIN_BV, _MAX_STATE_BLOCK // BK))
    grid = (triton.cdiv(V, BV), B * H)
    # Pointers the flags switch off are never read; q stands in so every argument is a tensor.
    _fused_recurrent_kernel[grid](
        q,
        k,
        v,
        beta.contiguous() if beta is not None else q,
        g if g is not None else q,
        o,
        initial_state if initial_state is not None else q,
        ht if ht is not None else o,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        GATE=0 if g is None else g.dim() - 2,  # [B, T, H]: 1, [B, T, H, K]: 2
        DELTA=beta is not None,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
        **launch_options(),
    )
    return o, ht


def fused_recurrent_gated(q, k, v, g, scale, initial_state=None, output_final_state=True):
    """The gated recurrence's decoding (``fused_recurrent`` without beta)."""
    return fused_recurrent(q, k, v, g, None, scale, initial_state, output_final_state)


def fused_recurrent_delta(q, k, v, g, beta, scale, initial_state=None, output_final_state=True):
    """The delta rule's decoding (``fused_recurrent`` with beta)."""
    return fused_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
