"""The training loop: data -> model -> AdamW, with evaluation, metrics and checkpoints."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hylas.data.dataset import PreparedData
from hylas.data.loader import PackedLoader, eval_batches
from hylas.data.prepare import prepare_embedded_corpus
from hylas.data.tokenizer import Tokenizer
from hylas.kernels import resolve_backend
from hylas.model import HylasLM
from hylas.train.checkpoint import (
    atomic_write_text,
    find_checkpoint,
    load_model_weights,
    load_trainer_state,
    open_checkpoint,
    save_checkpoint,
)
from hylas.train.config import Config
from hylas.train.metrics import MetricsFile, Progress
from hylas.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("hylas")


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why in one sentence."""


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    steps: int  # the step the run stopped at
    first_eval_loss: float | None
    last_eval_loss: float


def compute_dtype(requested: str, device: torch.device) -> str:
    """The autocast dtype a run uses: ``auto`` is bfloat16 only where bf16 matmuls are fast.

    On a CPU without AMX tiles bf16 matmuls are emulated and slower than fp32 (the tiny
    recipe trains about 1.8x faster in fp32 there), so ``auto`` keeps fp32 on such CPUs.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"


def autocast(dtype: str, device: torch.device):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The loader's batch as model keyword arguments (document boundaries when present)."""
    keys = ("input_ids", "labels", "position_ids", "cu_seqlens")
    return {k: batch[k].to(device) for k in keys if k in batch}


def evaluate(
    model: HylasLM, batches, dtype: str, device: torch.device, names: list[str] | None = None
) -> dict[str, float]:
    """Held-out cross-entropy (without MoE auxiliary losses) per target token: ``eval_loss``
    over all sources and, with several sources, ``eval_loss/<name>`` for each."""
    model.eval()
    sums: dict[int, list[float]] = {}
    for source, batch in batches:
        with autocast(dtype, device):
            out = model(**model_inputs(batch, device), logits=False)
        targets = int((batch["labels"] != -100).sum())
        if targets == 0:  # nothing to predict (the loader never makes such a batch)
            continue
        acc = sums.setdefault(source, [0.0, 0])
        acc[0] += out.lm_loss.item() * targets
        acc[1] += targets
    model.train()
    result = {"eval_loss": sum(a[0] for a in sums.values()) / sum(a[1] for a in sums.values())}
    if names and len(names) > 1:
        result.update({f"eval_loss/{names[i]}": a[0] / a[1] for i, a in sorted(sums.items())})
    return result


@dataclass
class Data:
    tokenizer: Tokenizer
    loader: PackedLoader
    held_out: list
    names: list[str]
    description: str


