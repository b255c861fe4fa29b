"""Where a batch's documents start and how its tokens map to chunks: read once per batch,
shared by every layer and by both chunkwise engines (docs/architecture.md, "Op families as
units").

``Documents`` holds the packed documents of one token row: ``cu_seqlens`` checked and read
to the host once. A caller that knows the boundaries on the host (the loader's batch, on
the CPU) builds it without a device sync; the model builds it once per forward and hands
the same object to every layer, so no kernel call reads ``cu_seqlens`` again.

``ChunkLayout`` is what both engines index by: the torch engine's view [P, N, C] of the
tokens (P rows: B, or 1 when packed; N chunks a row; C tokens a chunk) and the Triton
kernels' maps over the NT = P * N chunks. A document always starts a chunk, so chunks never
straddle documents; a fixed-length batch is B documents of T tokens.
"""

from __future__ import annotations

import functools
import itertools

import torch

from hylas.kernels.common import CHUNK


class Documents:
    """The packed documents of one token row (B == 1).

    offsets: host list [0, e_1, ..., total], strictly increasing; ``cu_seqlens`` the same,
    int32, on ``device``.
    """

    def __init__(self, offsets: list[int], device: torch.device | str = "cpu"):
        self.offsets = list(offsets)
        self.device = torch.device(device)
        self._layouts: dict[tuple[int, torch.device], ChunkLayout] = {}
        self._steps: dict[int, Documents] = {}

    @classmethod
    def of(
        cls, cu_seqlens: torch.Tensor | Documents | None, batch: int, total: int
    ) -> Documents | None:
        """``cu_seqlens`` (int [N + 1]) checked against a row of ``total`` tokens, read to
        the host once (a device sync when it lives on a GPU); Documents pass through."""
        if cu_seqlens is None:
            return None
        if batch != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got {batch}")
        if isinstance(cu_seqlens, Documents):
            if cu_seqlens.total != total:
                raise ValueError(
                    f"these documents cover {cu_seqlens.total} tokens, the row has {total}"
                )
            return cu_seqlens
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
        offsets = cu_seqlens.tolist()
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total:
            raise ValueError(f"cu_seqlens must run from 0 to T={total}, got {offsets}")
        if any(b <= a for a, b in itertools.pairwise(offsets)):
            raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets}")
        return cls(offsets, cu_seqlens.device)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        return _to_device(self.offsets, self.device)

    def to(self, device: torch.device | str) -> Documents:
        device = torch.device(device)
        return self if device == self.device else Documents(self.offsets, device)

    def steps(self, n: int) -> Documents:
        """The same documents over n micro-steps a token (offsets times n), made once."""
        if n not in self._steps:
            self._steps[n] = Documents([o * n for o in self.offsets], self.device)
        return self._steps[n]

    def layout(self, device: torch.device, C: int = CHUNK) -> ChunkLayout:
        """The chunk layout of these documents at chunk length C, made once."""
        key = (C, torch.device(device))
        if key not in self._layouts:
            self._layouts[key] = ChunkLayout(1, self.total, C, key[1], self.offsets)
        return self._layouts[key]


def chunk_layout(
    B: int, T: int, docs: Documents | None, device: torch.device, C: int = CHUNK
) -> ChunkLayout:
    """The layout of a [B, T] batch: the packed documents' (made once per Documents), or
    that of B fixed-length rows (made once per shape)."""
    if docs is None:
        return _fixed_layout(B, T, C, torch.device(device))
    return docs.layout(device, C)


@functools.lru_cache(maxsize=64)
def _fixed_layout(B: int, T: int, C: int, device: torch.device) -> ChunkLayout:
    return ChunkLayout(B, T, C, device)


def _to_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values (int32 unless a tensor) on ``device``, copied without waiting for the GPU."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class ChunkLayout:
    """How tokens [B, T] map to chunks; documents restart the state.

    P rows of N chunks of C tokens: P = B for a fixed-length batch, 1 when packed. ``docs``
    documents; ``doc_first`` / ``doc_last`` the chunk (of row 0 when packed) each one starts
    and ends in. ``offsets``: packed documents' token offsets, None for fixed rows.
    """

    def __init__(
        self, B: int, T: int, C: int, device: torch.device, offsets: list[int] | None = None
    ):
        self.C, self.device, self.offsets = C, device, offsets
        if offsets is None:
            self.P, self.N, self.docs = B, -(-T // C), B
            self.counts = [self.N] * B  # chunks per document
            self.doc_first, self.doc_last = [0], [self.N - 1]
        else:
            self.counts = [-(-(e - s) // C) for s, e in itertools.pairwise(offsets)]
            self.P, self.N, self.docs = 1, sum(self.counts), len(self.counts)
            starts = list(itertools.accumulate(self.counts, initial=0))
            self.doc_first, self.doc_last = starts[:-1], [s - 1 for s in starts[1:]]
        self.start_doc = {n: d for d, n in enumerate(self.doc_first)}
        self.end_doc = {n: d for d, n in enumerate(self.doc_last)}
        self.T = T

    @property
    def packed(self) -> bool:
        return self.offsets is not None

    @property
    def NT(self) -> int:
        """Chunks in all: the Triton kernels' grid over chunks."""
        return self.P * self.N

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """Packed: [N * C] source token of each chunk slot, -1 for padding (torch engine)."""
        assert self.offsets is not None, "a fixed-length layout needs no index"
        pieces = []
        for (s, e), n in zip(itertools.pairwise(self.offsets), self.counts, strict=True):
            idx = torch.full((n * self.C,), -1, dtype=torch.long)
            idx[: e - s] = torch.arange(s, e)
            pieces.append(idx)
        return _to_device(torch.cat(pieces), self.device)

    # -- the Triton kernels' maps, int32 on the device ----------------------------------

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        """Packed: [T] the chunk slot (of the N * C) each token sits in (torch engine)."""
        assert self.offsets is not None, "a fixed-length layout needs no slots"
        pieces = [
            torch.arange(s, e) + (first * self.C - s)
            for (s, e), first in zip(itertools.pairwise(self.offsets), self.doc_first, strict=True)
        ]
        return _to_device(torch.cat(pieces), self.device)

    # A fixed-length batch's maps are made on the device; packed ones come from the host
    # offsets, once per batch.

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """[docs + 1] token offsets of the documents over the folded B * T tokens."""
        if self.offsets is not None:
            return _to_device(self.offsets, self.device)
        return self._arange(self.P + 1) * self.T

    @functools.cached_property
    def chunk_indices(self) -> torch.Tensor:
        """[NT, 2]: (document, chunk within it) of every chunk."""
        if self.offsets is not None:
            pairs = [x for d, n in enumerate(self.counts) for i in range(n) for x in (d, i)]
            return _to_device(pairs, self.device).view(-1, 2)
        idx = self._arange(self.NT)
        return torch.stack([idx // self.N, idx % self.N], 1).contiguous()

    @functools.cached_property
    def chunk_offsets(self) -> torch.Tensor:
        """[docs + 1]: the index of each document's first chunk."""
        if self.offsets is not None:
            return _to_device(list(itertools.accumulate(self.counts, initial=0)), self.device)
        return self._arange(self.P + 1) * self.N

    def _arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int32, device=self.device)
