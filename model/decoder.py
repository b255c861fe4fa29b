"""The hybrid decoder: embedding, a tiled pattern of mixer + FFN blocks, and the LM head.

Legend: B batch, T tokens, D d_model, V padded vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from hylas.kernels.layout import Documents
from hylas.model.layers import RMSNorm, SwiGLU, init_normal
from hylas.model.moe import MoE, RouterStats
from hylas.model.registry import mixer_class

if TYPE_CHECKING:
    from hylas.model.config import ModelConfig


@dataclass
class HybridCache:
    """Per-layer decoding state: a linear layer's (recurrent state [B, Hv, K, V] fp32, conv
    tails or None), a softmax layer's (k, v), each [B, H_kv, tokens, D]."""

    states: list = field(default_factory=list)
    length: int = 0  # tokens seen so far (pads included)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows ``beam_idx`` (beam search), in place."""

        def pick(x):
            if isinstance(x, torch.Tensor):
                return x.index_select(0, beam_idx.to(x.device))
            if isinstance(x, (tuple, list)):
                return type(x)(pick(y) for y in x)
            return x

        self.states = [pick(s) for s in self.states]


@dataclass
class Packing:
    """Where the documents of a batch start, as every layer needs it.

    docs: the documents over the flattened B * T tokens (every document start and every
    sample start), read from ``cu_seqlens`` once per batch and handed to every linear layer
    (``hylas.kernels.layout``); seg_id [B, T]: each token's document (global index);
    seg_pos [B, T]: its offset from its document's start.

    A padded batch (``from_attention_mask``) has no documents: ``keep`` [B, T] is False at
    pad tokens, seg_id is 0 at pads and 1 at real tokens, and ``key_id`` [B, past + T] the
    same over the cached keys too, so a softmax layer never attends to a pad and a linear
    layer skips them (docs/architecture.md, "Padding").
    """

    docs: Documents | None
    seg_id: torch.Tensor
    seg_pos: torch.Tensor
    keep: torch.Tensor | None = None
    key_id: torch.Tensor | None = None

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, T: int) -> Packing:
        """The padding of a batch from its attention mask [B, past + T] (1 = token, 0 = pad),
        past being the tokens already in the cache."""
        key_id = (attention_mask != 0).long()
        seg_id = key_id[:, -T:]
        seg_pos = (key_id.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        return cls(None, seg_id, seg_pos, keep=seg_id.bool(), key_id=key_id)

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor,
        B: int,
        T: int,
        device: torch.device | None = None,
    ) -> Packing:
        """From ``cu_seqlens`` over the B * T tokens, for tokens on ``device`` (default:
        cu_seqlens's): read to the host once, with no device sync when it is given on the
        host, as the loader makes it."""
        docs = Documents.of(cu_seqlens.view(-1), 1, B * T)
        assert docs is not None
        if not set(range(0, B * T, T)) <= set(docs.offsets):
            raise ValueError("cu_seqlens must include every sample start (multiples of T)")
        device = cu_seqlens.device if device is None else device
        docs = docs.to(device)
        cu = docs.cu_seqlens.long()
        starts = torch.zeros(B * T, dtype=torch.long, device=device)
        starts[cu[:-1]] = 1
        seg_id = starts.cumsum(0) - 1
        seg_pos = torch.arange(B * T, device=device) - cu[seg_id]
        return cls(docs, seg_id.view(B, T), seg_pos.view(B, T))


@dataclass
class LMOutput:
    """What a forward returns: the logits [B, T, vocab] or, with ``logits=False``, the final
    hidden states [B, T, D] (for a loss that runs the LM head in chunks,
    ``hylas.train.loss``); the cache when asked for; each MoE layer's router statistics."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None
    cache: HybridCache | None = None
    moe_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, kernel_backend: str, ffn_kind: str = "D"):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer_class(kind, cfg.linear_mixer)(cfg, kernel_backend)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn: MoE | SwiGLU
        if ffn_kind == "M":
            m = cfg.moe
            self.ffn = MoE(
                cfg.d_model,
                m.d_expert or cfg.ffn_dim,
                m.num_experts,
                m.top_k,
                m.shared_experts,
                m.router,
                m.capacity_factor,
            )
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        self.mixer_norm.init_weights()
        self.mixer.init_weights(gen, std, out_std)
        self.ffn_norm.init_weights()
        self.ffn.init_weights(gen, std, out_std)

    def mixer_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the mixer's sequence term (beyond its projections)."""
        return self.mixer.sequence_flops(seq_len)

    def forward(self, x_BTD, position_ids_BT, state=None, use_cache=False, seq=None):
        h, state = self.mixer(self.mixer_norm(x_BTD), position_ids_BT, state, use_cache, seq)
        x_BTD = x_BTD + h
        return x_BTD + self.ffn(self.ffn_norm(x_BTD)), state


