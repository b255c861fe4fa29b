"""What the command groups share: logging set-up, the rank in messages, and the arguments
that several commands take (``--set``, ``--checkpoint``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def rank_label() -> str:
    """' (rank 3)' in a multi-process run, else nothing."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def setup_logging() -> None:
    """Rank 0 tells what is happening; other ranks speak up only with warnings and errors."""
    quiet = int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s hylas{rank_label()}: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE ...``, repeatable, into ``args.overrides``."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    """``--checkpoint DIR``, required, into ``args.checkpoint``."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (newest checkpoint)",
    )
