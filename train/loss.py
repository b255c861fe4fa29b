"""The training objective, written once: the next-token cross-entropy over the target
tokens and the MoE auxiliary terms (load balance and router z-loss).

The model computes hidden states (or logits) and router statistics; the trainer, the
held-out evaluation, the recall probe and the benchmarks turn them into losses here
(docs/architecture.md, "The loss"). Labels hold each position's next token, or
``IGNORE_INDEX`` where there is none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hylas.configs.base import IGNORE_INDEX
from hylas.model.config import MoEConfig
from hylas.model.decoder import HylasLM, LMOutput
from hylas.model.moe import RouterStats

# Target tokens per LM-head chunk when the loss is computed from hidden states: beyond one
# chunk each chunk's logits are recomputed in the backward instead of kept, so the
# [tokens, vocab] logits never exist whole (docs/architecture.md, "The chunked LM head").
LOSS_CHUNK = 4096


def count_targets(labels: torch.Tensor) -> int:
    """The positions that have a target (a host read of one number)."""
    return int((labels != IGNORE_INDEX).sum())


def cross_entropy_sum(model: HylasLM, out: LMOutput, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy (fp32) over the target positions of ``labels``
    [B, T]: from ``out.logits`` when the forward made them, else from ``out.hidden`` through
    the model's LM head, ``LOSS_CHUNK`` targets at a time."""
    if out.logits is not None:
        return F.cross_entropy(
            out.logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    assert out.hidden is not None, "a forward with logits=False returns the hidden states"
    keep = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    x = out.hidden.flatten(0, 1).index_select(0, keep)
    y = labels.flatten().index_select(0, keep)

    def head_sum(x_ND: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(x_ND).float(), y_N, reduction="sum")

    if len(y) <= LOSS_CHUNK:
        return head_sum(x, y)
    total = x.new_zeros((), dtype=torch.float32)
    for lo in range(0, len(y), LOSS_CHUNK):
        part = (x[lo : lo + LOSS_CHUNK], y[lo : lo + LOSS_CHUNK])
        total = total + checkpoint(head_sum, *part, use_reentrant=False)
    return total


def moe_aux(stats: RouterStats, moe: MoEConfig) -> torch.Tensor:
    """One MoE layer's weighted auxiliary loss: aux_loss_coef x the load-balance term plus
    z_loss_coef x the router z-loss (``RouterStats.aux_loss`` / ``z_loss``)."""
    return moe.aux_loss_coef * stats.aux_loss() + moe.z_loss_coef * stats.z_loss()


def lm_loss(model: HylasLM, out: LMOutput, labels: torch.Tensor) -> torch.Tensor:
    """The single-process objective: the mean cross-entropy over the targets plus every MoE
    layer's weighted auxiliary loss (the recall probe, the benchmarks)."""
    loss = cross_entropy_sum(model, out, labels) / count_targets(labels)
    for s in out.moe_stats:
        loss = loss + moe_aux(s, model.cfg.moe)
    return loss


def pooled_moe_aux(
    stats: list[RouterStats],
    moe: MoEConfig,
    all_reduce: Callable[[torch.Tensor], object],
) -> tuple[torch.Tensor, list[RouterStats]]:
    """This rank's share of the MoE auxiliary losses of a micro-batch split over ranks, and
    each layer's statistics pooled over them.

    Expert counts and token totals are summed over every rank first (``all_reduce``, in
    place), so that the load-balance term E sum_e f_e P_e uses the whole batch's f_e, as one
    process would; a rank's term over its own probabilities then sums over ranks to the
    pooled loss.
    """
    counts = torch.stack([s.counts.float() for s in stats])
    sums = torch.stack([s.prob_sum.detach() for s in stats])
    extra = torch.tensor(
        [[s.tokens, s.dropped, s.z_sum.item()] for s in stats], device=counts.device
    )
    pooled = torch.cat([counts, sums, extra], dim=1)
    all_reduce(pooled)
    E = counts.shape[1]
    shares, result = [], []
    for i, s in enumerate(stats):
        tokens = int(pooled[i, 2 * E].item())
        shares.append(
            moe_aux(RouterStats(pooled[i, :E], s.prob_sum, s.z_sum, tokens, s.top_k), moe)
        )
        result.append(
            RouterStats(
                pooled[i, :E],
                pooled[i, E : 2 * E],
                pooled[i, 2 * E + 2],
                tokens,
                s.top_k,
                int(pooled[i, 2 * E + 1].item()),
            )
        )
    return torch.stack(shares).sum(), result
