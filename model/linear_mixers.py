"""Linear mixers: one shared wrapper, and each mixer as its gates and its paper's defaults.

The wrapper owns everything the mixers share, under one set of parameter names:
``q_proj``, ``k_proj``, ``v_proj`` (input projections), ``q_conv``, ``k_conv``, ``v_conv``
(short causal convolutions, for mixers that use them; their state resets at document
starts), ``g_proj`` (output gate), ``o_norm`` (per-head RMSNorm) and ``o_proj``. A mixer
subclass names its kernel family, its sizes and feature maps, and computes its gates from
the layer input; it adds parameters only for what differs (a decay, a write strength),
created in ``build_gates`` and set in ``init_gates``.

Heads: q and k have ``n_heads`` heads; v (and the state) may have more, ``linear_v_heads``
(a multiple of n_heads, as in Qwen3-Next's Gated DeltaNet); each q/k head then serves
``linear_v_heads / n_heads`` value heads.

A linear layer's cache entry is ``(state [B, Hv, K, V] fp32, conv tails or None)``:
constant in sequence length.

Legend: B batch, T tokens, D d_model, H q/k heads, Hv value heads, K / V head sizes.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hylas.configs.base import ConfigError
from hylas.kernels import (
    delta_rule,
    gated_delta_rule,
    gated_deltaproduct,
    gla,
    linear_attn,
    simple_gla,
)
from hylas.kernels.gpu_limits import MAX_HEAD_SIZE, check_head_sizes
from hylas.model.conv import ShortConv
from hylas.model.layers import RMSNorm, init_normal, init_value

if TYPE_CHECKING:
    from hylas.model.config import ModelConfig

# Decoding steps of at most this many tokens run the per-token recurrence.
RECURRENT_MAX_TOKENS = 16

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu_p1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "silu": F.silu,
}


class LinearMixer(nn.Module):
    name: str  # the registry name, set by _register
    family: ModuleType | None = None  # the kernel module (hylas.kernels.<family>)
    expand_k = 0.5  # default key size of the layer = expand_k * d_model (model.linear_head_k)
    expand_v = 1.0  # default value size = expand_v * d_model (model.linear_head_v)
    use_short_conv = False
    feature_map = "identity"  # applied to q and k after the (optional) convolution
    l2_norm_qk = False  # delta-rule mixers: unit-norm q and k
    norm_before_gate = True  # o_norm(o) * silu(g); False: o_norm(o * silu(g)) (Mamba2)
    householder = False  # True: each token takes model.num_householder steps, each with
    # its own k and v (k_proj and v_proj are that many times wider; q, g and o are not)
    scale: float | None = None  # None: K ** -0.5

    def __init__(self, cfg: ModelConfig, kernel_backend: str = "auto"):
        super().__init__()
        self.kernel_backend = kernel_backend
        self.n_heads = cfg.n_heads
        self.n_v_heads = cfg.linear_v_heads or cfg.n_heads
        key_dim, value_dim = self.widths(cfg)
        self.head_k, self.head_v = key_dim // self.n_heads, value_dim // self.n_v_heads
        self.steps = cfg.num_householder if self.householder else 1  # k and v per token
        self.q_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.steps * key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.steps * value_dim, bias=False)
        self.convs = self.use_short_conv and cfg.conv_size > 1
        if self.convs:
            self.q_conv = ShortConv(key_dim, cfg.conv_size)
            self.k_conv = ShortConv(self.steps * key_dim, cfg.conv_size)
            self.v_conv = ShortConv(self.steps * value_dim, cfg.conv_size)
        self.g_proj = nn.Linear(cfg.d_model, value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, cfg.d_model, bias=False)
        self.build_gates(cfg)

    @classmethod
    def widths(cls, cfg: ModelConfig) -> tuple[int, int]:
        """(key width, value width) of the layer: n_heads x ``model.linear_head_k`` and
        value heads x ``model.linear_head_v`` where set, else the mixer's fractions of d_model."""
        hv = cfg.linear_v_heads or cfg.n_heads
        key_dim = (
            cfg.n_heads * cfg.linear_head_k if cfg.linear_head_k else cfg.d_model * cls.expand_k
        )
        value_dim = hv * cfg.linear_head_v if cfg.linear_head_v else cfg.d_model * cls.expand_v
        return int(key_dim), int(value_dim)

    @classmethod
    def check(cls, cfg: ModelConfig) -> None:
        """Refuse sizes this mixer cannot build, with one sentence."""
        hv = cfg.linear_v_heads or cfg.n_heads
        key_dim, value_dim = cls.widths(cfg)
        if key_dim % cfg.n_heads or value_dim % hv:
            raise ConfigError(
                f"{cls.name}: key size {key_dim} and value size {value_dim} must divide into "
                f"{cfg.n_heads} q/k heads and {hv} value heads"
            )
        try:  # refused here, not at the first backward on a GPU
            limit = cls.family.SPEC.max_head_size if cls.family else MAX_HEAD_SIZE
            check_head_sizes(cls.name, key_dim // cfg.n_heads, value_dim // hv, limit)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        """Normal(0, std) projections, ``out_std`` for o_proj, short convs as nn.Conv1d,
        o_norm one, then the mixer's own gates."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_normal(proj.weight, std, gen)
        if self.convs:
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                conv.init_weights(gen)
        init_normal(self.g_proj.weight, std, gen)
        self.o_norm.init_weights()
        init_normal(self.o_proj.weight, out_std, gen)
        self.init_gates(gen, std)

    # -- what a mixer supplies -------------------------------------------------------------
    def build_gates(self, cfg: ModelConfig) -> None:
        """Create the mixer's own parameters and buffers (none by default)."""

    def init_gates(self, gen: torch.Generator, std: float) -> None:
        """Set what ``build_gates`` created."""

    def gates(self, x_BTD, q, k, v):
        """The kernel family's gate tensors after v, and q, k, v (possibly changed); q and k
        arrive with one head per value head."""
        return (), q, k, v

    def extra_output(self, o, v):
        """Added to the kernel's output before the norm (Mamba2's D skip)."""
        return o

    # -- the shared path -------------------------------------------------------------------
    def forward(self, x_BTD, position_ids_BT=None, state=None, use_cache=False, seq=None):
        """seq: the packing of the batch (``decoder.Packing``) or None; state: the cache entry."""
        B, T, _ = x_BTD.shape
        rec_state, tails = state if state is not None else (None, None)
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        new_tails = None
        if self.convs:
            tails = tails or (None, None, None)
            (q, tq), (k, tk), (v, tv) = (
                conv(x, seq, tail)
                for conv, x, tail in zip(
                    (self.q_conv, self.k_conv, self.v_conv), (q, k, v), tails, strict=True
                )
            )
            new_tails = (tq, tk, tv)
        fm = FEATURE_MAPS[self.feature_map]
        q = fm(q.view(B, T, self.n_heads, self.head_k))
        k = fm(k.view(B, T, self.steps * self.n_heads, self.head_k))  # steps x heads, in order
        v = v.view(B, T, self.steps * self.n_v_heads, self.head_v)
        if self.l2_norm_qk:
            q, k = (
                F.normalize(q.float(), dim=-1).to(q.dtype),
                F.normalize(k.float(), dim=-1).to(k.dtype),
            )
        if self.n_v_heads != self.n_heads:  # each q/k head serves n_v_heads / n_heads heads
            rep = self.n_v_heads // self.n_heads
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        gates, q, k, v = self.gates(x_BTD, q, k, v)
        if seq is not None and seq.keep is not None:  # padded: a pad writes and forgets nothing
            k, gates = self.skip_pads(seq.keep, k, gates)
        o, new_state = self.kernel(q, k, v, gates, rec_state, use_cache, seq)
        o = self.extra_output(o, v)
        gate = F.silu(self.g_proj(x_BTD).view(B, T, self.n_v_heads, self.head_v))
        if self.norm_before_gate:
            o = self.o_norm(o) * gate
        else:
            o = self.o_norm(o * gate)
        out = self.o_proj(o.reshape(B, T, -1))
        return out, ((new_state, new_tails) if use_cache else None)

    @staticmethod
    def skip_pads(keep_BT, k, gates):
        """k = 0 and every gate 0 at pad tokens: a log decay of 0 keeps the state, a write
        strength (beta) of 0 writes nothing, so S_t = S_{t-1} across a pad in every family."""
        keep = keep_BT.view(*keep_BT.shape, *[1] * (k.dim() - 2))  # k: [B, T, (steps,) H, K]
        k = k * keep.to(k.dtype)
        gates = tuple(
            g * keep.view(*keep_BT.shape, *[1] * (g.dim() - 2)).to(g.dtype) for g in gates
        )
        return k, gates

    def sequence_flops(self, seq_len: int) -> float:
        """The chunkwise kernel's forward work per token, per value head as its family
        counts it (``FamilySpec.flops_per_token``, once per step of a Householder mixer);
        short convs add 2 W per channel."""
        assert self.family is not None  # every registered mixer names its family
        # several steps a token: the kernel runs over steps x T micro-steps
        steps = self.steps
        per_head = steps * self.family.SPEC.flops_per_token(
            self.head_k, self.head_v, steps * seq_len
        )
        conv = 0
        if self.convs:
            width = (1 + steps) * self.n_heads * self.head_k + steps * self.n_v_heads * self.head_v
            conv = 2 * self.q_conv.width * width
        return float(self.n_v_heads * per_head + conv)

    def kernel(self, q, k, v, gates, state, use_cache, seq):
        """The family's kernel on q, k, v [B, T, H, K|V] and the gates: (o, the new state
        when ``use_cache``). The seam sequence parallelism overrides (``hylas.parallel.sp``)."""
        B, T = q.shape[:2]
        family = self.family
        assert family is not None, f"{type(self).__name__} names no kernel family"
        if state is not None and T <= RECURRENT_MAX_TOKENS:
            return family.recurrent(
                q, k, v, *gates, scale=self.scale, initial_state=state, backend=self.kernel_backend
            )
        if seq is not None and seq.docs is not None:  # packed: one row, states restart
            if use_cache:
                raise ValueError("decoding caches are for unpacked batches; drop cu_seqlens")
            flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, *gates)]
            o, _ = family.chunk(
                *flat, scale=self.scale, cu_seqlens=seq.docs, backend=self.kernel_backend
            )
            return o.view(B, T, *o.shape[2:]), None
        return family.chunk(
            q,
            k,
            v,
            *gates,
            scale=self.scale,
            initial_state=state,
            output_final_state=use_cache,
            backend=self.kernel_backend,
        )