class HylasLM(nn.Module):
    """The hybrid decoder, initialised from ``seed``. Built on the meta device it is left
    empty; ``to_empty`` then ``init_weights(seed)`` give the eager build's values, bit for bit."""

    def __init__(self, cfg: ModelConfig, kernel_backend: str = "auto", *, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, kind, kernel_backend, ffn)
            for kind, ffn in zip(cfg.pattern, cfg.ffn_pattern, strict=True)
        )
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if not self.embed.weight.is_meta:
            self.init_weights(seed)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> HylasLM:
        """nn.Module's, keeping the LM head tied to the embedding."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings:  # from meta, to_empty gives each module a new Parameter
            self.lm_head.weight = self.embed.weight
        return self

    def init_weights(self, seed: int) -> None:
        """Set every parameter and buffer from a generator seeded with ``seed``, module by
        module in a fixed order: Normal(0, init_std) weights, the residual output
        projections (o_proj, down_proj, w_down) scaled by 1/sqrt(2 L), biases zero, norms
        one; short convs, mixer gates and buffers as their modules define them."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        init_normal(self.embed.weight, std, gen)
        for block in self.blocks:
            assert isinstance(block, Block)  # nn.ModuleList hands its items out as nn.Module
            block.init_weights(gen, std, out_std)
        self.norm.init_weights()
        if self.lm_head.weight is not self.embed.weight:
            init_normal(self.lm_head.weight, std, gen)

    def init_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (RoPE frequencies, fixed decays), leaving
        the parameters as they are: for a model whose weights were loaded onto ``to_empty``."""
        for module in self.modules():
            init_buffers = getattr(module, "init_buffers", None)
            if module is not self and init_buffers is not None:
                init_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool = False,
        logits: bool = True,
        attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids, position_ids: [B, T] int64. The model computes; the loss is the
        trainer's (``hylas.train.loss``).

        cu_seqlens (int32 [N + 1] over the flattened B * T tokens, every document and
        sample start) keeps packed documents apart in every layer; position_ids then default
        to each token's offset in its document. With ``use_cache`` the returned cache
        continues from ``cache`` (or from empty); caches are for unpacked batches. With
        ``logits`` False the output holds the final hidden states instead of the logits.

        attention_mask [B, past + T] (1 = token, 0 = pad; past = the cached tokens): pad
        tokens change no layer's state and are never attended to, and position_ids then
        count only the real tokens, so a left-padded row gives what it gives alone. It is
        for unpacked batches.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        seq = None
        if cu_seqlens is not None:
            if cache is not None or use_cache:
                raise ValueError("decoding caches are for unpacked batches; drop cu_seqlens")
            if attention_mask is not None:
                raise ValueError("packed batches (cu_seqlens) take no attention_mask")
            seq = Packing.from_cu_seqlens(cu_seqlens, B, T, input_ids.device)
        elif attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must be [batch, cached + new tokens] = {[B, past + T]}, "
                    f"got {list(attention_mask.shape)}"
                )
            if not bool(attention_mask.all()):  # all ones is the unpadded batch
                seq = Packing.from_attention_mask(attention_mask.to(input_ids.device), T)
        if position_ids is None:
            if seq is not None:
                position_ids = seq.seg_pos
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        states = cache.states if cache is not None else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block(x, position_ids, state, use_cache, seq)
            new_states.append(state)
        x = self.norm(x)
        out = LMOutput(logits=self.logits(x) if logits else None, hidden=None if logits else x)
        if use_cache:
            out.cache = HybridCache(new_states, past + T)
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                assert block.ffn.last_stats is not None  # set by the forward just run
                out.moe_stats.append(block.ffn.last_stats)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states [..., D] -> [..., vocab] (the padded rows of the
        embedding dropped)."""
        return self.lm_head(hidden)[..., : self.cfg.vocab_size]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count (a tied LM head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all but the experts its router does not pick."""
        n = self.num_parameters()
        for m in self.modules():
            if isinstance(m, MoE):
                per_expert = 3 * m.experts.w_gate[0].numel()
                n -= (m.n_experts - m.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (forward + backward = 3x forward), for MFU.

        Forward: 2 x the weights of every matmul (the LM head included, the embedding
        lookup not), plus each mixer's sequence term (softmax: q k^T and attention x v over
        the causal context; linear: the chunkwise kernel's work, see ``mixer_flops``).
        Elementwise work, norms and recomputation are not counted.
        """
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for m in self.modules():  # a MoE layer's router and the k experts a token uses
            if isinstance(m, MoE):
                matmul += m.router.weight.numel() + m.top_k * 3 * m.experts.w_gate[0].numel()
        mixers = 0.0
        for block in self.blocks:
            assert isinstance(block, Block)  # nn.ModuleList hands its items out as nn.Module
            mixers += block.mixer_flops(seq_len)
        forward = 2.0 * matmul + mixers
        return 3.0 * forward
