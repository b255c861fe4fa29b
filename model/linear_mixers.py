"""Linear mixers: one shared wrapper, and each mixer as its gates and paper defaults.

The wrapper owns the projections (q, k, v, output gate), the per-head output norm and
the output projection, so every linear mixer has the same parameter names. A mixer
subclass names its kernel family and computes its gates. Its cache entry is the
recurrent state [B, H, K, V] in fp32, constant in sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylas.kernels import gla
from hylas.model.config import ModelConfig
from hylas.model.layers import RMSNorm
from hylas.model.registry import register_linear_mixer

# Decoding steps of at most this many tokens run the per-token recurrence.
RECURRENT_MAX_TOKENS = 16


class LinearMixer(nn.Module):
    family = None  # the kernel module (hylas.kernels.<family>)
    expand_k = 0.5  # key size per layer = expand_k * d_model
    expand_v = 1.0

    def __init__(self, cfg: ModelConfig, kernel_backend: str = "auto"):
        super().__init__()
        self.kernel_backend = kernel_backend
        self.n_heads = cfg.n_heads
        key_dim, value_dim = int(cfg.d_model * self.expand_k), int(cfg.d_model * self.expand_v)
        self.head_k, self.head_v = key_dim // cfg.n_heads, value_dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(cfg.d_model, value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, cfg.d_model, bias=False)
        self.build_gates(cfg)

    def build_gates(self, cfg: ModelConfig) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define its gates")

    def gates(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError(f"{type(self).__name__} must define its gates")

    def forward(self, x_BTD, position_ids_BT=None, state=None, use_cache=False):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_k)
        k = self.k_proj(x_BTD).view(B, T, self.n_heads, self.head_k)
        v = self.v_proj(x_BTD).view(B, T, self.n_heads, self.head_v)
        gates = self.gates(x_BTD)
        if state is not None and T <= RECURRENT_MAX_TOKENS:
            o, new_state = self.family.recurrent(q, k, v, *gates, initial_state=state)
        else:
            o, new_state = self.family.chunk(
                q,
                k,
                v,
                *gates,
                initial_state=state,
                output_final_state=use_cache,
                backend=self.kernel_backend,
            )
        o = self.o_norm(o) * F.silu(self.g_proj(x_BTD).view(B, T, self.n_heads, self.head_v))
        return self.o_proj(o.reshape(B, T, -1)), (new_state if use_cache else None)


@register_linear_mixer("gla")
class GLA(LinearMixer):
    """Gated Linear Attention (Yang et al. 2024): a low-rank data-dependent per-channel
    forget gate, gk = logsigmoid(W2 W1 x + b) / 16 (the paper's normaliser)."""

    family = gla
    gate_rank = 16
    gate_normaliser = 16.0

    def build_gates(self, cfg: ModelConfig) -> None:
        self.gk_proj = nn.Sequential(
            nn.Linear(cfg.d_model, self.gate_rank, bias=False),
            nn.Linear(self.gate_rank, self.n_heads * self.head_k, bias=True),
        )

    def gates(self, x_BTD):
        B, T, _ = x_BTD.shape
        gk = F.logsigmoid(self.gk_proj(x_BTD).float()) / self.gate_normaliser
        return (gk.view(B, T, self.n_heads, self.head_k),)
