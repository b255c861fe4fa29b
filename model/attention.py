"""Softmax attention with RoPE and grouped-query heads (the ``F`` layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.config import ModelConfig
from hylas.model.layers import RotaryEmbedding


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

    def forward(self, x_BTD, position_ids_BT, state=None, use_cache=False):
        B, T, _ = x_BTD.shape
        q = self.rope(self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim), position_ids_BT)
        k = self.rope(
            self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim), position_ids_BT
        )
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        past = 0
        if state is not None:
            past = state[0].shape[2]
            k = torch.cat((state[0].to(k.dtype), k), dim=2)
            v = torch.cat((state[1].to(v.dtype), v), dim=2)
        if past == 0 or T == 1:
            # SDPA's is_causal aligns the mask top-left, which is right only without a past.
            mask, causal = None, past == 0
        else:
            rows = torch.arange(T, device=x_BTD.device).unsqueeze(1) + past
            mask, causal = torch.arange(past + T, device=x_BTD.device) <= rows, False
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return o, ((k, v) if use_cache else None)
