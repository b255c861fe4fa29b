"""Activation checkpointing, applied to a built model from outside (as torchtitan's
``apply_ac`` is): ``model.activation_checkpointing`` in the config makes every decoder block
keep only its input in a training forward and recompute the rest in the backward. The
model itself knows nothing of it (docs/architecture.md, "Activation checkpointing").

Each block's class is swapped for ``CheckpointedBlock``, a ``Block`` whose forward runs
under torch's non-reentrant ``checkpoint``. Unlike wrapping the block in another module
(torch's ``checkpoint_wrapper``), the swap leaves every parameter's name as it was, so
checkpoints (which match parameters and optimizer state by name), exports and resumes are
the same with and without it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from hylas.model.decoder import Block, HylasLM


class CheckpointedBlock(Block):
    """A decoder block that recomputes its forward in the backward while training."""

    def forward(self, *args):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False)
        return super().forward(*args)


def apply_activation_checkpointing(model: HylasLM) -> HylasLM:
    """Make every decoder block of ``model`` a ``CheckpointedBlock``, in place."""
    for block in model.blocks:
        block.__class__ = CheckpointedBlock
    return model
