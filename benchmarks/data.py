"""The data path's speed, each next to its baseline in one run.

1. ``hylas data prepare`` (read jsonl, tokenize in worker processes, write hashed shards)
   with 1 and 2 workers, against sentencepiece's own encode of the same documents in this
   process on one thread. Target: at least 80% of raw sentencepiece per worker.
2. One large text file (the corpus as plain text, about 20 MB) in paragraph mode
   (``--split-documents paragraph``), with 1 and 2 workers: the documents of one file are
   handed to all workers. Target: 2 workers at least 1.8x one.
3. The packed loader's time per batch, against one training step of the tiny recipe on
   the same batches. Target: under 2% of the step.

    .venv/bin/python benchmarks/data.py            # the embedded corpus, 4 copies (~21 MB)
    .venv/bin/python benchmarks/data.py --copies 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe

from hylas.data.corpus import load_corpus
from hylas.data.dataset import PreparedData
from hylas.data.loader import PackedLoader
from hylas.data.prepare import prepare, prepare_embedded_corpus
from hylas.data.sources import open_sources
from hylas.data.tokenizer import Tokenizer
from hylas.model.decoder import HylasLM
from hylas.train.config import load_config
from hylas.train.inputs import model_inputs
from hylas.train.loss import lm_loss
from hylas.train.memory import keep_freed_memory
from hylas.train.optim import param_groups


def corpus_jsonl(path: Path, copies: int) -> list[str]:
    """The embedded corpus cut into scenes (about 1,000 documents per copy), as jsonl."""
    scenes = [s for w in load_corpus() for s in w.text.split("\n\n\n") if s.strip()]
    docs = scenes * copies
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def raw_sentencepiece(tok: Tokenizer, docs: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = tok.sp.encode(docs, num_threads=1)
    return time.perf_counter() - t0, sum(map(len, ids)) + len(ids)  # + an EOS per document


def corpus_text(path: Path, copies: int) -> int:
    """The embedded corpus as one text file, its scenes as blank-line separated paragraphs."""
    scenes = [s.strip("\n") for w in load_corpus() for s in w.text.split("\n\n\n") if s.strip()]
    path.write_text("\n\n".join(scenes * copies) + "\n")
    return path.stat().st_size


def prepare_once(
    tok: Tokenizer, src: Path, workers: int, out: Path, split_documents: str = "auto"
) -> tuple[float, int]:
    t0 = time.perf_counter()
    sources = open_sources([str(src)], split_documents=split_documents)
    m = prepare(sources, tok, out, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    return seconds, m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]


def loader_vs_step(steps: int, batches: int) -> tuple[float, float, str]:
    cfg = load_config("tiny")
    tc = cfg.train
    _, data_dir = prepare_embedded_corpus(cfg.model.vocab_size)
    data = PreparedData(data_dir)
    loader = PackedLoader(
        [data.split("train")], tc.seq_len, tc.batch_size, tc.seed, pad_id=data.pad_id
    )
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - t0)
    times.sort()
    per_batch = times[len(times) // 2]  # the median

    keep_freed_memory()
    torch.manual_seed(0)
    model = HylasLM(cfg.model)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    step_times = []
    for _ in range(steps):
        batch = loader.next_batch()
        t0 = time.perf_counter()
        out = model(**model_inputs(batch, torch.device("cpu")), logits=False)
        lm_loss(model, out, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
    step_times.sort()
    return per_batch, step_times[0], f"batch {tc.batch_size} x {tc.seq_len}, fp32"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--copies", type=int, default=4, help="copies of the embedded corpus to tokenize"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of each; the fastest is reported"
    )
    p.add_argument(
        "--steps", type=int, default=8, help="training steps timed (the fastest is kept)"
    )
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok_dir, _ = prepare_embedded_corpus(4096)
        tok = Tokenizer.load(tok_dir)
        docs = corpus_jsonl(tmp / "corpus.jsonl", args.copies)
        mb = (tmp / "corpus.jsonl").stat().st_size / 1e6
        # Interleaved repeats, the fastest of each: this machine's speed drifts between runs.
        best = {"raw": float("inf"), 1: float("inf"), 2: float("inf")}
        for r in range(args.repeats):
            seconds, n_tokens = raw_sentencepiece(tok, docs)
            best["raw"] = min(best["raw"], seconds)
            for workers in (1, 2):
                out = tmp / f"out-{workers}-{r}"
                seconds, n = prepare_once(tok, tmp / "corpus.jsonl", workers, out)
                assert n == n_tokens, "prepare and the raw encode saw different tokens"
                best[workers] = min(best[workers], seconds)
        text_mb = corpus_text(tmp / "corpus.txt", args.copies) / 1e6
        one_file = {1: float("inf"), 2: float("inf")}
        for r in range(args.repeats):
            for workers in (1, 2):
                out = tmp / f"text-{workers}-{r}"
                seconds, n_text = prepare_once(tok, tmp / "corpus.txt", workers, out, "paragraph")
                one_file[workers] = min(one_file[workers], seconds)
        raw = n_tokens / best["raw"]
        rows = [("sentencepiece encode, in process, 1 thread", 1, raw)]
        rows += [
            (f"hylas data prepare, {w} worker{'s' * (w > 1)}", w, n_tokens / best[w])
            for w in (1, 2)
        ]

    print(
        f"Machine: {describe(torch.device('cpu'))}, {os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    print(
        f"\nTokenization: {len(docs):,} documents, {mb:.1f} MB of jsonl, {n_tokens:,} tokens, vocabulary 4096\n"
    )
    print("| what | tokens/s | per worker | per worker vs raw |")
    print("|---|---:|---:|---:|")
    for name, workers, speed in rows:
        print(f"| {name} | {speed:,.0f} | {speed / workers:,.0f} | {speed / workers / raw:.0%} |")

    print(
        f"\nOne text file, paragraph mode: {text_mb:.1f} MB, {n_text:,} tokens "
        f"(fastest of {args.repeats})\n"
    )
    print("| workers | seconds | tokens/s | vs 1 worker |")
    print("|---:|---:|---:|---:|")
    for w in (1, 2):
        print(
            f"| {w} | {one_file[w]:.2f} | {n_text / one_file[w]:,.0f} | "
            f"{one_file[1] / one_file[w]:.2f}x |"
        )

    per_batch, step, what = loader_vs_step(args.steps, 200)
    print(f"\nLoader against one training step of the tiny recipe ({what}):\n")
    print("| what | ms | share of step |")
    print("|---|---:|---:|")
    print(
        f"| PackedLoader.next_batch (median of 200) | {per_batch * 1e3:.2f} | {per_batch / step:.2%} |"
    )
    print(
        f"| training step, forward + backward + AdamW (fastest of {args.steps}) | {step * 1e3:.1f} | 100% |"
    )


if __name__ == "__main__":
    main()
