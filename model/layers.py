"""Small shared layers: RMSNorm, rotary position embedding and the SwiGLU feed-forward,
and the helpers every module's ``init_weights`` draws its values with.

Initial values are drawn on the CPU from a ``torch.Generator`` and copied into the tensor,
wherever it lives, so they depend only on the seed and the order of the draws.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def init_normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """t <- Normal(0, std), drawn on the CPU from ``gen``."""
    t.copy_(torch.empty(t.shape, device="cpu").normal_(0.0, std, generator=gen))


@torch.no_grad()
def init_uniform(t: torch.Tensor, low: float, high: float, gen: torch.Generator) -> None:
    """t <- Uniform(low, high), drawn on the CPU from ``gen``."""
    t.copy_(torch.empty(t.shape, device="cpu").uniform_(low, high, generator=gen))


@torch.no_grad()
def init_value(t: torch.Tensor, value: torch.Tensor | float) -> None:
    """t <- value (a CPU tensor computed from the config, or a constant)."""
    if isinstance(value, torch.Tensor):
        t.copy_(value)
    else:
        t.fill_(value)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the input dtype (autocast hands it bf16)."""

    def init_weights(self) -> None:
        init_value(self.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; positions come from ``position_ids`` so packed documents restart at 0.

    ``scaling`` (a ``RopeScalingConfig`` or None) of kind ``llama3`` rescales the
    frequencies as Llama 3.1 does: wavelengths longer than original_max_position /
    low_freq_factor are divided by ``factor``, those shorter than original_max_position /
    high_freq_factor kept, and those between interpolated smoothly."""

    inv_freq: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, head_dim: int, theta: float, scaling=None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        # Computed at construction, on the default device (nothing on meta): usable at once.
        self.register_buffer("inv_freq", self.frequencies(device=None), persistent=False)

    def frequencies(self, device: torch.device | str | None) -> torch.Tensor:
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.theta ** (dims / self.head_dim)
        if self.scaling is not None and self.scaling.kind == "llama3":
            inv_freq = llama3_frequencies(inv_freq, self.scaling)
        return inv_freq

    def init_weights(self) -> None:
        self.init_buffers()

    def init_buffers(self) -> None:
        """The frequencies, from the config (a buffer that no checkpoint holds), computed on
        the CPU whatever the buffer's device, so every device gets the same values."""
        init_value(self.inv_freq, self.frequencies(device="cpu"))

    def forward(self, x_BTHD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        angles = position_ids_BT.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        cos = angles.cos().unsqueeze(2)
        sin = angles.sin().unsqueeze(2)
        x1, x2 = x_BTHD.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x_BTHD.dtype)


def llama3_frequencies(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of ``inv_freq`` (see ``RotaryEmbedding``)."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        """Normal(0, std) inputs; ``out_std`` for down_proj, which writes the residual."""
        init_normal(self.gate_proj.weight, std, gen)
        init_normal(self.up_proj.weight, std, gen)
        init_normal(self.down_proj.weight, out_std, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
