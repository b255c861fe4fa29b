"""The training loop: data -> model -> DeepSpeed engine, on one process or many, with
evaluation, metrics, checkpoints and fault handling. docs/architecture.md ("Parallel
dimensions", "Checkpoints and export") describes what it keeps equal across layouts."""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from hylas.configs.base import IGNORE_INDEX, TrainError
from hylas.data.loader import select_rows
from hylas.kernels.common import resolve_backend
from hylas.model.decoder import HylasLM
from hylas.model.moe import RouterStats
from hylas.parallel import comm, sp
from hylas.parallel.mesh import device_for, init_groups, layout_from_env, shutdown
from hylas.train.ac import apply_activation_checkpointing
from hylas.train.checkpoint import (
    SaveRequest,
    atomic_write_text,
    complete_checkpoints,
    find_checkpoint,
    load_model_weights,
    open_checkpoint,
    persistent_buffers,
    save_checkpoint,
)
from hylas.train.config import Config
from hylas.train.engine import Engine, batch_layout
from hylas.train.inputs import DataFactory, check_same_tokenizer, model_inputs, open_data
from hylas.train.loss import count_targets, cross_entropy_sum, moe_aux, pooled_moe_aux
from hylas.train.memory import keep_freed_memory
from hylas.train.metrics import MetricsFile, Progress, WandbLogger, mfu, peak_flops
from hylas.train.optim import lr_at

log = logging.getLogger("hylas")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None  # None for a run that keeps no checkpoints
    steps: int  # the step the run stopped at
    first_eval_loss: float | None  # None without evaluation (train.eval_batches=0)
    last_eval_loss: float | None
    last_loss: float | None  # the training loss of the last step run here (None: none run)
    stopped_by: str | None = None  # the signal that stopped the run early, if one did


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


class StopSignal:
    """SIGTERM / SIGINT only set a flag; the loop all-reduces it at the end of each step, so
    every rank stops at the same step and checkpoints together."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    has_run = complete_checkpoints(run_dir / "checkpoints") != []
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


def build_model(cfg: Config, device: torch.device) -> HylasLM:
    """The model, materialised once on ``device``: built on the meta device, then each
    module initialises its own parameters and buffers there."""
    with torch.device("meta"):
        model = HylasLM(cfg.model, cfg.kernels.backend, seed=cfg.train.seed)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


@dataclass
class StepStats:
    """One optimizer step's numbers, reduced over all ranks."""

    loss: float  # mean cross-entropy per target token of the global batch (+ MoE aux)
    lm_loss: float
    targets: int
    bad: bool
    stop: bool
    moe: list[RouterStats]


