"""The ``hylas`` command: ``train``, ``generate``; later work adds ``data``, ``export``, ``import-hf``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

PLANNED_COMMANDS = {
    "data": "tokenizer training and data preparation for user corpora",
    "export": "Hugging Face export",
    "import-hf": "Hugging Face import",
}


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s hylas: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default="tiny", help="a YAML file or a shipped recipe name (default: tiny)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set model.n_layers=8 train.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|DIR",
        default=None,
        help="continue a run: 'auto' = the newest checkpoint in train.out_dir, or a checkpoint directory",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from hylas.train.config import load_config
    from hylas.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    lines = [f"finished at step {result.steps} in {result.run_dir}"]
    if result.first_eval_loss is not None:
        drop = 100 * (1 - result.last_eval_loss / result.first_eval_loss)
        lines.append(
            f"held-out loss {result.first_eval_loss:.4f} -> {result.last_eval_loss:.4f} ({drop:.0f}% lower)"
        )
    lines += [
        f"checkpoint: {result.checkpoint}",
        f"metrics:    {result.run_dir / 'metrics.jsonl'}",
        f"config:     {result.run_dir / 'config.yaml'}",
        f"sample it:  hylas generate --checkpoint {result.checkpoint} --prompt 'ROMEO.'",
    ]
    print("\n".join(lines))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hylas.data.tokenizer import Tokenizer
    from hylas.model import HylasLM, generate
    from hylas.train.checkpoint import load_model_weights, open_checkpoint

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    ckpt = open_checkpoint(args.checkpoint)
    tokenizer = Tokenizer(ckpt.tokenizer_file)
    model = HylasLM(ckpt.config.model, ckpt.config.kernels.backend)
    load_model_weights(ckpt, model)
    model.eval()
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    prompt_ids = tokenizer.encode(prompt)
    generator = torch.Generator().manual_seed(args.seed)
    out = sys.stdout
    out.write(prompt)
    shown, new_ids = "", []
    for token in generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        stop_ids=(tokenizer.eos_id,),
        generator=generator,
    ):
        if token == tokenizer.eos_id:
            break
        new_ids.append(token)
        text = tokenizer.decode(new_ids)  # decode the whole tail: pieces may merge bytes
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hylas", description="Pretrain hybrid linear/softmax attention language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "train", help="train a model (no arguments: the tiny recipe on the embedded corpus)"
    )
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (newest checkpoint)",
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--escapes", action="store_true", help=r"interpret \n and other escapes in --prompt"
    )
    p.set_defaults(func=cmd_generate)

    for name, what in PLANNED_COMMANDS.items():  # listed in --help; refused in main()
        sub.add_parser(name, help=f"(not available yet) {what}")
    return parser


def main(argv: list[str] | None = None) -> int:
    from hylas.model.config import ConfigError
    from hylas.train.checkpoint import CheckpointError
    from hylas.train.trainer import TrainError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PLANNED_COMMANDS:
        what = PLANNED_COMMANDS[argv[0]]
        print(f"hylas: error: 'hylas {argv[0]}' is not available yet ({what})", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, TrainError, ValueError, FileNotFoundError) as e:
        print(f"hylas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hylas: interrupted; checkpoints already written are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
