"""The model's configuration: one small dataclass, validated when it is built."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from hylas.configs.base import ConfigError

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "expand_ratio",
    "ratio_pattern",
]

if TYPE_CHECKING:
    from hylas.model.linear_mixers import LinearMixer


def expand_ratio(ratio: str) -> str:
    """``"3:1"`` -> ``"LLLF"``: ``a`` linear layers then ``b`` softmax layers per group."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio)
    if not m:
        raise ConfigError(f"model.linear_to_full must look like '3:1', got {ratio!r}")
    n_linear, n_full = int(m[1]), int(m[2])
    if n_linear + n_full == 0:
        raise ConfigError("model.linear_to_full cannot be '0:0'; use '1:0' for all linear layers")
    if n_linear and n_full:
        # Smallest group with that ratio: "6:2" -> "LLLF".
        from math import gcd

        d = gcd(n_linear, n_full)
        n_linear, n_full = n_linear // d, n_full // d
    else:
        n_linear, n_full = min(n_linear, 1), min(n_full, 1)
    return "L" * n_linear + "F" * n_full


PLACEMENTS = ("end", "start", "spread")


def ratio_pattern(ratio: str, n_layers: int, placement: str = "end") -> str:
    """The whole-depth layer pattern of a linear:full ratio over ``n_layers`` layers.

    ``end`` and ``start`` tile the smallest group with that ratio (``"3:1"`` -> ``LLLF`` or
    ``FLLL``) over depth; ``spread`` puts the f = n_layers x full / (linear + full) softmax
    layers at floor((j + 1/2) x n_layers / f), j = 0 .. f - 1, evenly over the whole depth.
    A ratio whose group does not divide ``n_layers`` is refused."""
    if placement not in PLACEMENTS:
        raise ConfigError(
            f"the placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}"
        )
    unit = expand_ratio(ratio)
    if n_layers % len(unit):
        raise ConfigError(f"the ratio {ratio} (group {unit}) does not divide {n_layers} layers")
    if placement == "start":
        unit = unit[unit.index("F") :] + unit[: unit.index("F")] if "F" in unit else unit
    full = n_layers // len(unit) * unit.count("F")
    if placement != "spread" or full == 0:
        return unit * (n_layers // len(unit))
    where = {int((j + 0.5) * n_layers / full) for j in range(full)}
    return "".join("F" if i in where else "L" for i in range(n_layers))


@dataclass
class AttentionConfig:
    """The softmax (``F``) layers."""

    window: int = (
        0  # sliding window in tokens (each query sees itself and window - 1 before); 0 = full
    )
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for long context; ``llama3`` is Llama 3.1's (kept exactly, so
    an imported Llama 3.1 gives its own logits)."""

    kind: str = "none"  # none | llama3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forwards (model/moe.py); num_experts 0 = every FFN dense."""

    num_experts: int = 0
    top_k: int = 2
    shared_experts: int = 0  # always-on experts, as one SwiGLU of shared_experts * d_expert
    router: str = "softmax"  # softmax | sigmoid
    capacity_factor: float = 0.0  # 0 = dropless
    aux_loss_coef: float = 0.01  # Switch load balancing, per MoE layer
    z_loss_coef: float = 0.001  # ST-MoE router z-loss, per MoE layer
    d_expert: int | None = None  # an expert's hidden size; None = the dense FFN's
    pattern: str = "M"  # M (MoE) / D (dense) per layer, tiled over depth: "DM" = every other
    first_dense: int = 0  # the first k layers stay dense whatever the pattern


