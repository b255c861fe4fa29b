"""``hylas train`` with faults injected from outside, for the tests that launch it.

    python -m tests.train.worker [--nan-steps 3,4] [--nan-ranks 1] [--stall-save-step 4] -- ARGS

``--nan-steps``: the listed steps' training losses become NaN on ``--nan-ranks`` (default:
every rank). ``--stall-save-step``: the checkpoint of that step stops half-written, after
its first files, and waits to be killed. ARGS are ``hylas train``'s own.
"""

from __future__ import annotations

import argparse
import sys
import time

from hylas.model.decoder import HylasLM
from hylas.train import checkpoint, trainer
from hylas.train.cli import main


def inject_nan(steps: set[int], ranks: set[int] | None) -> None:
    """Make the losses of ``steps`` (1-based) non-finite on ``ranks`` (None = all)."""
    poison = False
    forward, train_step = HylasLM.forward, trainer.Trainer.train_step

    def poisoned_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if poison and out.hidden is not None:  # the training forward's output: the loss is NaN
            out.hidden = out.hidden * float("nan")
        return out

    def marked_train_step(self, *args, **kwargs):
        nonlocal poison
        poison = self.step + 1 in steps and (ranks is None or self.layout.rank in ranks)
        try:
            return train_step(self, *args, **kwargs)
        finally:
            poison = False

    HylasLM.forward = poisoned_forward
    trainer.Trainer.train_step = marked_train_step


def stall_save(step: int) -> None:
    """Stop the checkpoint of ``step`` after it has written its first files."""
    save_rng = checkpoint.save_rng

    def stalling_save_rng(path):
        save_rng(path)
        if f"step_{step:06d}" in str(path):
            print(f"worker: stalled writing the checkpoint of step {step}", flush=True)
            time.sleep(3600)

    checkpoint.save_rng = stalling_save_rng


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nan-steps", default="")
    p.add_argument("--nan-ranks", default="")
    p.add_argument("--stall-save-step", type=int, default=0)
    args, rest = p.parse_known_args()
    if args.nan_steps:
        ranks = {int(r) for r in args.nan_ranks.split(",")} if args.nan_ranks else None
        inject_nan({int(s) for s in args.nan_steps.split(",")}, ranks)
    if args.stall_save_step:
        stall_save(args.stall_save_step)
    sys.exit(main(["train", *[a for a in rest if a != "--"]]))
