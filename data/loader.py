"""Packed, shuffled, resumable batches from prepared data, sharded over dp x sp.

The packed stream of a source in epoch e is its training documents in a shuffled order
(seeded by (seed, source, e)), each followed by EOS. Sample j of the epoch is the input
window ``stream[j*T : j*T + T]`` with labels ``stream[j*T + 1 : j*T + T + 1]`` (T = seq_len),
and an epoch of S tokens has ceil((S - 1) / T) samples: every token but the first is a label
exactly once, and every token is an input once (but the final EOS when it would be a
sample's only token: it has nothing to predict). The last sample of an epoch is padded (PAD
inputs, label -100) where the stream ends, so every sample has at least one label. Samples are then
visited in a second seeded order, so one long document does not fill a batch.

A mixture of sources is a weighted interleaving of their sample sequences: each next sample
comes from the source furthest behind its share (weight * samples so far), so the mix holds
at every step, not only on average (each source within about one sample of its share: under
one in the tests, which use up to three sources), and a source starts its next epoch on its
own when its samples run out. Batches never drop anything: a step can straddle an epoch.

Step s takes the next dp * batch_size samples of that one global sequence; data-parallel
rank r keeps samples [r * batch_size, (r + 1) * batch_size) and sequence-parallel rank q
keeps columns [q * T / sp, (q + 1) * T / sp) of each. A batch is the dict of docs/architecture.md:
``input_ids``, ``labels`` [B, T / sp]; when a document starts inside a sample (always when
sp > 1), ``position_ids`` [B, T / sp] (the token's position in its document, counted across
sp segments; a sample is its own sequence, so a document carried over from the previous sample
counts from the sample's start) and ``cu_seqlens`` int32 over this rank's
flattened tokens (every document start, and every sample's segment start); with sp > 1 also
``global_cu_seqlens`` over the whole B x T samples, which softmax layers need, and
``segment_start`` (q * T / sp). A rank that receives a segment whose first position id is
not 0 continues the document of the rank before it.

The loader's state is the number of samples taken from each source (``state_dict``); a run
resumed from it sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hylas.configs.base import IGNORE_INDEX
from hylas.data.dataset import Split
from hylas.data.sources import DataError

STATE_VERSION = 1


@dataclass
class _Epoch:
    order: np.ndarray  # document order
    cum: np.ndarray  # int64 [D + 1]: stream offset of each document in that order
    samples: np.ndarray  # sample visiting order


class PackedSource:
    """One source's split as an endless sequence of shuffled samples, epoch after epoch."""

    def __init__(self, split: Split, seq_len: int, seed: int, index: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.index, self.shuffle = index, shuffle
        self.stream_tokens = split.num_tokens
        if self.stream_tokens == 0:
            raise DataError(f"the {split.name} split has no tokens")
        self.samples_per_epoch = max(1, -(-(self.stream_tokens - 1) // seq_len))
        self._epochs: dict[int, _Epoch] = {}

    def _epoch(self, e: int) -> _Epoch:
        if e not in self._epochs:
            if len(self._epochs) >= 2:  # the current epoch and the next are all a step needs
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng((self.seed, self.index, e))
            n_docs = self.split.num_documents
            order = rng.permutation(n_docs) if self.shuffle else np.arange(n_docs)
            cum = np.zeros(n_docs + 1, np.int64)
            np.cumsum(self.split.doc_len[order], out=cum[1:])
            samples = (
                rng.permutation(self.samples_per_epoch)
                if self.shuffle
                else np.arange(self.samples_per_epoch)
            )
            self._epochs[e] = _Epoch(order, cum, samples)
        return self._epochs[e]

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, sample within the epoch's stream) of the source's k-th sample."""
        e, j = divmod(k, self.samples_per_epoch)
        return e, int(self._epoch(e).samples[j])

    def window(self, k: int, out: np.ndarray) -> tuple[int, list[int]]:
        """Write the k-th sample's T + 1 tokens into ``out`` (PAD past the stream's end);
        returns (valid tokens, positions 1..T-1 where a document starts)."""
        e, j = self.locate(k)
        ep = self._epoch(e)
        T = self.seq_len
        a = j * T
        b = min(a + T + 1, self.stream_tokens)
        d = int(np.searchsorted(ep.cum, a, side="right")) - 1
        pos = 0
        starts = []
        while ep.cum[d] < b:
            lo, hi = int(ep.cum[d]), int(ep.cum[d + 1])
            if lo > a:
                starts.append(lo - a)
            doc = self.split.document(int(ep.order[d]))
            piece = doc[max(a, lo) - lo : min(b, hi) - lo]
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
            d += 1
            if d == len(ep.order):
                break
        if b - a < T:  # the padding after the final EOS starts a segment
            starts.append(b - a)
        return b - a, [s for s in starts if s < T]


class PackedLoader:
    """This rank's batches of a weighted mixture of splits (see the module docstring)."""

    def __init__(
        self,
        splits: list[Split],
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        pad_id: int,
        weights: list[float] | None = None,
        names: list[str] | None = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        sp_rank: int = 0,
        sp_size: int = 1,
    ):
        if not splits:
            raise DataError("no data sources")
        weights = [1.0] * len(splits) if weights is None else list(weights)
        if len(weights) != len(splits) or any(not w > 0 for w in weights):
            raise DataError(
                f"mixture weights must be one positive number per source, got {weights}"
            )
        if seq_len % sp_size:
            raise DataError(
                f"train.seq_len ({seq_len}) is not divisible by the sequence-parallel size "
                f"({sp_size}); each sp rank needs an equal contiguous segment"
            )
        if not (0 <= dp_rank < dp_size and 0 <= sp_rank < sp_size):
            raise DataError(
                f"rank (dp {dp_rank}, sp {sp_rank}) is outside dp {dp_size} x sp {sp_size}"
            )
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.names = names or [f"source{i}" for i in range(len(splits))]
        self.sources = [PackedSource(s, seq_len, seed, i) for i, s in enumerate(splits)]
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.consumed = [0] * len(splits)

    # -- the global sample sequence -------------------------------------------------------

    def _next_source(self) -> int:
        g = sum(self.consumed) + 1
        behind = [w * g - c for w, c in zip(self.weights, self.consumed, strict=True)]
        return int(np.argmax(behind))  # ties: the first source

    def plan(self) -> list[tuple[int, int]]:
        """The next step's global samples as (source, k), without taking them."""
        saved = list(self.consumed)
        try:
            return self._take(self.dp_size * self.batch_size)
        finally:
            self.consumed = saved

    def _take(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            i = self._next_source()
            out.append((i, self.consumed[i]))
            self.consumed[i] += 1
        return out

    def epoch(self) -> list[float]:
        """Fractional epochs done per source."""
        return [c / s.samples_per_epoch for c, s in zip(self.consumed, self.sources, strict=True)]

    # -- batches --------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.next_micro_batches(1)[0]

    def next_micro_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the next step, as ``n`` micro-batches of equal size (in order)."""
        if self.batch_size % n:
            raise DataError(f"{self.batch_size} samples do not split into {n} equal micro-batches")
        step = self._take(self.dp_size * self.batch_size)
        mine = step[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]
        size = self.batch_size // n
        return [self._batch(mine[i : i + size]) for i in range(0, len(mine), size)]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _batch(self, samples: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        T, B = self.seq_len, len(samples)
        windows = np.full((B, T + 1), self.pad_id, np.int64)
        valid = np.zeros(B, np.int64)
        starts = []
        for row, (i, k) in enumerate(samples):
            valid[row], doc_starts = self.sources[i].window(k, windows[row])
            starts.append(doc_starts)
        return make_batch(windows, valid, starts, self.sp_rank, self.sp_size)

    # -- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed": list(self.consumed),
            "names": list(self.names),
            "documents": [s.split.num_documents for s in self.sources],
            "tokens": [s.stream_tokens for s in self.sources],
            "weights": list(self.weights),
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("documents", "tokens", "seq_len", "seed"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the checkpoint's data position was saved for other data ({key}: "
                    f"{state.get(key)} then, {mine[key]} now); resuming would not see the "
                    "same batches"
                )
        if not np.allclose(state["weights"], mine["weights"]):
            raise DataError(
                f"the checkpoint's data mixture had weights {state['weights']}, now "
                f"{mine['weights']}; resuming would not see the same batches"
            )
        self.consumed = [int(c) for c in state["consumed"]]


def make_batch(
    windows: np.ndarray, valid: np.ndarray, starts: list[list[int]], sp_rank=0, sp_size=1
) -> dict[str, torch.Tensor]:
    """Samples of T + 1 tokens (``valid[b]`` real ones, document starts ``starts[b]``) as
    this sp rank's batch."""
    B, T = windows.shape[0], windows.shape[1] - 1
    x = torch.from_numpy(windows)
    input_ids, labels = x[:, :-1], x[:, 1:].clone()
    cols = torch.arange(T)
    labels[cols.expand(B, T) >= torch.from_numpy(valid - 1)[:, None]] = IGNORE_INDEX

    is_start = torch.zeros(B, T, dtype=torch.bool)
    is_start[:, 0] = True
    for b, s in enumerate(starts):
        is_start[b, s] = True
    return _segment(input_ids, labels, is_start, sp_rank, sp_size)


def _segment(input_ids, labels, is_start, sp_rank: int, sp_size: int) -> dict[str, torch.Tensor]:
    """Columns [q T / sp, (q + 1) T / sp) of whole samples whose documents start where
    ``is_start`` [B, T] is set, as this sp rank's batch (the module docstring's keys)."""
    T = input_ids.shape[1]
    L = T // sp_size
    lo, hi = sp_rank * L, (sp_rank + 1) * L
    batch = {"input_ids": input_ids[:, lo:hi].contiguous(), "labels": labels[:, lo:hi].contiguous()}
    if sp_size == 1 and not is_start[:, 1:].any():
        return batch  # no document edge inside: the model's plain causal path

    # position in the document: t minus the latest start at or before t
    cols = torch.arange(T)
    last_start = torch.where(is_start, cols, torch.zeros_like(cols)).cummax(dim=1).values
    batch["position_ids"] = (cols - last_start)[:, lo:hi].contiguous()
    local = is_start[:, lo:hi].clone()
    local[:, 0] = True  # a segment is a sequence of the local kernel; LASP-2 links them
    batch["cu_seqlens"] = _cu_seqlens(local)
    if sp_size > 1:
        batch["global_cu_seqlens"] = _cu_seqlens(is_start)
        batch["segment_start"] = torch.tensor(lo)
    return batch


def select_rows(
    batch: dict[str, torch.Tensor], rows: list[int], sp_rank: int = 0, sp_size: int = 1
) -> dict[str, torch.Tensor]:
    """The samples ``rows`` of an (sp = 1) batch with their document boundaries, as sp
    rank ``sp_rank``'s segment of them."""
    starts = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    starts[:, 0] = True
    if "cu_seqlens" in batch:
        starts.view(-1)[batch["cu_seqlens"][:-1].long()] = True
    return _segment(batch["input_ids"][rows], batch["labels"][rows], starts[rows], sp_rank, sp_size)


def _cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    flat = starts.flatten()
    return torch.cat([flat.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)


def eval_batches(
    splits: list[Split],
    seq_len: int,
    batch_size: int,
    max_batches: int,
    *,
    pad_id: int,
    weights: list[float] | None = None,
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Fixed held-out batches, the same every call: (source, batch) pairs, each batch from
    one source, its samples spread evenly over the source's held-out stream in document
    order. Sources share the ``max_batches`` by weight (at least one batch each)."""
    weights = [1.0] * len(splits) if weights is None else weights
    total = sum(weights)
    out = []
    for i, split in enumerate(splits):
        src = PackedSource(split, seq_len, seed=0, index=i, shuffle=False)
        n_batches = max(1, round(max_batches * weights[i] / total))
        n = min(src.samples_per_epoch, n_batches * batch_size)
        picks = np.linspace(0, src.samples_per_epoch - 1, n).round().astype(np.int64)
        for lo in range(0, n, batch_size):
            rows = picks[lo : lo + batch_size]
            windows = np.full((len(rows), seq_len + 1), pad_id, np.int64)
            valid = np.zeros(len(rows), np.int64)
            starts = []
            for r, k in enumerate(rows):
                valid[r], s = src.window(int(k), windows[r])
                starts.append(s)
            out.append((i, make_batch(windows, valid, starts)))
    return out
