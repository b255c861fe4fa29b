"""The recall measure of ``hylas sweep``: train an architecture from scratch on MQAR
(``hylas.train.experiments.mqar``) for a fixed budget and report its accuracy at the query
positions.

The training is a run of Hylas's own trainer (``hylas.train.trainer``; no second training
loop): fp32, no checkpoints, data-parallel over the ranks of a torchrun job, the batches
from MQAR (``MQARSource``, the same samples on every layout). Everything is drawn from
``seed`` (model init, training batches, held-out batches), so every rank returns the same
number, and so does every layout.

The probe trains the run's layer pattern, mixers and options at a width of its own
(``WIDTH``, the run's head size; 0 = the run's width), as Zoology measures recall at
widths of 64 to 256: what decides recall is the pattern, and a narrow probe keeps the
measure affordable next to the run. The budget below was found by trying on 2 CPU cores,
8 layers at width 64 (docs/benchmarks.md, "Ratio sweep", has the numbers): with 4 pairs
in 64 tokens, a vocabulary of 16 and 300 steps of 32 samples, all-softmax stays on the
plateau where it answers with one of the context's values (accuracy ~ 1 / pairs) while
gated_deltanet layers, whose short convolutions give them the previous-token feature an
induction circuit needs, learn the lookup outright (gla layers, at this budget, do not).
A vocabulary of 64, 6 pairs, a query at every free slot (keys repeated, each repeat a
distractor followed by filler) or a learning rate of 3e-3 kept all-softmax on the plateau
too. An all-softmax model reaches the lookup after about 20,000 samples (300 steps of
64 at width 128 gave 0.49): ``--recall-steps`` buys that where the compute is.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hylas.configs.base import ConfigError
from hylas.model.config import ModelConfig
from hylas.parallel.mesh import Layout
from hylas.train.config import Config, ParallelConfig, TrainConfig
from hylas.train.engine import BatchLayout
from hylas.train.experiments.mqar import MQARConfig, MQARSource, mqar_accuracy
from hylas.train.inputs import Data, DataFactory

log = logging.getLogger("hylas")

STEPS = 300
BATCH_SIZE = 32
LR = 2e-3
WIDTH = 64
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1  # of the steps; then a half cosine down to MIN_LR_RATIO x lr
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0
EVAL_BATCHES = 16  # held-out batches of BATCH_SIZE samples, pairs queries each
LOG_EVERY = 50
MODEL_VOCAB_FLOOR = 260  # ModelConfig refuses smaller vocabularies; extra rows are never seen


def probe_config(model: ModelConfig, vocab_size: int, width: int = WIDTH) -> ModelConfig:
    """``model`` with MQAR's vocabulary and, where ``width`` differs from its d_model, that
    d_model: the same head size (at least one head, GQA kept where it divides), the
    feed-forward and expert sizes scaled with the width; pattern, mixers and options kept."""
    cfg = replace(model, vocab_size=max(vocab_size, MODEL_VOCAB_FLOOR))
    if not width or width == model.d_model:
        return cfg.validate()
    if width < 1:
        raise ConfigError(f"the recall probe's width must be positive (or 0), got {width}")
    heads = max(1, width // (model.d_model // model.n_heads))
    group = model.n_heads // model.kv_heads
    kv = heads // group if heads % group == 0 and heads >= group else heads

    def scaled(size: int | None) -> int | None:
        return None if size is None else max(1, size * width // model.d_model)

    return replace(
        cfg,
        d_model=width,
        n_heads=heads,
        n_kv_heads=None if model.n_kv_heads is None else kv,
        d_ff=scaled(model.d_ff),
        moe=replace(model.moe, d_expert=scaled(model.moe.d_expert)),
    ).validate()


def mqar_recall(
    model: ModelConfig,
    mqar: MQARConfig,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    eval_batches: int = EVAL_BATCHES,
    threads: int | None = None,
    width: int = WIDTH,
    out_dir: str | Path | None = None,
) -> dict:
    """Train ``model``'s architecture (vocabulary replaced by MQAR's) from scratch on fresh
    MQAR batches for ``steps`` optimizer steps, with Hylas's trainer, then measure recall
    on held-out batches. ``width`` narrows the model to that d_model (``probe_config``);
    0 keeps its own.

    The run is the trainer's, with no checkpoints: data-parallel over the ranks of a
    torchrun job (every rank returns the same numbers), fp32, its config and metrics in
    ``out_dir`` (a temporary directory when None). Returns {"recall": accuracy at the
    query positions, "loss": the last step's training loss, "seconds": wall time of the
    whole call, "steps": steps}. ``threads`` sets torch's intra-op threads for the call
    (restored after).
    """
    from hylas.train.trainer import Trainer, process_group_scope

    t0 = time.perf_counter()
    mqar.validate()
    if steps < 1 or batch_size < 1 or eval_batches < 1:
        raise ValueError(
            f"recall needs steps, batch_size and eval_batches >= 1, got {steps}, "
            f"{batch_size}, {eval_batches}"
        )
    old_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hylas-recall-"))
        cfg = probe_run(model, mqar, steps, batch_size, lr, seed, width, threads, out_dir)
        log.info(
            "recall: %s (%s), MQAR %d pairs in %d tokens (vocab %d), %d steps of %d, seed %d",
            cfg.model.pattern,
            cfg.model.linear_mixer,
            mqar.pairs,
            mqar.seq_len,
            mqar.vocab_size,
            steps,
            batch_size,
            seed,
        )
        try:
            with process_group_scope():
                trainer = Trainer(cfg, None, data=mqar_data(mqar, seed), checkpoints=False)
                result = trainer.run()
                net = trainer.engine.module.eval()
                eval_gen = torch.Generator().manual_seed(2 * seed + 1)  # see mqar_data
                recall = mqar_accuracy(
                    lambda ids: net(ids.to(trainer.device)).logits,
                    mqar,
                    eval_batches,
                    batch_size,
                    eval_gen,
                )
        finally:
            torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    loss = result.last_loss
    assert loss is not None  # steps >= 1
    log.info("recall: %s %.3f (loss %.3f) in %.0f s", cfg.model.pattern, recall, loss, seconds)
    return {"recall": recall, "loss": loss, "seconds": seconds, "steps": steps}


def mqar_data(mqar: MQARConfig, seed: int) -> DataFactory:
    """The trainer's data for a probe: MQAR batches from a generator seeded 2 seed (the
    held-out batches come from 2 seed + 1, so no seed's held-out batches are another
    seed's, or its own, training batches), no held-out set of the trainer's own."""

    def data(cfg: Config, layout: Layout, batches: BatchLayout) -> Data:
        gen = torch.Generator().manual_seed(2 * seed)
        source = MQARSource(mqar, cfg.train.batch_size, gen, layout.dp_rank, layout.dp)
        description = f"MQAR, {mqar.pairs} pairs in {mqar.seq_len} tokens (vocab {mqar.vocab_size})"
        return Data(None, source, [], ["mqar"], description)

    return data


def probe_run(
    model: ModelConfig,
    mqar: MQARConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    width: int,
    threads: int | None,
    out_dir: str | Path,
) -> Config:
    """The probe's run: its model (``probe_config``), the pinned optimizer settings, fp32,
    one sequence-parallel rank, no ZeRO, no held-out evaluation, no wandb."""
    return Config(
        model=probe_config(model, mqar.vocab_size, width),
        train=TrainConfig(
            steps=steps,
            seq_len=mqar.seq_len,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
            min_lr_ratio=MIN_LR_RATIO,
            schedule="cosine",
            weight_decay=WEIGHT_DECAY,
            beta1=0.9,
            beta2=0.95,
            grad_clip=GRAD_CLIP,
            seed=seed,
            out_dir=str(out_dir),
            dtype="float32",
            eval_batches=0,
            log_every=LOG_EVERY,
            threads=threads or 0,
        ),
        parallel=ParallelConfig(sp=1, zero_stage=0),
    ).validate()
