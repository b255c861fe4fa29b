"""Batches from a token stream: random training windows and fixed held-out windows.

A training batch is a pure function of (seed, step), so resuming at step s reads exactly
the batches an uninterrupted run would have read; the loader's whole state is the step.
"""

from __future__ import annotations

import numpy as np
import torch


def _to_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(windows.astype(np.int64))
    return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class RandomWindows:
    """Each sample is seq_len + 1 consecutive tokens starting at a uniformly random offset."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return _to_batch(np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]))


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows spread evenly over the held-out split; the same every call."""
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    if n_windows == 0:
        raise ValueError(f"the held-out split has {len(tokens)} tokens, fewer than seq_len + 1")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return [_to_batch(windows[i : i + batch_size]) for i in range(0, n_windows, batch_size)]
