"""Batches from a token stream: random training windows and fixed held-out windows.

A training batch is a pure function of (seed, step), so resuming at step s reads exactly
the batches an uninterrupted run would have read; the loader's whole state is the step.

Documents in the stream are separated by an end-of-document token (``eos_id``). A batch
is the dict of ARCHITECTURE.md ("What the loader hands the model"): ``input_ids`` and
``labels`` [B, T] (labels = the next token, so the EOS closing a document is followed
by the first token of the next, as in every layout), and, when a document starts inside
a sample, ``position_ids`` [B, T] (restarting at 0 after every EOS) and ``cu_seqlens``
int32 [N + 1] over the flattened B * T tokens (every document and sample start), so
every layer resets at document starts. A batch with no document start inside a sample
carries neither, and the model takes its plain causal path.
"""

from __future__ import annotations

import numpy as np
import torch


def to_batch(windows: np.ndarray, eos_id: int | None = None) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(windows.astype(np.int64))
    batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}
    if eos_id is None:
        return batch
    ids = batch["input_ids"]
    B, T = ids.shape
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id  # the token after an EOS starts a document
    if starts[:, 1:].any():
        flat = starts.flatten()
        cu = torch.cat([flat.nonzero().flatten(), torch.tensor([B * T])])
        seg = flat.cumsum(0) - 1
        batch["position_ids"] = (torch.arange(B * T) - cu[seg]).view(B, T)
        batch["cu_seqlens"] = cu.to(torch.int32)
    return batch


class RandomWindows:
    """Each sample is seq_len + 1 consecutive tokens starting at a uniformly random offset."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        eos_id: int | None = None,
    ):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.eos_id = eos_id

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])
        return to_batch(windows, self.eos_id)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, eos_id: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows spread evenly over the held-out split; the same every call."""
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    if n_windows == 0:
        raise ValueError(f"the held-out split has {len(tokens)} tokens, fewer than seq_len + 1")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return [to_batch(windows[i : i + batch_size], eos_id) for i in range(0, n_windows, batch_size)]
