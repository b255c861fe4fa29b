"""``hylas data tokenizer``, ``data prepare`` and ``data merge``: from text to the token
shards that training reads."""

from __future__ import annotations

import argparse
import logging
import os
import sys


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
    """``--input`` and how it is read, as ``data tokenizer`` and ``data prepare`` take it."""
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``data`` with its subcommands ``tokenizer``, ``prepare`` and ``merge``."""
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
