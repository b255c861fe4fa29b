"""The training engine's cost: tokens/s of the tiny recipe through the DeepSpeed engine at
world 1 against the bare loop it replaces (model, AdamW, clip, no DeepSpeed), then at dp=2
for ZeRO 0-3 with the bytes each step communicates, from the communication tracer.

    python -m benchmarks.engine [--steps 20] [--warmup 3]

Both dp=2 ranks share this machine's cores, so compare the ZeRO stages with each other,
not with world 1. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def recipe(out_dir: str, stage: int, threads: int) -> list[str]:
    return [
        "train.dtype=float32",
        f"parallel.zero_stage={stage}",
        f"train.out_dir={out_dir}",
        f"train.threads={threads}",
    ]


class Quiet:
    received = None  # the StopSignal the trainer's step reads


def engine_steps(trainer, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, bytes communicated per step per rank) through the engine."""
    from hylas.parallel.trace import trace_collectives

    accumulation = trainer.batches.accumulation
    for _ in range(warmup):
        trainer.train_step(trainer.data.loader.next_micro_batches(accumulation), Quiet)
        trainer.step += 1
    with trace_collectives() as tracer:
        trainer.train_step(trainer.data.loader.next_micro_batches(accumulation), Quiet)
        trainer.step += 1
    sent = tracer.total_bytes()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(trainer.data.loader.next_micro_batches(accumulation), Quiet)
        trainer.step += 1
    torch.distributed.barrier()
    return (time.perf_counter() - t0) / steps, sent


def bare_steps(cfg, loader, steps: int, warmup: int) -> float:
    """Seconds per step of the loop the engine replaced: forward, backward, clip, AdamW."""
    from hylas.train.inputs import model_inputs
    from hylas.train.loss import lm_loss
    from hylas.train.optim import lr_at, param_groups
    from hylas.train.trainer import build_model

    tc = cfg.train
    model = build_model(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8
    )

    def step(i: int) -> None:
        batch = loader.next_batch()
        out = model(**model_inputs(batch, torch.device("cpu")), logits=False)
        lm_loss(model, out, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        for group in opt.param_groups:
            group["lr"] = lr_at(i, tc)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return (time.perf_counter() - t0) / steps


def worker(args) -> None:
    """One rank: build the trainer for a stage and time its steps; rank 0 prints JSON."""
    from hylas.train.config import load_config
    from hylas.train.memory import keep_freed_memory
    from hylas.train.trainer import Trainer

    keep_freed_memory()
    cfg = load_config("tiny", recipe(args.out, args.stage, args.threads))
    trainer = Trainer(cfg, None)
    seconds, sent = engine_steps(trainer, args.steps, args.warmup)
    result = {"stage": args.stage, "seconds": seconds, "bytes": sent}
    if args.bare:
        result["bare_seconds"] = bare_steps(cfg, trainer.data.loader, args.steps, args.warmup)
    if trainer.layout.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()


def launch(nproc: int, stage: int, args, bare: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={29400 + stage + 10 * nproc}",
            "-m",
            "benchmarks.engine",
            "--worker",
            f"--stage={stage}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--threads={max(1, args.threads // nproc)}",
            f"--out={out}",
        ] + (["--bare"] if bare else [])
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"benchmark launch failed:\n{proc.stderr[-4000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from benchmarks.machine import describe
    from hylas.train.config import load_config

    tc = load_config("tiny").train
    tokens = tc.batch_size * tc.seq_len
    print(f"machine: {describe(torch.device('cpu'))}; tiny recipe, fp32, {tokens} tokens/step")
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps per row\n")
    rows = []
    for stage in (0, 1):
        r = launch(1, stage, args, bare=stage == 0)
        if "bare_seconds" in r:
            rows.append(("1", "bare loop (no DeepSpeed)", r["bare_seconds"], 0, None))
            bare = r["bare_seconds"]
        rows.append(("1", f"engine, ZeRO {stage}", r["seconds"], r["bytes"], bare / r["seconds"]))
    for stage in (0, 1, 2, 3):
        r = launch(2, stage, args)
        rows.append(("2", f"engine, ZeRO {stage}", r["seconds"], r["bytes"], None))
    print("| world | loop | s/step | tokens/s | MB sent per step per rank | vs bare loop |")
    print("|---|---|---|---|---|---|")
    for world, name, seconds, sent, ratio in rows:
        vs = f"{ratio:.2f}x" if ratio else ""
        print(
            f"| {world} | {name} | {seconds:.3f} | {tokens / seconds:,.0f} | "
            f"{sent / 1e6:.2f} | {vs} |"
        )


if __name__ == "__main__":
    main()
