"""Softmax attention with RoPE and grouped-query heads (the ``F`` layers).

Optional per config: a sliding window (``model.attention.window``) and QK-norm
(``model.attention.qk_norm``). Packed documents (a ``Packing`` from the decoder) are kept
apart by a block-diagonal causal mask, so a token never attends to another document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.config import ModelConfig
from hylas.model.layers import RMSNorm, RotaryEmbedding, init_normal


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
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)
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
        mask, causal = self._mask(T, past, x_BTD.device, seq)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return o, ((k, v) if use_cache else None)

    def sequence_flops(self, seq_len: int) -> float:
        """q k^T and attention x v: 4 H D per visible key, averaged over causal positions."""
        w = self.window or seq_len
        visible = sum(min(t, w) for t in range(1, seq_len + 1)) / seq_len
        return 4.0 * self.n_heads * self.head_dim * visible

    def _mask(self, T, past, device, seq):
        """(attn_mask, is_causal) for SDPA: None and a flag where the plain causal mask is right."""
        if seq is None and not self.window and (past == 0 or T == 1):
            # SDPA's is_causal aligns the mask top-left, which is right only without a past.
            return None, past == 0
        rows = torch.arange(T, device=device).unsqueeze(1) + past  # query positions
        cols = torch.arange(past + T, device=device)  # key positions
        mask = cols <= rows
        if self.window:
            mask = mask & (cols > rows - self.window)
        if seq is not None:  # packed: only keys of the query's own document
            same = seq.seg_id.unsqueeze(-1) == seq.seg_id.unsqueeze(-2)  # [B, T, T]
            mask = (mask & same).unsqueeze(1)  # [B, 1, T, T]
        return mask, False
