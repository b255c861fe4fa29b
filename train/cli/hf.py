"""``hylas export`` and ``hylas import-hf``: a checkpoint to a Hugging Face model directory,
and back."""

from __future__ import annotations

import argparse

from hylas.train.cli.common import add_checkpoint_arg, add_set_arg


def cmd_export(args: argparse.Namespace) -> int:
    from hylas.train.hf.export import export

    done = export(args.checkpoint, args.out, args.max_shard_size, args.dtype)
    remote = done["architecture"] == "HylasForCausalLM"
    print(
        f"exported step {done['step']} to {args.out} as {done['architecture']} "
        f"({done['why']}); {len(done['files'])} files"
    )
    print(
        "load it: AutoModelForCausalLM.from_pretrained("
        f"{str(args.out)!r}{', trust_remote_code=True' if remote else ''})"
    )
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from hylas.train.hf.importer import import_hf

    done = import_hf(args.hf_dir, args.out, args.overrides)
    print(
        f"imported {done['source']} into {args.out}: {done['parameters']:,} parameters, "
        f"layers {done['pattern']}"
    )
    print(
        f"continue pretraining: hylas train --set train.init_from={args.out} data.path=PREPARED_DIR"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``export`` and ``import-hf``."""
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    add_checkpoint_arg(p)
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into files of at most this size, with an index (default 5GB)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the weights' dtype in the export (default float32, as trained)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import-hf",
        help="make a Hylas checkpoint of a Hylas export or a Llama (optionally made hybrid)",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="a Hylas export or a LlamaForCausalLM folder")
    p.add_argument(
        "--out", required=True, help="the checkpoint directory to write (must not exist)"
    )
    add_set_arg(
        p,
        "model.* changes, e.g. model.layer_pattern=LLLF model.linear_mixer=gated_deltanet "
        "to turn attention layers linear (initialised from their attention weights)",
    )
    p.set_defaults(func=cmd_import_hf)
