"""The recall measure of ``hylas sweep``: train an architecture from scratch on MQAR
(``hylas.train.experiments.mqar``) for a fixed budget and report its accuracy at the query positions.

One process, plain torch, fp32; everything is drawn from ``seed`` (model init, training
batches, held-out batches), so the same call gives the same number on every rank.

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

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from hylas.configs.base import ConfigError
from hylas.model.config import ModelConfig
from hylas.model.decoder import HylasLM
from hylas.train.config import TrainConfig
from hylas.train.experiments.mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from hylas.train.loss import lm_loss
from hylas.train.optim import lr_at, param_groups

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


def evaluate_recall(
    predict: Callable[[torch.Tensor], torch.Tensor],
    mqar: MQARConfig,
    batches: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """The fraction of query positions where ``predict(input_ids [B, T]) -> logits [B, T, V]``
    puts its argmax on the bound value, over ``batches`` fresh batches from ``generator``."""
    hits = total = 0
    with torch.no_grad():
        for _ in range(batches):
            input_ids, labels = mqar_batch(mqar, batch_size, generator)
            guess = predict(input_ids).argmax(dim=-1).to(labels.device)
            at = labels != IGNORE_INDEX
            hits += int((guess[at] == labels[at]).sum())
            total += int(at.sum())
    return hits / total


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


def recall_accuracy(
    model: ModelConfig,
    mqar: MQARConfig,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    eval_batches: int = EVAL_BATCHES,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    width: int = WIDTH,
) -> dict:
    """Train ``model``'s architecture (vocabulary replaced by MQAR's) from scratch on fresh
    MQAR batches for ``steps`` AdamW steps, then measure recall on held-out batches.
    ``width`` narrows the model to that d_model (``probe_config``); 0 keeps its own.

    Returns {"recall": accuracy at the query positions, "loss": the last step's training
    loss, "seconds": wall time of the whole call, "steps": steps}. ``threads`` sets torch's
    intra-op threads for the call (restored after).
    """
    t0 = time.perf_counter()
    mqar.validate()
    if steps < 1 or batch_size < 1 or eval_batches < 1:
        raise ValueError(
            f"recall needs steps, batch_size and eval_batches >= 1, got {steps}, "
            f"{batch_size}, {eval_batches}"
        )
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = probe_config(model, mqar.vocab_size, width)
        net = HylasLM(cfg, kernel_backend="auto", seed=seed).to(device)
        # Training and held-out streams from disjoint seeds, so no seed's held-out batches
        # are another seed's (or its own) training batches.
        train_gen = torch.Generator().manual_seed(2 * seed)
        eval_gen = torch.Generator().manual_seed(2 * seed + 1)
        opt = torch.optim.AdamW(param_groups(net, WEIGHT_DECAY), lr=lr, betas=(0.9, 0.95))
        schedule = TrainConfig(
            steps=steps,
            lr=lr,
            warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
            min_lr_ratio=MIN_LR_RATIO,
            schedule="cosine",
        )
        log.info(
            "recall: %s (%s), MQAR %d pairs in %d tokens (vocab %d), %d steps of %d, seed %d",
            cfg.pattern,
            cfg.linear_mixer,
            mqar.pairs,
            mqar.seq_len,
            mqar.vocab_size,
            steps,
            batch_size,
            seed,
        )
        net.train()
        loss = float("nan")
        for step in range(steps):
            input_ids, labels = mqar_batch(mqar, batch_size, train_gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule)
            out = net(input_ids.to(device))
            step_loss = lm_loss(net, out, labels.to(device))
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            opt.step()
            loss = step_loss.item()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                log.info(
                    "recall: step %d/%d, loss %.3f, %.0f s",
                    step + 1,
                    steps,
                    loss,
                    time.perf_counter() - t0,
                )
        net.eval()
        recall = evaluate_recall(
            lambda ids: net(ids.to(device)).logits, mqar, eval_batches, batch_size, eval_gen
        )
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    log.info("recall: %s %.3f (loss %.3f) in %.0f s", cfg.pattern, recall, loss, seconds)
    return {"recall": recall, "loss": loss, "seconds": seconds, "steps": steps}
