"""``hylas sweep`` and ``hylas eval recall``: compare hybrid layouts, measure a checkpoint."""

from __future__ import annotations

import argparse

from hylas.train.cli.common import add_checkpoint_arg, add_set_arg


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hylas.train.experiments.sweep import SweepOptions, sweep

    ratios = [r.strip() for r in args.ratios.split(",") if r.strip()]
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    if not ratios or not mixers:
        raise ValueError("--ratios and --mixers each need at least one entry")
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.context <= 0:
        raise ValueError(f"--context must be positive, got {args.context}")
    if args.recall_width is not None and args.recall_width < 0:
        raise ValueError(f"--recall-width must be positive (or 0), got {args.recall_width}")
    sweep(
        SweepOptions(
            recipe=args.config,
            ratios=ratios,
            mixers=mixers,
            out=Path(args.out),
            placement=args.placement,
            steps=args.steps,
            overrides=args.overrides,
            context=args.context,
            recall_steps=args.recall_steps,
            recall_pairs=args.recall_pairs,
            recall_seq_len=args.recall_seq_len,
            recall_vocab=args.recall_vocab,
            recall_width=args.recall_width,
            recall_tolerance=args.recall_tolerance,
            loss_tolerance=args.loss_tolerance,
        )
    )
    return 0


def cmd_eval_recall(args: argparse.Namespace) -> int:
    from hylas.train.experiments.eval_recall import checkpoint_recall, format_report, parse_contexts

    report = checkpoint_recall(
        args.checkpoint,
        parse_contexts(args.contexts),
        samples=args.samples,
        seed=args.seed,
        pairs=args.pairs,
        data=args.data,
        out=args.out,
    )
    print(format_report(report))
    if args.out:
        print(f"results: {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``sweep`` and ``eval`` with its subcommand ``recall``."""
    p = sub.add_parser(
        "sweep",
        help="train one proxy run per (mixer, linear:full ratio) and compare loss, recall, "
        "throughput and decoding memory",
    )
    p.add_argument("--config", default="tiny", help="the recipe or YAML file of every run")
    p.add_argument(
        "--ratios", default="1:0,7:1,3:1,1:1,0:1", help="linear:full ratios, comma-separated"
    )
    p.add_argument("--mixers", default="gated_deltanet", help="linear mixers, comma-separated")
    p.add_argument(
        "--placement",
        choices=("end", "start", "spread"),
        default="end",
        help="softmax layers at the end of each group, at its start, or spread over depth",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default: the recipe's)"
    )
    p.add_argument(
        "--context", type=int, default=32768, help="context for decoding memory and speed"
    )
    p.add_argument(
        "--recall-steps",
        type=int,
        default=None,
        help="training steps of each MQAR recall run (default: the pinned budget)",
    )
    p.add_argument("--recall-pairs", type=int, default=None, help="MQAR key-value pairs")
    p.add_argument("--recall-seq-len", type=int, default=None, help="MQAR sequence length")
    p.add_argument(
        "--recall-vocab", type=int, default=None, help="MQAR vocabulary (keys and values)"
    )
    p.add_argument(
        "--recall-width",
        type=int,
        default=None,
        help="d_model of the MQAR recall runs (default 64; 0 = each run's own)",
    )
    p.add_argument("--recall-tolerance", type=float, default=0.05)
    p.add_argument("--loss-tolerance", type=float, default=0.02)
    p.add_argument("--out", required=True, help="the sweep directory (rerun to resume)")
    add_set_arg(
        p,
        "config overrides for every run, e.g. model.n_layers=8 data.path=DIR",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="measure a trained checkpoint")
    evals = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    p = evals.add_parser(
        "recall",
        help="zero-shot in-context recall: key-value pairs in held-out text, then a question "
        "(near 0 for small models)",
    )
    add_checkpoint_arg(p)
    p.add_argument(
        "--contexts",
        default="256,1024,4096",
        help="prompt lengths in tokens, comma-separated (default 256,1024,4096)",
    )
    p.add_argument("--samples", type=int, default=100, help="prompts per context (default 100)")
    p.add_argument("--pairs", type=int, default=4, help="key-value pairs per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="draws the keys, values and filler")
    p.add_argument(
        "--data",
        default=None,
        help="a prepared directory whose held-out split gives the filler "
        "(default: the data the checkpoint trained on)",
    )
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_recall)