def open_data(cfg: Config) -> Data:
    """The tokenizer, the training loader and the held-out batches of ``cfg.data``."""
    tc, dc = cfg.train, cfg.data
    if not dc.sources:
        tok_dir, data_dir = prepare_embedded_corpus(cfg.model.vocab_size)
        paths, weights, names = [data_dir], [1.0], ["shakespeare"]
        tokenizer_dir = Path(dc.tokenizer) if dc.tokenizer else tok_dir
    else:
        paths = [Path(s.path) for s in dc.sources]
        weights = [s.weight for s in dc.sources]
        names = [p.name or str(p) for p in paths]
        names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        tokenizer_dir = None if not dc.tokenizer else Path(dc.tokenizer)
    if dc.verify:
        log.info(
            "checking %d prepared data director%s (sha256 of every shard)",
            len(paths),
            "y" if len(paths) == 1 else "ies",
        )
    prepared = [PreparedData(p, verify=dc.verify) for p in paths]
    tokenizer = Tokenizer.load(tokenizer_dir or prepared[0].tokenizer_dir)
    for p in prepared:
        p.check_tokenizer(tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise TrainError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    loader = PackedLoader(
        [p.split("train") for p in prepared],
        tc.seq_len,
        tc.batch_size,
        tc.seed,
        pad_id=tokenizer.pad_id,
        weights=weights,
        names=names,
    )
    with_val = [
        i for i, p in enumerate(prepared) if p.splits.get("val") and p.splits["val"].num_documents
    ]
    if not with_val:
        raise TrainError(
            f"no held-out documents in {', '.join(map(str, paths))}; prepare with --val-fraction > 0"
        )
    held_out = eval_batches(
        [prepared[i].split("val") for i in with_val],
        tc.seq_len,
        tc.batch_size,
        tc.eval_batches,
        pad_id=tokenizer.pad_id,
        weights=[weights[i] for i in with_val],
    )
    held_out = [(with_val[i], b) for i, b in held_out]
    tokens = [s.stream_tokens for s in loader.sources]
    mix = ", ".join(
        f"{n} {w:.0%} ({t / 1e6:.2f}M tokens)"
        for n, w, t in zip(names, loader.weights, tokens, strict=True)
    )
    return Data(tokenizer, loader, held_out, names, mix)


def keep_freed_memory() -> None:
    """On glibc, keep freed memory in the process instead of returning it to the OS.

    Otherwise every large tensor is mmap'd and unmapped again each step, and the fresh
    pages fault in on first touch: on 2 CPU cores that cost the tiny recipe about 40% of
    its step time (a third of it in the kernel). Freed memory is reused, never leaked.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    has_run = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*"))
    if resume is None:
        if has_run:
            raise TrainError(
                f"{run_dir} already holds a run; pass --resume auto to continue it, or choose "
                f"another directory with --set train.out_dir=..."
            )
        return None
    if resume == "auto":
        return find_checkpoint(run_dir) if has_run else None
    return find_checkpoint(resume)


def train(cfg: Config, resume: str | None = None) -> RunResult:
    t_start = time.perf_counter()
    tc = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError(
            "multi-process training is not available yet in this version of Hylas "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); launch a single process"
        )
    run_dir = Path(tc.out_dir)
    resume_from = _resume_point(run_dir, resume)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    resolve_backend(cfg.kernels.backend, torch.empty(0, device=device))  # refuse early, not mid-run
    dtype = compute_dtype(tc.dtype, device)

    data = open_data(cfg)
    loader, held_out, names = data.loader, data.held_out, data.names

    model = HylasLM(cfg.model, cfg.kernels.backend).to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    start = 0
    if resume_from is not None:
        ckpt = open_checkpoint(resume_from)
        if ckpt.config.model != cfg.model:
            raise TrainError(
                f"{ckpt.path} was trained with a different model config; resume needs the same"
            )
        load_model_weights(ckpt, model)
        data_state = load_trainer_state(ckpt, optimizer, scheduler)
        if data_state is None:
            raise TrainError(f"{ckpt.path} holds no data position; it cannot be resumed exactly")
        loader.load_state_dict(data_state)
        start = ckpt.step
        log.info("resuming from %s at step %d", ckpt.path, start)

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = MetricsFile(run_dir / "metrics.jsonl", keep_until_step=start if resume_from else None)
    tokens_per_step = tc.batch_size * tc.seq_len
    log.info(
        "model: %.2fM parameters (%.2fM without embeddings%s), %.1f MFLOP per training token, "
        "layers %s%s, mixer %s; %s on %s",
        model.num_parameters() / 1e6,
        model.num_parameters(exclude_embeddings=True) / 1e6,
        f", {model.num_active_parameters() / 1e6:.2f}M active" if cfg.model.moe.num_experts else "",
        model.flops_per_token(tc.seq_len) / 1e6,
        cfg.model.pattern,
        f" (feed-forwards {cfg.model.ffn_pattern})" if cfg.model.moe.num_experts else "",
        cfg.model.linear_mixer,
        dtype if dtype == tc.dtype else f"{dtype} (train.dtype=auto)",
        device.type,
    )
    log.info("data: %s", data.description)
    log.info(
        "training %d steps of %d tokens (batch %d x %d), %d held-out windows",
        tc.steps,
        tokens_per_step,
        tc.batch_size,
        tc.seq_len,
        sum(len(b["input_ids"]) for _, b in held_out),
    )

    first_eval = last_eval = None
    if start == 0:
        result = evaluate(model, held_out, dtype, device, names)
        first_eval = last_eval = result["eval_loss"]
        metrics.write({"step": 0, **result})
        log.info("step 0: held-out loss %.4f", first_eval)

    progress = Progress(tc.steps, start)
    # Throughput is averaged over the steps since the last log line; the loss is the logged
    # step's own, so a resumed run logs exactly what an uninterrupted one does.
    window_steps, window_t0 = 0, time.perf_counter()
    checkpoint, done = resume_from, start
    model.train()
    for step in range(start, tc.steps):
        batch = loader.next_batch()
        lr = scheduler.get_last_lr()[0]
        with autocast(dtype, device):
            out = model(**model_inputs(batch, device), logits=False)
        loss = out.loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainError(
                f"the training loss became {loss_value} at step {step + 1}; try a lower train.lr"
            )
        done = step + 1
        window_steps += 1

        record = None
        if done % tc.log_every == 0 or done == tc.steps:
            elapsed = time.perf_counter() - window_t0
            record = {
                "step": done,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_steps * tokens_per_step / elapsed,
                "elapsed_s": time.perf_counter() - t_start,
            }
            if out.moe_stats:  # the loss above includes the weighted auxiliary losses
                record["moe_aux_loss"] = out.aux_loss.item()
                record["moe_load_imbalance"] = max(s.load_imbalance() for s in out.moe_stats)
                record["moe_dropped"] = max(s.dropped_fraction() for s in out.moe_stats)
                record["moe_expert_counts"] = [s.counts.tolist() for s in out.moe_stats]
            metrics.write(record)
            window_steps, window_t0 = 0, time.perf_counter()
        progress.update(done, tc.steps, record)

        if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
            result = evaluate(model, held_out, dtype, device, names)
            last_eval = result["eval_loss"]
            metrics.write({"step": done, **result})
            progress.write(f"step {done}: held-out loss {last_eval:.4f}")
        if (tc.save_every and done % tc.save_every == 0) or done in (tc.steps, tc.exit_at_step):
            checkpoint = save_checkpoint(
                run_dir,
                done,
                cfg,
                model,
                optimizer,
                scheduler,
                data.tokenizer.model_file,
                metrics={"eval_loss": last_eval} if last_eval is not None else None,
                data_state=loader.state_dict(),
            )
            progress.write(f"step {done}: saved checkpoint {checkpoint}")
        if done == tc.exit_at_step and done < tc.steps:
            progress.write(
                f"step {done}: stopping as asked (train.exit_at_step); resume with --resume auto"
            )
            break
    progress.close()
    metrics.close()
    if last_eval is None:
        last_eval = evaluate(model, held_out, dtype, device)["eval_loss"]
    return RunResult(run_dir, checkpoint, done, first_eval, last_eval)
