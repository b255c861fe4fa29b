"""From the prepared data to the model's inputs: the tokenizer, this rank's training loader
and the held-out batches a run's config names (``open_data``), and a loader batch as the
model's keyword arguments (``model_inputs``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from filelock import FileLock

from hylas.configs.base import TrainError
from hylas.data.dataset import PreparedData
from hylas.data.loader import PackedLoader, eval_batches
from hylas.data.prepare import cache_root, prepare_embedded_corpus
from hylas.data.tokenizer import Tokenizer
from hylas.parallel import sp
from hylas.parallel.mesh import Layout
from hylas.train.checkpoint import Checkpoint
from hylas.train.config import Config
from hylas.train.engine import BatchLayout

log = logging.getLogger("hylas")


@torch.no_grad()
def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, sp_group: dist.ProcessGroup | None = None
) -> dict:
    """The loader's batch as model keyword arguments (document boundaries when present);
    an sp rank's segment also gets its place in the whole samples (``parallel.sp``)."""
    keys = ("input_ids", "position_ids")  # the labels are the loss's (train.loss)
    inputs: dict[str, torch.Tensor | sp.Segment] = {
        k: batch[k].to(device) for k in keys if k in batch
    }
    if "cu_seqlens" in batch:  # stays on the host: the model reads it there once, no sync
        inputs["cu_seqlens"] = batch["cu_seqlens"]
    if "global_cu_seqlens" in batch:
        assert sp_group is not None, "a sequence-parallel batch needs its sp group"
        B, L = batch["input_ids"].shape
        start = int(batch["segment_start"])
        inputs["segment"] = sp.Segment(sp_group, batch["global_cu_seqlens"], start, B, L, device)
    return inputs


class BatchSource(Protocol):
    """What the trainer draws its training batches from: ``PackedLoader``, or a synthetic
    task's source (``hylas.train.experiments.mqar.MQARSource``)."""

    def next_micro_batches(self, n: int) -> list[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Data:
    """What a run trains and evaluates on. ``tokenizer`` is None for a synthetic task,
    whose run keeps no checkpoints (a checkpoint carries its tokenizer)."""

    tokenizer: Tokenizer | None
    loader: BatchSource
    held_out: list  # (source index, batch) pairs
    names: list[str]
    description: str

    @property
    def held_out_windows(self) -> int:
        return sum(len(b["input_ids"]) for _, b in self.held_out)


# What a trainer gets its data from: ``open_data`` (cfg.data's prepared data) or a
# synthetic task's (``hylas.train.experiments.recall.mqar_data``).
DataFactory = Callable[[Config, Layout, BatchLayout], Data]


def check_same_tokenizer(start: Checkpoint, tokenizer: Tokenizer) -> None:
    """train.init_from: the data must be tokenized as the starting model was trained."""
    theirs = start.tokenizer()
    if (theirs.sha256, theirs.eos_id) != (tokenizer.sha256, tokenizer.eos_id):
        raise TrainError(
            f"{start.path} was trained with another tokenizer than the data's "
            f"({theirs.file.name} sha256 {theirs.sha256[:12]}... vs {tokenizer.sha256[:12]}...); "
            f"prepare the data with: hylas data prepare --tokenizer {start.path / 'tokenizer'} ..."
        )


def open_data(cfg: Config, layout: Layout, batches: BatchLayout) -> Data:
    """The tokenizer, this rank's training loader and the held-out batches of ``cfg.data``."""
    tc, dc = cfg.train, cfg.data
    if not dc.sources:
        # One process per node prepares the cache; the others wait for it, then reuse it.
        cache_root().mkdir(parents=True, exist_ok=True)
        with FileLock(cache_root() / ".prepare.lock"):
            tok_dir, data_dir = prepare_embedded_corpus(cfg.model.vocab_size)
        paths, weights, names = [data_dir], [1.0], ["shakespeare"]
        tokenizer_dir: Path | None = Path(dc.tokenizer) if dc.tokenizer else tok_dir
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
        batches.per_rank,
        tc.seed,
        pad_id=tokenizer.pad_id,
        weights=weights,
        names=names,
        dp_rank=layout.dp_rank,
        dp_size=layout.dp,
        sp_rank=layout.sp_rank,
        sp_size=layout.sp,
    )
    with_val = [
        i for i, p in enumerate(prepared) if p.splits.get("val") and p.splits["val"].num_documents
    ]
    if tc.eval_batches == 0:  # no evaluation: the held-out split is not read
        with_val = []
    elif not with_val:
        raise TrainError(
            f"no held-out documents in {', '.join(map(str, paths))} (prepared with --val-fraction 0?); "
            "prepare it again with hylas data prepare --input ... --tokenizer ... --out NEW "
            "--val-fraction 0.005"
        )
    held_out = []
    if with_val:
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
