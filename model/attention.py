"""Softmax attention with RoPE and grouped-query heads (the ``F`` layers).

Optional per config: a sliding window (``model.attention.window``) and QK-norm
(``model.attention.qk_norm``). Packed documents (a ``Packing`` from the decoder) are kept
apart blockwise, so a token never attends to another document: ``attend`` runs the queries in
blocks of ``BLOCK`` rows, each against only the keys it can see, with a mask of that block's
size; no [T, T] mask or score matrix is ever built, and short packed documents cost
O(T x (BLOCK + document length)) rather than O(T^2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.layers import RMSNorm, RotaryEmbedding, init_normal

if TYPE_CHECKING:
    from hylas.model.config import ModelConfig
    from hylas.model.decoder import Packing

BLOCK = 512  # query rows per SDPA call: its mask is [B, 1, BLOCK, span of visible keys]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    window: int = 0,
    block: int = BLOCK,
) -> torch.Tensor:
    """Causal (optionally windowed, document-separated) attention, one query block at a time.

    q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] (Hq a multiple of Hkv: grouped-query);
    q_index [Tq] and k_index [Tk]: int64 positions of each query/key in the sample's sequence,
    both strictly ascending; q_doc [B, Tq] and k_doc [B, Tk]: int document ids (None = one
    document). Query i sees key j iff k_index[j] <= q_index[i], and (window > 0)
    k_index[j] > q_index[i] - window, and q_doc[b, i] == k_doc[b, j]. Returns o [B, Hq, Tq, D]
    in q's dtype; a query that sees no key (possible only when the keys are not the queries'
    own, e.g. a sequence-parallel rank's queries against gathered keys) gets o = 0, whatever
    the SDPA backend does with a fully masked row.

    Each block runs against the smallest key span [lo, hi) it can see: causal end and window
    start from the positions, and, when every row's document ids are non-decreasing (as
    packing makes them), the span of the block's documents. Its mask is [B or 1, 1, rows,
    span], or none where (without documents) the whole span is visible. One host sync per
    call reads the spans.
    """
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    gqa = Hq != k.shape[1]
    if Tq == 0 or Tk == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    if q_doc is None and not window and Tq <= block and Tq == Tk and torch.equal(q_index, k_index):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    starts = torch.arange(0, Tq, block, device=q.device)
    ends = (starts + block).clamp(max=Tq)
    first, last = q_index[starts], q_index[ends - 1]  # the block's lowest and highest position
    hi = torch.searchsorted(k_index, last, right=True)
    lo = torch.zeros_like(hi)
    if window > 0:
        lo = torch.searchsorted(k_index, first - window, right=True)
    if q_doc is None:  # a block that sees its whole span needs no mask
        full = k_index[(hi - 1).clamp(min=0)] <= first
        if window > 0:
            full &= k_index[lo.clamp(max=Tk - 1)] > last - window
    else:
        assert k_doc is not None, "q_doc and k_doc are given together"
        pad = len(starts) * block - Tq  # repeat the last id: block min and max unchanged
        q_docs = torch.cat((q_doc, q_doc[:, -1:].expand(B, pad)), 1).view(B, -1, block)
        k_docs = k_doc.contiguous()
        first_doc = q_docs.amin(-1).to(k_docs.dtype)
        last_doc = q_docs.amax(-1).to(k_docs.dtype)
        doc_lo = torch.searchsorted(k_docs, first_doc).amin(0)
        doc_hi = torch.searchsorted(k_docs, last_doc, right=True).amax(0)
        ordered = (k_docs[:, 1:] >= k_docs[:, :-1]).all()  # else the searches mean nothing
        lo = torch.where(ordered, torch.maximum(lo, doc_lo), lo)
        hi = torch.where(ordered, torch.minimum(hi, doc_hi), hi)
        full = torch.zeros_like(hi, dtype=torch.bool)
    plan = torch.stack((starts, ends, lo, hi, full.long()), 1).tolist()

    out = []
    for q0, q1, k0, k1, whole in plan:
        qb = q[:, :, q0:q1]
        if k1 <= k0:  # no key visible to any row of the block
            out.append(q.new_zeros(*qb.shape[:-1], v.shape[-1]))
            continue
        kb, vb = k[:, :, k0:k1], v[:, :, k0:k1]
        if whole:
            out.append(F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=gqa))
            continue
        rows, cols = q_index[q0:q1, None], k_index[None, k0:k1]
        mask = cols <= rows
        if window > 0:
            mask = mask & (cols > rows - window)
        if q_doc is not None and k_doc is not None:  # both, as asserted above
            mask = mask & (q_doc[:, q0:q1, None] == k_doc[:, None, k0:k1])  # [B, rows, span]
        mask = mask.view(-1, 1, q1 - q0, k1 - k0)  # [B or 1, 1, rows, span]
        # A row that sees no key attends to the whole span (finite) and is then zeroed.
        seen = mask.any(-1, keepdim=True)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask | ~seen, enable_gqa=gqa)
        out.append(o.masked_fill(~seen, 0))
    return torch.cat(out, 2)


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention; its cache entry is (k, v), each [B, H_kv, T_past, D]."""

    def __init__(self, cfg: ModelConfig, kernel_backend: str = "auto"):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.window = cfg.attention.window
        if cfg.attention.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.attention.qk_norm

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        """Normal(0, std) projections, ``out_std`` for o_proj; QK-norms one; RoPE recomputed."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_normal(proj.weight, std, gen)
        init_normal(self.o_proj.weight, out_std, gen)
        if self.qk_norm:
            self.q_norm.init_weights()
            self.k_norm.init_weights()
        self.rope.init_weights()

    def forward(self, x_BTD, position_ids_BT, state=None, use_cache=False, seq=None):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, position_ids_BT), self.rope(k, position_ids_BT)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        past = 0
        if state is not None:
            past = state[0].shape[2]
            k = torch.cat((state[0].to(k.dtype), k), dim=2)
            v = torch.cat((state[1].to(v.dtype), v), dim=2)
        o = self.core(q, k, v, seq, past)
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return o, ((k, v) if use_cache else None)

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: Packing | None, past: int
    ) -> torch.Tensor:
        """Attention of q [B, H, T, D] at positions past .. past + T - 1 over k, v
        [B, H_kv, past + T, D] (the cached past first): causal, windowed, documents apart
        (packed batches have no past), pad tokens of a padded batch never seen. The seam sequence parallelism overrides
        (``hylas.parallel.sp``)."""
        k_index = torch.arange(past + q.shape[2], device=q.device)
        q_doc = k_doc = None if seq is None else seq.seg_id
        if seq is not None and seq.key_id is not None:  # padded: pads are a document apart
            k_doc = seq.key_id
        return attend(q, k, v, k_index[past:], k_index, q_doc, k_doc, self.window)

    def sequence_flops(self, seq_len: int) -> float:
        """q k^T and attention x v: 4 H D per visible key, averaged over causal positions."""
        w = self.window or seq_len
        visible = sum(min(t, w) for t in range(1, seq_len + 1)) / seq_len
        return 4.0 * self.n_heads * self.head_dim * visible
