"""The ``hylas`` command: ``train``, ``generate``, ``export``, ``import-hf``, ``sweep``,
``eval recall``, ``data tokenizer``, ``data prepare``, ``data merge``."""

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


def add_train_args(p: argparse.ArgumentParser) -> None:
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
    from hylas.train.experiments.eval_recall import format_report, parse_contexts, recall_probe

    report = recall_probe(
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


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from hylas.data.sources import open_sources
    from hylas.data.tokenizer import train_tokenizer

    sources = open_sources(
        args.input, args.text_key, args.split, args.bad_utf8, args.split_documents
    )
    budget = args.max_characters

    def documents():
        nonlocal budget
        for source in sources:
            for text in source:
                yield text
                budget -= len(text)
                if budget <= 0:
                    return

    logging.getLogger("hylas").info(
        "training a %d-piece BPE tokenizer on %s (up to %.0fM characters)",
        args.vocab_size,
        ", ".join(args.input),
        args.max_characters / 1e6,
    )
    tok = train_tokenizer(documents(), args.vocab_size, args.out)
    used = sum(s.stats.characters for s in sources)
    bad = sum(s.stats.bad_utf8_replaced for s in sources)
    print(
        f"wrote a {tok.vocab_size}-piece tokenizer to {args.out} (trained on {used:,} characters)"
    )
    print(f"ids: pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id}; sha256 {tok.sha256[:16]}")
    if bad:
        print(f"replaced {bad} invalid UTF-8 sequences with U+FFFD")
    print(f"load it with transformers: AutoTokenizer.from_pretrained({str(args.out)!r})")
    return 0


def parse_part(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), with 1 <= I <= N."""
    from hylas.data.sources import DataError

    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise DataError(f"--part must be I/N with 1 <= I <= N (e.g. 1/8), got {text!r}")
    return int(index), int(count)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from hylas.data.prepare import prepare
    from hylas.data.sources import open_sources, part_sources
    from hylas.data.tokenizer import Tokenizer

    part = parse_part(args.part) if args.part else None
    sources = open_sources(
        args.input, args.text_key, args.split, args.bad_utf8, args.split_documents
    )
    files: list[str] = []  # this part's input files
    if part:
        sources, files = part_sources(sources, *part)
    tokenizer = Tokenizer.load(args.tokenizer)
    logging.getLogger("hylas").info(
        "tokenizing %s with %d worker%s into %s",
        ", ".join(args.input),
        args.workers,
        "" if args.workers == 1 else "s",
        args.out,
    )
    m = prepare(
        sources,
        tokenizer,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        progress=sys.stderr.isatty(),
        part={"index": part[0], "count": part[1], "files": files} if part else None,
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(
        f"prepared {train['documents'] + val['documents']:,} documents into {args.out}: "
        f"{train['tokens']:,} training tokens in {len(train['shards'])} shard(s), "
        f"{val['tokens']:,} held-out tokens ({val['documents']:,} documents), "
        f"{m['dtype']}, in {m['seconds']:.1f}s "
        f"({(train['tokens'] + val['tokens']) / max(m['seconds'], 1e-9):,.0f} tokens/s)"
    )
    for s in m["sources"]:
        notes = []
        if s.get("split_documents") in ("paragraph", "line"):
            notes.append(f"text split into documents, one per {s['split_documents']}")
        if s["bad_utf8_replaced"]:
            notes.append(f"replaced {s['bad_utf8_replaced']} invalid UTF-8 sequences")
        if s["empty_skipped"]:
            notes.append(f"skipped {s['empty_skipped']} empty documents")
        if notes:
            print(f"{s['input']}: {'; '.join(notes)}")
    if part:
        index, count = part
        print(
            f"part {index}/{count}: {len(files)} input file(s); join the "
            f"{count} parts with: hylas data merge PART_DIR ... --out DIR"
        )
        return 0
    held = m["held_out"]
    if held["rule"] == "tail":
        print(f"one document: held out its last {held['characters']:,} characters")
    elif held["rule"] == "hash-smallest":
        print(
            f"held out the {held['documents']} document(s) of smallest hash: too few documents "
            f"for --val-fraction {held['fraction']} to pick by hash alone"
        )
    if val["documents"]:
        print(f"train on it: hylas train --set data.path={args.out}")
    else:
        print(
            f"no held-out split (--val-fraction {args.val_fraction}), which hylas train needs; "
            "prepare again into a new --out with --val-fraction 0.005"
        )
    return 0


def cmd_data_merge(args: argparse.Namespace) -> int:
    from hylas.data.prepare import merge_prepared

    m = merge_prepared(args.parts, args.out)
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(
        f"merged {len(m['merged'])} prepared directories into {args.out}: "
        f"{train['tokens']:,} training tokens in {len(train['shards'])} shard(s), "
        f"{val['tokens']:,} held-out tokens ({val['documents']:,} documents), {m['dtype']}"
    )
    print(f"train on it: hylas train --set data.path={args.out}")
    return 0


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        action="extend",
        metavar="INPUT",
        help="text (.txt, .md), JSON lines (.jsonl, .json) files, either also .gz/.zst/.xz/.bz2, "
        ".parquet files, directories of them, a directory saved with datasets, or "
        "hf:NAME[:CONFIG] for datasets.load_dataset",
    )
    p.add_argument("--text-key", default="text", help="the JSON field / column holding the text")
    p.add_argument("--split", default="train", help="the datasets split to read (default: train)")
    p.add_argument(
        "--bad-utf8",
        choices=("replace", "error"),
        default="replace",
        help="invalid UTF-8 in text/jsonl files: replace with U+FFFD and count (default), or stop",
    )
    p.add_argument(
        "--split-documents",
        choices=("auto", "none", "paragraph", "line"),
        default="auto",
        help="how text files become documents: none (a file is one document), paragraph "
        "(separated by blank lines), line (each non-blank line); auto (default): paragraph for "
        "a single text file input over 1 MB (compressed size for a compressed one), else none",
    )


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

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (newest checkpoint)",
    )
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
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (newest checkpoint)",
    )
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

    p = sub.add_parser("data", help="train a tokenizer, prepare token shards, merge prepared parts")
    data = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data.add_parser(
        "tokenizer", help="train a sentencepiece BPE tokenizer (with Hugging Face files)"
    )
    add_input_args(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="the tokenizer directory to write")
    p.add_argument(
        "--max-characters",
        type=float,
        default=2e8,
        help="train on at most this much text, from the start of the inputs (default 2e8)",
    )
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("prepare", help="tokenize text into token shards for training")
    add_input_args(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a directory from 'hylas data tokenizer', or a Hugging Face tokenizer directory "
        "(tokenizer.json, as Llama-3-style models ship)",
    )
    p.add_argument("--out", required=True, help="the prepared directory to write (must not exist)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (default: one per CPU)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="hold out the documents whose text hash falls below F, for evaluation "
        "(default 0.005; 0 = none)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 28,
        help="tokens per shard file, at most (a longer document gets a shard of its own)",
    )
    p.add_argument(
        "--part",
        metavar="I/N",
        help="prepare only the I-th of N parts of the input files (by file, the same whatever "
        "the order of --input), for one job of N; join them with 'hylas data merge'",
    )
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("merge", help="join prepared parts (from --part I/N) into one directory")
    p.add_argument("parts", nargs="+", metavar="PART_DIR", help="prepared directories to join")
    p.add_argument("--out", required=True, help="the prepared directory to write (must not exist)")
    p.set_defaults(func=cmd_data_merge)

    return parser


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
