"""The recall measure of ``hylas sweep``: train an architecture from scratch on MQAR
(``hylas.data.mqar``) for a fixed budget and report its accuracy at the query positions.

One process, plain torch, fp32; everything is drawn from ``seed`` (model init, training
batches, held-out batches), so the same call gives the same number on every rank.

The defaults below were tried on 2 shared CPU cores with an 8-layer, d_model 128 proxy
(the tiny recipe's shape), gated_deltanet: all-linear takes ~85 s, all-softmax ~30 s (its
step time). At about a minute a run no setting tried got past the plateau where the
model answers with one of the context's values (accuracy ~ 1 / pairs: ~0.24 at both ends
of the ratio range), though the query loss already differs (after 200 steps ~1.9 nats
all-softmax, ~2.9 all-linear): ranking ratios by recall needs a larger budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from hylas.data.mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from hylas.model.config import ModelConfig
from hylas.model.decoder import HylasLM
from hylas.train.config import TrainConfig
from hylas.train.optim import lr_at, param_groups

log = logging.getLogger("hylas")

STEPS = 200
BATCH_SIZE = 16
LR = 1e-3
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
) -> dict:
    """Train ``model``'s architecture (vocabulary replaced by MQAR's) from scratch on fresh
    MQAR batches for ``steps`` AdamW steps, then measure recall on held-out batches.

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
        cfg = replace(model, vocab_size=max(mqar.vocab_size, MODEL_VOCAB_FLOOR))
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
            out = net(input_ids.to(device), labels=labels.to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            opt.step()
            loss = out.loss.item()
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
