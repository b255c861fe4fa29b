"""The ``hylas`` command: ``train``, ``generate``, ``export``, ``import-hf``, ``sweep``,
``eval recall``, ``data tokenizer``, ``data prepare``, ``data merge``.

Each command group is a module here with an ``add_commands(sub)`` that registers its
parsers and their ``cmd_*`` functions; a command imports what it runs only when it runs,
so the command starts fast. What the groups share is in ``common``."""

from __future__ import annotations

import argparse
import os
import sys

from hylas.train.cli import data, experiments, hf, run
from hylas.train.cli.common import rank_label, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The top parser, with every group's commands in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="hylas", description="Pretrain hybrid linear/softmax attention language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (run, hf, experiments, data):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``hylas`` with ``argv`` (default: the command line); returns the exit code."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed would warn on every rank while it finds out
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hylas.configs.base import ConfigError, TrainError
    from hylas.train.checkpoint import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (
        ConfigError,
        CheckpointError,
        TrainError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    ) as e:
        print(f"hylas: error{rank_label()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "hylas: interrupted; what was finished is complete, unfinished output is removed",
            file=sys.stderr,
        )
        return 130
