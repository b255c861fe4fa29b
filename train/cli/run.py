"""``hylas train`` and ``hylas generate``: train a model, continue a prompt with one."""

from __future__ import annotations

import argparse
import os
import sys

from hylas.train.cli.common import add_checkpoint_arg, add_set_arg


def add_train_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and ``--resume``: what ``hylas train`` trains."""
    p.add_argument(
        "--config", default="tiny", help="a YAML file or a shipped recipe name (default: tiny)"
    )
    add_set_arg(
        p,
        "override config keys, e.g. --set model.n_layers=8 train.lr=1e-3 (repeatable)",
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
    if cfg.train.init_from:
        cfg = with_model_of_checkpoint(cfg, args.overrides)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped_by:
        print(
            f"stopped on {result.stopped_by} at step {result.steps}; checkpoint "
            f"{result.checkpoint} is complete. Continue with the same command and --resume auto"
        )
        return 0
    lines = [f"finished at step {result.steps} in {result.run_dir}"]
    if result.first_eval_loss is not None and result.last_eval_loss is not None:
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


def with_model_of_checkpoint(cfg, overrides: list[str]):
    """For train.init_from: the checkpoint's model config, with this command's --set model.*."""
    from hylas.train.checkpoint import open_checkpoint
    from hylas.train.config import Config, apply_overrides

    start = open_checkpoint(cfg.train.init_from, verify=False).config
    mine = [item for item in overrides if item.strip().startswith("model.")]
    cfg.model = apply_overrides(Config(model=start.model), mine).model
    return cfg.validate()


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hylas.model.decoder import HylasLM
    from hylas.model.generation import generate
    from hylas.train.checkpoint import load_model_weights, open_checkpoint

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    ckpt = open_checkpoint(args.checkpoint)
    tokenizer = ckpt.tokenizer()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    model = HylasLM(ckpt.config.model, ckpt.config.kernels.backend)
    load_model_weights(ckpt, model)
    model.to(args.device).eval()
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``train`` and ``generate``."""
    p = sub.add_parser(
        "train", help="train a model (no arguments: the tiny recipe on the embedded corpus)"
    )
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    add_checkpoint_arg(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the model runs (auto: the GPU if there is one; fp32 weights either way)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--escapes", action="store_true", help=r"interpret \n and other escapes in --prompt"
    )
    p.set_defaults(func=cmd_generate)