@dataclass
class ModelConfig:
    """A hybrid decoder: a pattern of linear (L) and softmax (F) mixer layers tiled over depth."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # softmax layers; None = n_heads (no GQA)
    vocab_size: int = 4096  # the tokenizer's; the embedding is padded to a multiple of 64
    linear_mixer: str = "gla"
    layer_pattern: str = ""  # e.g. "LLLF"; when set it takes precedence over linear_to_full
    linear_to_full: str = "3:1"
    d_ff: int | None = None  # None = 8/3 d_model rounded up to a multiple of 64 (SwiGLU)
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Linear mixers (model/linear_mixers.py): value heads (None = n_heads; a multiple of it
    # shares each q/k head across several value heads), the q/k and value head sizes (None =
    # the mixer's own default, a fraction of d_model; set them to take a Transformer's
    # attention shapes, as an imported Llama does), short conv width (0 or 1 = off, for
    # mixers that use one), the feature map of linear_attention, beta in [0, 2] for the
    # delta-rule mixers (negative eigenvalues, for state tracking), and the Householder
    # steps each token takes in the mixers that take several (n_h, each its own k, v, beta).
    linear_v_heads: int | None = None
    linear_head_k: int | None = None
    linear_head_v: int | None = None
    conv_size: int = 4
    feature_map: str = "elu_p1"
    allow_neg_eigval: bool = False
    num_householder: int = 2
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    activation_checkpointing: bool = False  # recompute each block in the backward

    def to_dict(self) -> dict:
        """Plain values, nested for ``attention`` and ``moe`` (JSON- and YAML-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The config ``to_dict`` gave, validated; an unknown key is refused by name."""
        data = dict(data)
        parts = {"attention": AttentionConfig, "moe": MoEConfig, "rope_scaling": RopeScalingConfig}
        for name, part in parts.items():
            if isinstance(data.get(name), dict):
                known = {f.name for f in fields(part)}
                unknown = sorted(set(data[name]) - known)
                if unknown:
                    raise ConfigError(f"model.{name} has no key {unknown[0]!r}")
                data[name] = part(**data[name])
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"the model config has no key {unknown[0]!r}")
        return cls(**data).validate()

    @property
    def pattern(self) -> str:
        """The per-layer pattern, one letter per layer (``L`` linear, ``F`` softmax)."""
        unit = self.layer_pattern or expand_ratio(self.linear_to_full)
        return unit * (self.n_layers // len(unit))

    @property
    def ffn_pattern(self) -> str:
        """One letter per layer: ``M`` a MoE feed-forward, ``D`` a dense one."""
        if not self.moe.num_experts:
            return "D" * self.n_layers
        unit = self.moe.pattern
        tiled = (unit * (-(-self.n_layers // len(unit))))[: self.n_layers]
        k = min(self.moe.first_dense, self.n_layers)
        return "D" * k + tiled[k:]

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> ModelConfig:
        from hylas.model.registry import check_linear_mixer

        for name in ("d_model", "n_layers", "n_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"the head size d_model / n_heads = {self.d_model // self.n_heads} must be even for RoPE"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})"
            )
        if self.vocab_size < 260:
            raise ConfigError(
                f"model.vocab_size must be at least 260 (byte fallback needs 256 pieces), got {self.vocab_size}"
            )
        unit = self.layer_pattern or expand_ratio(self.linear_to_full)
        if set(unit) - {"L", "F"}:
            raise ConfigError(
                f"model.layer_pattern may hold only L (linear) and F (softmax), got {unit!r}"
            )
        if self.n_layers % len(unit):
            raise ConfigError(
                f"model.n_layers ({self.n_layers}) must be a multiple of the layer pattern "
                f"{unit!r} (length {len(unit)})"
            )
        if "L" in unit:
            self._validate_linear(check_linear_mixer(self.linear_mixer))
        elif self.allow_neg_eigval:
            raise ConfigError("model.allow_neg_eigval needs linear layers in the layer pattern")
        r = self.rope_scaling
        if r.kind not in ("none", "llama3"):
            raise ConfigError(f"model.rope_scaling.kind must be none or llama3, got {r.kind!r}")
        if r.kind == "llama3" and not (
            r.factor > 0
            and 0 < r.low_freq_factor < r.high_freq_factor
            and r.original_max_position > 0
        ):
            raise ConfigError(
                "model.rope_scaling (llama3) needs factor > 0, 0 < low_freq_factor < "
                "high_freq_factor and original_max_position > 0"
            )
        if self.attention.window < 0:
            raise ConfigError(f"model.attention.window must be >= 0, got {self.attention.window}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ConfigError(f"model.d_ff must be positive, got {self.d_ff}")
        self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        m = self.moe
        if m.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts must be >= 0, got {m.num_experts}")
        if not m.num_experts:
            return
        if not 1 <= m.top_k <= m.num_experts:
            raise ConfigError(
                f"model.moe.top_k must be in [1, model.moe.num_experts = {m.num_experts}], "
                f"got {m.top_k}"
            )
        if m.router not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.moe.router must be softmax or sigmoid, got {m.router!r}")
        if not m.pattern or set(m.pattern) - {"M", "D"}:
            raise ConfigError(
                f"model.moe.pattern may hold only M (MoE) and D (dense), got {m.pattern!r}"
            )
        for name in ("shared_experts", "first_dense"):
            if getattr(m, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(m, name)}")
        for name in ("capacity_factor", "aux_loss_coef", "z_loss_coef"):
            if getattr(m, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(m, name)}")
        if m.d_expert is not None and m.d_expert <= 0:
            raise ConfigError(f"model.moe.d_expert must be positive, got {m.d_expert}")
        if "M" not in self.ffn_pattern:
            raise ConfigError(
                f"model.moe.num_experts = {m.num_experts} but no layer is MoE "
                f"(pattern {m.pattern!r}, first_dense {m.first_dense}, {self.n_layers} layers)"
            )

    def _validate_linear(self, mixer: type[LinearMixer]) -> None:
        from hylas.model.linear_mixers import FEATURE_MAPS

        if self.linear_v_heads is not None and (
            self.linear_v_heads <= 0 or self.linear_v_heads % self.n_heads
        ):
            raise ConfigError(
                f"model.linear_v_heads ({self.linear_v_heads}) must be a positive multiple of "
                f"model.n_heads ({self.n_heads})"
            )
        for name in ("linear_head_k", "linear_head_v"):
            size = getattr(self, name)
            if size is not None and size <= 0:
                raise ConfigError(f"model.{name} must be positive, got {size}")
        if self.conv_size < 0:
            raise ConfigError(f"model.conv_size must be >= 0, got {self.conv_size}")
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"model.feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        if self.num_householder < 1:
            raise ConfigError(f"model.num_householder must be >= 1, got {self.num_householder}")
        if self.allow_neg_eigval and not getattr(mixer, "supports_neg_eigval", False):
            raise ConfigError(
                f"model.allow_neg_eigval is for the delta-rule mixers (deltanet, gated_deltanet), "
                f"not {self.linear_mixer}"
            )
        mixer.check(self)
