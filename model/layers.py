"""Small shared layers: RMSNorm, rotary position embedding and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the input dtype (autocast hands it bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; positions come from ``position_ids`` so packed documents restart at 0."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x_BTHD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        angles = position_ids_BT.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        cos = angles.cos().unsqueeze(2)
        sin = angles.sin().unsqueeze(2)
        x1, x2 = x_BTHD.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x_BTHD.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
