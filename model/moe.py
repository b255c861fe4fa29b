"""Mixture-of-Experts feed-forward: a top-k router over SwiGLU experts, dropless by default.

Legend: N tokens (B * T flattened), D d_model, E experts, F an expert's hidden size,
k experts per token, A = N * k token-expert assignments.

Router (fp32): logits = x W_r [N, E]; scores = softmax(logits) or sigmoid(logits); each
token takes its k best experts, with weights = their scores normalised to sum to 1.

Experts: the A assignments are sorted by expert (a stable sort, so each expert sees its
tokens in order), each expert's contiguous slice goes through its SwiGLU, and the
results, times the router weights, are added back to their tokens. On CUDA (compute
capability 9.0 or newer) with bf16 inputs the slices run as one grouped matmul
(``torch._grouped_mm``); elsewhere, one matmul per expert over its slice, which is exact
and does no padding. With a capacity
factor c > 0 an expert keeps at most ceil(c * A / E) assignments (the first in token
order) and the rest are dropped (their tokens get nothing from that expert); the
dropped fraction is reported.

Auxiliary losses, from the step's statistics (``RouterStats``), so that a caller can sum
the statistics over micro-batches and ranks before forming them:
    load balancing (Switch Transformer): E * sum_e f_e P_e, f_e = the fraction of the
        assignments that went to e, P_e = the mean over tokens of e's probability
        (softmax, or the sigmoid scores normalised over experts);
    router z-loss (ST-MoE): the mean over tokens of logsumexp(logits)^2.

Shared experts (DeepSeekMoE / Qwen MoE) are one always-on SwiGLU of ``shared * F``
hidden units added to every token's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.layers import SwiGLU, init_normal


@dataclass
class RouterStats:
    """Sums over the tokens of one forward; add two of them to pool micro-batches."""

    counts: torch.Tensor  # [E] assignments per expert (before dropping), no gradient
    prob_sum: torch.Tensor  # [E] sum over tokens of each expert's probability (with grad)
    z_sum: torch.Tensor  # sum over tokens of logsumexp(logits)^2 (with grad)
    tokens: int
    top_k: int
    dropped: int = 0  # assignments dropped by the capacity factor

    def __add__(self, other: RouterStats) -> RouterStats:
        return RouterStats(
            self.counts + other.counts,
            self.prob_sum + other.prob_sum,
            self.z_sum + other.z_sum,
            self.tokens + other.tokens,
            self.top_k,
            self.dropped + other.dropped,
        )

    def aux_loss(self) -> torch.Tensor:
        """Switch load balancing: E * sum_e f_e P_e (1.0 when perfectly balanced)."""
        E = self.counts.numel()
        f = self.counts.float() / (self.tokens * self.top_k)
        P = self.prob_sum / self.tokens
        return E * (f * P).sum()

    def z_loss(self) -> torch.Tensor:
        return self.z_sum / self.tokens

    def load_imbalance(self) -> float:
        """max over experts of assignments / the mean (1.0 = perfectly balanced)."""
        return (self.counts.max() / self.counts.float().mean()).item()

    def dropped_fraction(self) -> float:
        return self.dropped / (self.tokens * self.top_k)


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, score: str = "softmax"):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"the router score must be softmax or sigmoid, got {score!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
        self.top_k, self.score = top_k, score
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)  # for a MoE built alone; HylasLM re-sets it

    def init_weights(self, gen: torch.Generator, std: float) -> None:
        init_normal(self.weight, std, gen)

    def forward(self, x_ND: torch.Tensor):
        """-> (weights [N, k] fp32, experts [N, k] int64, RouterStats)."""
        logits = F.linear(x_ND.float(), self.weight.float())  # [N, E]
        if self.score == "softmax":
            scores = logits.softmax(-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        top, experts = scores.topk(self.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=logits.shape[-1])
        stats = RouterStats(
            counts=counts,
            prob_sum=probs.sum(0),
            z_sum=torch.logsumexp(logits, -1).pow(2).sum(),
            tokens=x_ND.shape[0],
            top_k=self.top_k,
        )
        return weights, experts, stats


def _grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm with a backward: CUDA, bf16, compute capability 9.0 or newer."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: w_gate, w_up [E, D, F], w_down [E, F, D]."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)  # for a MoE built alone; HylasLM re-sets it

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        """Normal(0, std) w_gate and w_up; ``out_std`` for w_down, which writes the residual."""
        init_normal(self.w_gate, std, gen)
        init_normal(self.w_up, std, gen)
        init_normal(self.w_down, out_std, gen)

    def forward(self, x_AD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x sorted by expert, ``counts[e]`` rows for expert e -> [A, D]."""
        if _grouped_mm_available(x_AD):  # one call for all experts, no host sync
            offs = counts.cumsum(0).to(torch.int32)
            g = torch._grouped_mm(x_AD, self.w_gate.to(x_AD.dtype), offs=offs)
            u = torch._grouped_mm(x_AD, self.w_up.to(x_AD.dtype), offs=offs)
            return torch._grouped_mm(F.silu(g) * u, self.w_down.to(x_AD.dtype), offs=offs)
        outs = []
        for e, xe in enumerate(torch.split(x_AD, counts.tolist())):
            if xe.shape[0]:
                h = F.silu(xe @ self.w_gate[e].to(xe.dtype)) * (xe @ self.w_up[e].to(xe.dtype))
                outs.append(h @ self.w_down[e].to(xe.dtype))
        return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)


class MoE(nn.Module):
    """The MoE feed-forward of a block; ``last_stats`` holds the latest forward's RouterStats."""

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        top_k: int,
        shared_experts: int = 0,
        router: str = "softmax",
        capacity_factor: float = 0.0,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = Router(d_model, n_experts, top_k, router)
        self.experts = Experts(n_experts, d_model, d_expert)
        self.shared = SwiGLU(d_model, shared_experts * d_expert) if shared_experts else None
        self.last_stats: RouterStats | None = None

    def init_weights(self, gen: torch.Generator, std: float, out_std: float) -> None:
        self.router.init_weights(gen, std)
        self.experts.init_weights(gen, std, out_std)
        if self.shared is not None:
            self.shared.init_weights(gen, std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        N = x_ND.shape[0]
        weights, experts, stats = self.router(x_ND)
        flat = experts.flatten()  # [A], assignment a = token a // k
        order = torch.sort(flat, stable=True).indices
        counts = stats.counts
        token = order // self.top_k
        weight = weights.flatten()[order]
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * N * self.top_k / self.n_experts)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - starts[flat[order]]
            keep = rank < capacity
            stats.dropped = int((~keep).sum())
            token, weight = token[keep], weight[keep]
            counts = counts.clamp(max=capacity)
        out = self.experts(x_ND[token], counts)
        y = out.new_zeros(x_ND.shape).index_add_(0, token, out * weight.unsqueeze(-1).to(out.dtype))
        if self.shared is not None:
            y = y + self.shared(x_ND)
        self.last_stats = stats
        return y.view(shape)

    def num_active_parameters(self) -> int:
        """Parameters one token uses: the router, k experts and the shared experts."""
        per_expert = self.experts.w_gate[0].numel() * 3
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared else 0
        return self.router.weight.numel() + self.top_k * per_expert + shared