class Trainer:
    """One run: the layout, the data, the engine; ``run()`` trains to the end or to a stop.

    data: what the run trains on, from the config, the layout and the batch sizes:
    ``cfg.data``'s prepared data by default, or a synthetic task (the MQAR probe's);
    checkpoints: False for a run that saves none (a probe whose model is measured in the
    same process and thrown away)."""

    def __init__(
        self,
        cfg: Config,
        resume: str | None,
        data: DataFactory = open_data,
        checkpoints: bool = True,
    ):
        self.t_start = time.perf_counter()
        self.cfg, tc = cfg, cfg.train
        self.layout = layout_from_env(cfg.parallel.sp)
        self.device = device_for(self.layout)
        self.groups = init_groups(self.layout, self.device, cfg.parallel.timeout_s)
        self.batches = batch_layout(cfg, self.layout)
        self.run_dir = Path(tc.out_dir)
        self.checkpoints = checkpoints
        self.resume_from = _resume_point(self.run_dir, resume)
        if self.resume_from is not None and not checkpoints:
            raise TrainError("a run that keeps no checkpoints cannot resume")
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        if self.device.type == "cpu":
            keep_freed_memory(self.batches.micro_batch * tc.seq_len // self.layout.sp)
        resolve_backend(cfg.kernels.backend, torch.empty(0, device=self.device))
        self.dtype = compute_dtype(tc.dtype, self.device)
        self.data = data(cfg, self.layout, self.batches)
        if self.data.tokenizer is None and checkpoints:
            raise ValueError("a run on data without a tokenizer keeps no checkpoints")

        model = build_model(cfg, self.device)
        if self.layout.sp > 1:
            sp.apply(model)
        self.step, self.bad_streak, self.skipped = 0, 0, 0
        ckpt = None
        if self.resume_from is not None:
            ckpt = open_checkpoint(self.resume_from)
            if "imported" in ckpt.manifest:
                raise TrainError(
                    f"{ckpt.path} is an imported model with no training state to resume; "
                    f"start a run from it with --set train.init_from={ckpt.path}"
                )
            if ckpt.config.model != cfg.model:
                raise TrainError(
                    f"{ckpt.path} was trained with a different model config; resume needs the same"
                )
            load_model_weights(ckpt, model)
        elif tc.init_from:
            start = open_checkpoint(tc.init_from)
            if self.data.tokenizer is not None:
                check_same_tokenizer(start, self.data.tokenizer)
            load_model_weights(start, model)
            log.info("starting from the weights of %s (step %d there)", start.path, start.step)
        self.flops_per_token = model.flops_per_token(tc.seq_len)
        self.describe(model)
        self.engine = Engine(model, cfg, self.layout, self.batches, self.dtype, self.device)
        if ckpt is not None:
            state = ckpt.trainer_state()
            self.engine.restore_optimizer(ckpt.optimizer_moments(), state["optimizer_steps"])
            self.data.loader.load_state_dict(state["data"])
            self.step, self.bad_streak = ckpt.step, state["bad_streak"]
            self.skipped = state["skipped_steps"]
            ckpt.load_rng(self.layout.rank)
            log.info("resuming from %s at step %d", ckpt.path, self.step)
        self.checkpoint = self.resume_from

    def describe(self, model: HylasLM) -> None:
        cfg, tc, b = self.cfg, self.cfg.train, self.batches
        log.info(
            "model: %.2fM parameters (%.2fM without embeddings%s), %.1f MFLOP per training "
            "token, layers %s%s, mixer %s; %s on %s",
            model.num_parameters() / 1e6,
            model.num_parameters(exclude_embeddings=True) / 1e6,
            f", {model.num_active_parameters() / 1e6:.2f}M active"
            if cfg.model.moe.num_experts
            else "",
            self.flops_per_token / 1e6,
            cfg.model.pattern,
            f" (feed-forwards {cfg.model.ffn_pattern})" if cfg.model.moe.num_experts else "",
            cfg.model.linear_mixer,
            self.dtype if self.dtype == tc.dtype else f"{self.dtype} (train.dtype=auto)",
            self.device.type,
        )
        log.info(
            "layout: %d process%s (dp %d x sp %d), DeepSpeed ZeRO stage %d; each step: %d "
            "samples = %d per rank as %d micro-batch%s of %d",
            self.layout.world,
            "" if self.layout.world == 1 else "es",
            self.layout.dp,
            self.layout.sp,
            cfg.parallel.zero_stage,
            b.global_batch,
            b.per_rank,
            b.accumulation,
            "" if b.accumulation == 1 else "es",
            b.micro_batch,
        )
        log.info("data: %s", self.data.description)
        log.info(
            "training %d steps of %d tokens (batch %d x %d), %d held-out windows",
            tc.steps,
            tc.batch_size * tc.seq_len,
            tc.batch_size,
            tc.seq_len,
            self.data.held_out_windows,
        )

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict:
        return model_inputs(batch, self.device, self.groups.sp)

    # -- one optimizer step -----------------------------------------------------------------

    def train_step(
        self, micro_batches: list[dict], stop: StopSignal
    ) -> tuple[StepStats, float, float]:
        world, accumulation = self.layout.world, len(micro_batches)
        # The step's target count over every rank, before the first backward.
        targets = torch.tensor([sum(count_targets(b["labels"]) for b in micro_batches)])
        comm.all_reduce(targets)
        n_targets = int(targets.item())
        lm_sum, aux_sum, bad = 0.0, 0.0, False
        pooled: list[RouterStats] = []
        for m, batch in enumerate(micro_batches):
            out = self.engine(**self.inputs(batch), logits=False)
            # The summed token cross-entropy; DeepSpeed averages the gradients over ranks.
            with self.engine.autocast():
                lm = cross_entropy_sum(self.engine.module, out, batch["labels"].to(self.device))
            loss = lm * (world / n_targets)
            if out.moe_stats:
                moe = self.cfg.model.moe
                aux, stats = pooled_moe_aux(out.moe_stats, moe, comm.all_reduce)
                loss = loss + aux * (world / accumulation)
                aux_sum += sum(moe_aux(s, moe).item() for s in stats) / accumulation
                pooled = (
                    stats if not pooled else [a + b for a, b in zip(pooled, stats, strict=True)]
                )
            value = lm.item()
            bad |= not math.isfinite(value)
            lm_sum += value
            self.engine.backward(loss, last=m == accumulation - 1)
        flags = torch.tensor([float(bad), float(stop.received is not None), lm_sum])
        comm.all_reduce(flags)
        bad, stopping = flags[0].item() > 0, flags[1].item() > 0
        lm_loss = flags[2].item() / n_targets
        lr = lr_at(self.step, self.cfg.train)
        applied, grad_norm = self.engine.step(lr, skip=bad)
        step_stats = StepStats(lm_loss + aux_sum, lm_loss, n_targets, not applied, stopping, pooled)
        return step_stats, lr, grad_norm

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy (without MoE auxiliary losses) per target token, each rank
        taking every dp-th sample and the sums reduced over ranks: ``eval_loss`` over all
        sources and, with several sources, ``eval_loss/<name>`` for each."""
        names, dp, r = self.data.names, self.layout.dp, self.layout.dp_rank
        sums = torch.zeros(len(names), 2, dtype=torch.float64)
        self.engine.ds.eval()
        micro = self.batches.micro_batch
        for source, batch in self.data.held_out:
            n = len(batch["input_ids"])
            rows = list(range(r, n, dp))
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights in each).
            for lo in range(0, math.ceil(n / dp), micro):
                part = select_rows(
                    batch, rows[lo : lo + micro] or [0], self.layout.sp_rank, self.layout.sp
                )
                if not rows[lo : lo + micro]:  # nothing left here: a forward that counts nothing
                    part["labels"] = torch.full_like(part["labels"], IGNORE_INDEX)
                out = self.engine(**self.inputs(part), logits=False)
                labels = part["labels"].to(self.device)
                targets = count_targets(labels)
                if targets:
                    with self.engine.autocast():
                        lm = cross_entropy_sum(self.engine.module, out, labels)
                    sums[source, 0] += lm.item()
                    sums[source, 1] += targets
        self.engine.ds.train()
        comm.all_reduce(sums)
        result = {"eval_loss": (sums[:, 0].sum() / sums[:, 1].sum()).item()}
        if len(names) > 1:
            result.update(
                {
                    f"eval_loss/{n}": (s[0] / s[1]).item()
                    for n, s in zip(names, sums, strict=True)
                    if s[1]
                }
            )
        return result

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, metrics: dict[str, float]) -> Path:
        tc = self.cfg.train
        assert self.data.tokenizer is not None  # checked when the trainer was built
        request = SaveRequest(
            step=self.step,
            cfg=self.cfg,
            layout={**self.layout.describe(), "zero_stage": self.cfg.parallel.zero_stage},
            tokenizer=self.data.tokenizer,
            trainer={
                "optimizer_steps": self.engine.optimizer_steps(),
                "bad_streak": self.bad_streak,
                "skipped_steps": self.skipped,
                "tokens_seen": self.step * tc.batch_size * tc.seq_len,
                "data": self.data.loader.state_dict(),
            },
            metrics=metrics,
        )
        return save_checkpoint(
            self.run_dir,
            request,
            self.engine.params,
            self.engine.full_state,
            persistent_buffers(self.engine.module),
            keep=tc.keep_checkpoints,
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, tc, main = self.cfg, self.cfg.train, self.layout.is_main
        start = self.step
        metrics = wandb = None  # the main rank's; None on the others
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            )
            metrics = MetricsFile(
                self.run_dir / "metrics.jsonl", keep_until_step=start if self.resume_from else None
            )
            wandb = WandbLogger(cfg.wandb, self.run_dir, cfg.to_dict(), self.layout.describe())
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        peak, peak_source = peak_flops(self.device, dtype)
        if main:
            log.info(
                "peak for MFU: %s",
                f"{peak / 1e12:.2f} TFLOP/s per device ({peak_source})" if peak else peak_source,
            )

        def record(r: dict) -> None:
            if metrics is not None and wandb is not None:
                metrics.write(r)
                wandb.log(r, r["step"])

        first_eval = last_eval = last_loss = None
        evaluating = tc.eval_batches > 0
        if start == 0 and evaluating:
            result = self.evaluate()
            first_eval = last_eval = result["eval_loss"]
            record({"step": 0, **result})
            if main:
                log.info("step 0: held-out loss %.4f", first_eval)

        progress = Progress(tc.steps, start) if main else None  # the main rank's, as above
        tokens_per_step = tc.batch_size * tc.seq_len
        window_steps, window_t0 = 0, time.perf_counter()
        stopped_by = None
        with StopSignal() as stop:
            while self.step < tc.steps:
                micro_batches = self.data.loader.next_micro_batches(self.batches.accumulation)
                stats, lr, grad_norm = self.train_step(micro_batches, stop)
                self.step += 1
                window_steps += 1
                last_loss = stats.loss
                if stats.bad:
                    self.skipped += 1
                    self.bad_streak += 1
                    if progress is not None:
                        progress.write(
                            f"step {self.step}: non-finite loss or gradient norm; the update "
                            f"was skipped ({self.bad_streak} in a row, {self.skipped} in all)"
                        )
                else:
                    self.bad_streak = 0

                entry: dict[str, object] | None = None
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    elapsed = time.perf_counter() - window_t0
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                    entry = {
                        "step": self.step,
                        "loss": stats.loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "mfu": mfu(tokens_per_s, self.flops_per_token, peak, self.layout.world),
                        "peak_memory_gb": self.peak_memory(),
                        "skipped_steps": self.skipped,
                        "elapsed_s": time.perf_counter() - self.t_start,
                    }
                    if stats.moe:
                        entry["moe_aux_loss"] = stats.loss - stats.lm_loss
                        entry["moe_load_imbalance"] = max(s.load_imbalance() for s in stats.moe)
                        entry["moe_dropped"] = max(s.dropped_fraction() for s in stats.moe)
                        entry["moe_expert_counts"] = [s.counts.long().tolist() for s in stats.moe]
                    record(entry)
                    window_steps, window_t0 = 0, time.perf_counter()
                if progress is not None:
                    progress.update(self.step, tc.steps, entry)

                if self.bad_streak >= tc.max_bad_steps:
                    last = (
                        f"; the last good checkpoint is {self.checkpoint}"
                        if self.checkpoint
                        else ""
                    )
                    raise TrainError(
                        f"{self.bad_streak} steps in a row had a non-finite loss or gradient "
                        f"norm (train.max_bad_steps={tc.max_bad_steps}), up to step "
                        f"{self.step}; stopping{last}. Try a lower train.lr"
                    )
                if evaluating and (
                    (tc.eval_every and self.step % tc.eval_every == 0) or self.step == tc.steps
                ):
                    result = self.evaluate()
                    last_eval = result["eval_loss"]
                    record({"step": self.step, **result})
                    if progress is not None:
                        progress.write(f"step {self.step}: held-out loss {last_eval:.4f}")
                if stats.stop:
                    stopped_by = stop.received or "a signal on another rank"
                at_exit = self.step == tc.exit_at_step
                if self.checkpoints and (
                    (tc.save_every and self.step % tc.save_every == 0)
                    or self.step == tc.steps
                    or at_exit
                    or stopped_by
                ):
                    self.checkpoint = self.save({"eval_loss": last_eval} if last_eval else {})
                    if progress is not None:
                        progress.write(f"step {self.step}: saved checkpoint {self.checkpoint}")
                if stopped_by and self.step < tc.steps:
                    if progress is not None:
                        progress.write(
                            f"step {self.step}: stopping on {stopped_by}; the checkpoint is "
                            f"complete, continue with --resume auto"
                        )
                    break
                if at_exit and self.step < tc.steps:
                    if progress is not None:
                        progress.write(
                            f"step {self.step}: stopping as asked (train.exit_at_step); "
                            "resume with --resume auto"
                        )
                    break
        if progress is not None and metrics is not None and wandb is not None:
            progress.close()
            metrics.close()
            wandb.finish()
        if last_eval is None and evaluating:
            last_eval = self.evaluate()["eval_loss"]
        # set by the save at the last step or at a stop, or by resuming a run already at its end
        assert self.checkpoint is not None or not self.checkpoints
        return RunResult(
            self.run_dir, self.checkpoint, self.step, first_eval, last_eval, last_loss, stopped_by
        )

    def peak_memory(self) -> list[float]:
        """Peak memory of every rank in GB (CUDA allocator peak, or the process's peak RSS)."""
        if self.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.device) / 1e9
        else:
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
        every = torch.zeros(self.layout.world)
        every[self.layout.rank] = mine
        comm.all_reduce(every)
        return [round(v, 3) for v in every.tolist()]


def train(cfg: Config, resume: str | None = None) -> RunResult:
    """Train ``cfg`` in this process, as one rank of whatever torchrun started.

    torch.distributed is ended at the end of the run unless it was running before the
    call: ``hylas sweep`` keeps one process group, and groups of its own, for all its runs."""
    with process_group_scope():
        return Trainer(cfg, resume).run()


@contextmanager
def process_group_scope() -> Iterator[None]:
    """Ends torch.distributed on the way out if it was not running on the way in."""
    started_here = not dist.is_initialized()
    try:
        yield
    finally:
        if started_here:
            shutdown()
