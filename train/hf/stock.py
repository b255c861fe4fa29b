"""Stock transformers architectures for the Hylas models whose math is theirs exactly.

An export of such a model loads with no remote code at all (docs/architecture.md,
"Hugging Face export"):

    softmax attention only, dense FFN, no window, no QK-norm      LlamaForCausalLM
    the same with QK-norm                                         Qwen3ForCausalLM
    softmax only, MoE in every layer, softmax router, no shared
        experts, dropless, no QK-norm                             MixtralForCausalLM
    softmax only, QK-norm, MoE (dense layers as mlp_only_layers),
        softmax router, no shared experts, dropless               Qwen3MoeForCausalLM

Everything else (linear layers, windows, shared experts, sigmoid routers, capacity
factors) is Hylas's own type. The parameters map one to one: Hylas's
``blocks.i.mixer.q_proj`` is ``model.layers.i.self_attn.q_proj``, and so on; a MoE layer's
stacked experts (w_gate, w_up [E, D, F], w_down [E, F, D]) are transformers' fused
gate_up_proj [E, 2F, D] and down_proj [E, D, F]. The embedding keeps only the
tokenizer's rows (Hylas pads it to a multiple of 64; the pad rows are never read).
"""

from __future__ import annotations

import re

import torch

from hylas.model.config import ModelConfig

# Hylas name -> transformers name, per block (``{i}`` the layer index); the rest below.
_BLOCK = {
    "mixer_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "mixer.q_norm.weight": "self_attn.q_norm.weight",
    "mixer.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def stock_architecture(cfg: ModelConfig) -> tuple[str | None, str]:
    """(the transformers class an export uses, or None for Hylas's own type; why)."""
    if "L" in cfg.pattern:
        return None, f"linear layers ({cfg.linear_mixer}, pattern {cfg.pattern})"
    if cfg.attention.window:
        return None, f"a sliding window of {cfg.attention.window}"
    moe = cfg.moe
    if not moe.num_experts:
        if cfg.attention.qk_norm:
            return "Qwen3ForCausalLM", "softmax attention with QK-norm and dense feed-forwards"
        return "LlamaForCausalLM", "softmax attention and dense feed-forwards"
    if moe.shared_experts:
        return None, f"{moe.shared_experts} shared expert(s)"
    if moe.router != "softmax":
        return None, f"a {moe.router} router"
    if moe.capacity_factor:
        return None, f"a capacity factor of {moe.capacity_factor} (tokens dropped)"
    if cfg.attention.qk_norm:
        return "Qwen3MoeForCausalLM", "QK-norm and a softmax top-k router, dropless"
    if "D" in cfg.ffn_pattern:
        return None, f"dense and MoE layers mixed ({cfg.ffn_pattern}) without QK-norm"
    return "MixtralForCausalLM", "MoE in every layer, softmax top-k router, dropless"


def rope_parameters(cfg: ModelConfig) -> dict:
    r = cfg.rope_scaling
    if r.kind == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position,
        }
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def stock_config(arch: str, cfg: ModelConfig, max_positions: int, ids: dict):
    """The transformers config of ``arch`` for ``cfg``; ``ids``: bos/eos/pad token ids."""
    import transformers

    if cfg.rope_scaling.kind == "llama3":
        max_positions = max(max_positions, cfg.rope_scaling.original_max_position + 1)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        hidden_act="silu",
    )
    m = cfg.moe
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            **common, intermediate_size=cfg.ffn_dim, attention_bias=False, mlp_bias=False
        )
    if arch == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(
            **common, intermediate_size=cfg.ffn_dim, attention_bias=False, use_sliding_window=False
        )
    if arch == "MixtralForCausalLM":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=m.d_expert or cfg.ffn_dim,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    if arch == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=cfg.ffn_dim,
            moe_intermediate_size=m.d_expert or cfg.ffn_dim,
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, k in enumerate(cfg.ffn_pattern) if k == "D"],
            attention_bias=False,
            use_sliding_window=False,
        )
    raise ValueError(f"no stock mapping named {arch}")


def to_stock_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hylas's state dict (parameters) in transformers' stock names."""
    out = {}
    V = cfg.vocab_size
    for name, t in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if name in _TOP:
            out[_TOP[name]] = t[:V] if name == "embed.weight" else t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t[:V]
        elif m and m[2] in _BLOCK:
            out[f"model.layers.{m[1]}.{_BLOCK[m[2]]}"] = t
        elif m and m[2] == "ffn.experts.w_gate":
            up = state[f"blocks.{m[1]}.ffn.experts.w_up"]
            fused = torch.cat((t.transpose(1, 2), up.transpose(1, 2)), dim=1)
            out[f"model.layers.{m[1]}.mlp.experts.gate_up_proj"] = fused.contiguous()
        elif m and m[2] == "ffn.experts.w_down":
            out[f"model.layers.{m[1]}.mlp.experts.down_proj"] = t.transpose(1, 2).contiguous()
        elif m and m[2] == "ffn.experts.w_up":
            continue  # fused with w_gate above
        else:
            raise ValueError(f"{name} has no place in a stock transformers model")
    return out


def from_stock_state(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str
) -> dict[str, torch.Tensor]:
    """The inverse of ``to_stock_state``: transformers' names -> Hylas's, the embedding
    padded with zero rows to Hylas's multiple of 64. A tensor Hylas has no place for is
    refused by name."""
    inverse_block = {v: k for k, v in _BLOCK.items()}
    inverse_top = {v: k for k, v in _TOP.items()}
    out = {}
    for name, t in hf.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if name in inverse_top:
            out[inverse_top[name]] = _pad_rows(t, cfg) if "embed" in name else t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = _pad_rows(t, cfg)
        elif m and m[2] in inverse_block:
            out[f"blocks.{m[1]}.{inverse_block[m[2]]}"] = t
        elif m and m[2] == "mlp.experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            out[f"blocks.{m[1]}.ffn.experts.w_gate"] = gate.transpose(1, 2).contiguous()
            out[f"blocks.{m[1]}.ffn.experts.w_up"] = up.transpose(1, 2).contiguous()
        elif m and m[2] == "mlp.experts.down_proj":
            out[f"blocks.{m[1]}.ffn.experts.w_down"] = t.transpose(1, 2).contiguous()
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        else:
            raise ValueError(f"{where}: the weight {name} has no place in a Hylas model")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _pad_rows(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    pad = cfg.padded_vocab_size - t.shape[0]
    return torch.cat((t, t.new_zeros(pad, *t.shape[1:]))) if pad > 0 else t
