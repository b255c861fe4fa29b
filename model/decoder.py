"""The hybrid decoder: embedding, a tiled pattern of mixer + FFN blocks, and the LM head.

Legend: B batch, T tokens, D d_model, V padded vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.config import ModelConfig
from hylas.model.layers import RMSNorm, SwiGLU
from hylas.model.registry import mixer_class

IGNORE_INDEX = -100


@dataclass
class HybridCache:
    """Per-layer decoding state: a linear layer's recurrent state, a softmax layer's (k, v)."""

    states: list = field(default_factory=list)
    length: int = 0  # tokens seen so far


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    cache: HybridCache | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, kernel_backend: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer_class(kind, cfg.linear_mixer)(cfg, kernel_backend)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BTD, position_ids_BT, state=None, use_cache=False):
        h, state = self.mixer(self.mixer_norm(x_BTD), position_ids_BT, state, use_cache)
        x_BTD = x_BTD + h
        return x_BTD + self.ffn(self.ffn_norm(x_BTD)), state


class HylasLM(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str = "auto"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind, kernel_backend) for kind in cfg.pattern)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 L)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                continue  # norms keep their ones
            scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers) if scaled else std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool = False,
        logits: bool = True,
    ) -> LMOutput:
        """input_ids, labels, position_ids: [B, T] int64; labels hold the next token or -100.

        The loss is the mean cross-entropy over the tokens whose label is not -100.
        With ``use_cache`` the returned cache continues from ``cache`` (or from empty).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        states = cache.states if cache is not None else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block(x, position_ids, state, use_cache)
            new_states.append(state)
        x = self.norm(x)
        out = LMOutput(logits=None)
        if use_cache:
            out.cache = HybridCache(new_states, past + T)
        if labels is not None:
            out.loss = self.loss(x, labels)
        if logits:
            out.logits = self.lm_head(x)[..., : self.cfg.vocab_size]
        return out

    def loss(self, x_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x_BTD)[..., : self.cfg.vocab_size]
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