# Name -> class of every linear mixer (``hylas.model.registry`` reads it).
LINEAR_MIXERS: dict[str, type[LinearMixer]] = {}


def _register(name):
    def add(cls):
        cls.name = name
        LINEAR_MIXERS[name] = cls
        return cls

    return add


@_register("linear_attention")
class LinearAttention(LinearMixer):
    """Linear attention (Katharopoulos et al. 2020): no decay, a positive feature map on q
    and k (``model.feature_map``, elu + 1 by default). The output norm replaces the
    paper's normaliser, as in TransNormer."""

    family = linear_attn
    expand_k = 1.0

    def build_gates(self, cfg):
        self.feature_map = cfg.feature_map


def _fixed_decay(name: str, n_heads: int, device: torch.device | str | None) -> torch.Tensor:
    h = torch.arange(n_heads, dtype=torch.float64, device=device)
    if name == "retnet":  # gamma_h = 1 - 2^(-5 - h)
        return torch.log1p(-(2.0 ** (-5.0 - h))).float()
    # lightning: the ALiBi slopes s_h = 2^(-8 (h + 1) / H), decay exp(-s_h)
    return (-(2.0 ** (-8.0 * (h + 1) / n_heads))).float()


class _FixedDecay(LinearMixer):
    family = simple_gla
    log_decay: torch.Tensor  # a buffer (register_buffer in build_gates)

    def build_gates(self, cfg):
        log_decay = _fixed_decay(self.name, self.n_v_heads, device=None)  # usable at once
        self.register_buffer("log_decay", log_decay, persistent=False)

    def init_gates(self, gen, std):
        self.init_buffers()

    def init_buffers(self):
        """The fixed decays, from the config (a buffer that no checkpoint holds)."""
        init_value(self.log_decay, _fixed_decay(self.name, self.n_v_heads, device="cpu"))

    def gates(self, x_BTD, q, k, v):
        B, T = x_BTD.shape[:2]
        return (self.log_decay.expand(B, T, -1),), q, k, v


