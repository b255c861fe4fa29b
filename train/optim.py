"""AdamW's parameter groups (decay only on matrices) and the learning-rate schedules.

The schedule is a pure function of the step, set on the optimizer before each update, so
a checkpoint only needs the step to resume it exactly.
"""

from __future__ import annotations

import math

from torch import nn

from hylas.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices; none on norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at ``step`` (0-based).

    Both schedules warm up linearly over ``warmup_steps``. ``cosine`` then decays to
    ``lr * min_lr_ratio`` along a half cosine over the remaining steps. ``wsd``
    (warmup-stable-decay) holds ``lr`` and decays linearly to the same floor over the
    last ``decay_fraction`` of all steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return cfg.lr + (floor - cfg.lr) * progress
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