@_register("lightning")
class Lightning(_FixedDecay):
    """Lightning attention (TransNormerLLM, Qin et al. 2023/2024): a fixed decay per head,
    exp(-s_h) with the ALiBi slopes s_h = 2^(-8 (h + 1) / H), and silu on q and k."""

    expand_k = 1.0
    feature_map = "silu"


@_register("retnet")
class RetNet(_FixedDecay):
    """Retention (RetNet, Sun et al. 2023): a fixed decay per head, gamma_h = 1 - 2^(-5-h),
    value size 2 d_model, swish output gate and per-head norm (xPos is not applied)."""

    expand_k = 1.0
    expand_v = 2.0


@_register("gla")
class GLA(LinearMixer):
    """Gated Linear Attention (Yang et al. 2024): a low-rank data-dependent per-channel
    forget gate, gk = logsigmoid(W2 W1 x + b) / 16 (the paper's normaliser)."""

    family = gla
    gate_rank = 16
    gate_normaliser = 16.0

    def build_gates(self, cfg):
        self.gk_proj = nn.Sequential(
            nn.Linear(cfg.d_model, self.gate_rank, bias=False),
            nn.Linear(self.gate_rank, self.n_heads * self.head_k, bias=True),
        )

    def init_gates(self, gen, std):
        down, up = self.gk_proj
        assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear)  # as build_gates made
        init_normal(down.weight, std, gen)
        init_normal(up.weight, std, gen)
        init_value(up.bias, 0.0)

    def gates(self, x_BTD, q, k, v):
        B, T, _ = x_BTD.shape
        gk = F.logsigmoid(self.gk_proj(x_BTD).float()) / self.gate_normaliser
        gk = gk.view(B, T, self.n_heads, self.head_k)
        if self.n_v_heads != self.n_heads:
            gk = gk.repeat_interleave(self.n_v_heads // self.n_heads, dim=2)
        return (gk,), q, k, v


@_register("hgrn2")
class HGRN2(LinearMixer):
    """HGRN2 (Qin et al. 2024): gated linear RNN with state expansion. k_proj is the forget
    gate's projection: f = sigmoid(k_proj x), key = 1 - f and log decay log f, per channel
    (the paper's lower bound on f is 0 here)."""

    family = gla

    def gates(self, x_BTD, q, k, v):
        gk = F.logsigmoid(k.float())  # log f
        key = -torch.expm1(gk)  # 1 - f
        return (gk,), q, key.to(q.dtype), v


def _dt_bias(
    n: int,
    gen: torch.Generator | None,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """Mamba's dt bias: softplus(bias) log-uniform in [dt_min, dt_max]."""
    u = torch.rand(n, generator=gen, device=device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


class _SSMDecay(LinearMixer):
    """A per-head data-dependent decay g = -exp(A_log) softplus(a_proj x + dt_bias)."""

    def build_gates(self, cfg):
        self.a_proj = nn.Linear(cfg.d_model, self.n_v_heads, bias=False)
        # drawn from torch's global generator, as nn.Linear's weights are, so a mixer built
        # alone is usable; HylasLM.init_weights sets them from its seed
        self.A_log = nn.Parameter(torch.empty(self.n_v_heads).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(_dt_bias(self.n_v_heads, None, device=None))

    def init_gates(self, gen, std):
        """A ~ Uniform(1, 16), stored as its log; dt_bias as Mamba's."""
        init_normal(self.a_proj.weight, std, gen)
        A = torch.empty(self.n_v_heads, device="cpu").uniform_(1, 16, generator=gen)
        init_value(self.A_log, A.log())
        init_value(self.dt_bias, _dt_bias(self.n_v_heads, gen))

    def _dt_and_decay(self, x_BTD):
        dt = F.softplus(self.a_proj(x_BTD).float() + self.dt_bias)
        return dt, -self.A_log.float().exp() * dt


@_register("mamba2")
class Mamba2(_SSMDecay):
    """Mamba2 in its SSD form (Dao & Gu 2024): S_t = exp(dt_t A) S_{t-1} + dt_t B_t^T x_t,
    y_t = C_t S_t + D x_t, with C = q, B = k, x = v, a short conv on all three, a gated
    RMSNorm (norm after the gate) and no 1/sqrt(K) scale; value size 2 d_model."""

    family = simple_gla
    expand_v = 2.0
    use_short_conv = True
    norm_before_gate = False
    scale = 1.0

    def build_gates(self, cfg):
        super().build_gates(cfg)
        self.D = nn.Parameter(torch.ones(self.n_v_heads))

    def init_gates(self, gen, std):
        super().init_gates(gen, std)
        init_value(self.D, 1.0)

    def gates(self, x_BTD, q, k, v):
        dt, g = self._dt_and_decay(x_BTD)
        k = (k.float() * dt.unsqueeze(-1)).to(k.dtype)
        return (g,), q, k, v

    def extra_output(self, o, v):
        return o + (self.D.unsqueeze(-1) * v.float()).to(o.dtype)


class _Delta(LinearMixer):
    """Shared by the delta-rule mixers: short convs, unit-norm q and k, a write strength
    beta = sigmoid(b_proj x), times 2 with ``model.allow_neg_eigval`` (eigenvalues of the
    transition in [-1, 1], for state tracking)."""

    expand_k = 1.0
    use_short_conv = True
    l2_norm_qk = True
    supports_neg_eigval = True

    def build_gates(self, cfg):
        self.b_proj = nn.Linear(cfg.d_model, self.n_v_heads, bias=False)
        self.beta_max = 2.0 if cfg.allow_neg_eigval else 1.0

    def init_gates(self, gen, std):
        init_normal(self.b_proj.weight, std, gen)

    def beta(self, x_BTD):
        return self.beta_max * torch.sigmoid(self.b_proj(x_BTD).float())


@_register("deltanet")
class DeltaNet(_Delta):
    """DeltaNet (Schlag et al. 2021; chunkwise training as in Yang et al. 2024)."""

    family = delta_rule

    def gates(self, x_BTD, q, k, v):
        return (self.beta(x_BTD),), q, k, v


@_register("gated_deltanet")
class GatedDeltaNet(_Delta, _SSMDecay):
    """Gated DeltaNet (Yang et al. 2025): the delta rule with Mamba2's data-dependent decay
    g = -exp(A_log) softplus(a_proj x + dt_bias); key size 0.75 d_model and value size
    1.5 d_model (the paper's 6 heads of 256 over 2048, keys half of values)."""

    family = gated_delta_rule
    expand_k = 0.75
    expand_v = 1.5

    def build_gates(self, cfg):
        _Delta.build_gates(self, cfg)
        _SSMDecay.build_gates(self, cfg)

    def init_gates(self, gen, std):
        _Delta.init_gates(self, gen, std)
        _SSMDecay.init_gates(self, gen, std)

    def gates(self, x_BTD, q, k, v):
        _, g = self._dt_and_decay(x_BTD)
        return (g, self.beta(x_BTD)), q, k, v


@_register("gated_deltaproduct")
class GatedDeltaProduct(GatedDeltaNet):
    """Gated DeltaProduct (Siems et al. 2025): Gated DeltaNet whose tokens each take
    ``model.num_householder`` Householder steps (n_h, default 2), each with its own key,
    value and beta, after one decay. k_proj, v_proj and b_proj are n_h times wider, so
    checkpoints and exports keep Gated DeltaNet's names."""

    family = gated_deltaproduct
    householder = True

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if (cfg.linear_v_heads or cfg.n_heads) != cfg.n_heads:
            raise ConfigError(
                f"gated_deltaproduct takes no model.linear_v_heads ({cfg.linear_v_heads}) other "
                f"than n_heads ({cfg.n_heads})"
            )

    def build_gates(self, cfg):
        super().build_gates(cfg)
        self.b_proj = nn.Linear(cfg.d_model, self.steps * self.n_v_heads, bias=False)

    def gates(self, x_BTD, q, k, v):
        B, T, _ = x_BTD.shape
        _, g = self._dt_and_decay(x_BTD)
        beta = self.beta(x_BTD).view(B, T, self.steps, self.n_v_heads)
        k = k.view(B, T, self.steps, self.n_heads, self.head_k)
        v = v.view(B, T, self.steps, self.n_v_heads, self.head_v)
        return (g, beta), q, k, v
