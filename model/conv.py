"""The short causal depthwise convolution of the linear mixers, reset at document starts.

Legend: B batch, T tokens, C channels, W the kernel width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylas.model.layers import init_uniform


class ShortConv(nn.Module):
    """y_t = silu(sum_{i < W} w_i x_{t-i}), where x_{t-i} counts only inside t's document.

    ``seq`` is the batch's packing (``decoder.Packing``) or None; its ``seg_pos`` [B, T] is
    each token's offset from the start of its document: tap i is used only where
    seg_pos >= i, so no document sees the previous one's tail. In a padded batch (``seq.keep``)
    pad inputs count as zeros: a left-padded row sees what it sees alone, as a run that starts
    from an empty tail. The cache is the last W - 1 inputs [B, W - 1, C] (constant in
    sequence length).
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        bound = width**-0.5
        # from torch's global generator, as nn.Conv1d does, so a conv built alone is usable
        self.weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))

    def init_weights(self, gen: torch.Generator) -> None:
        """nn.Conv1d's default for a depthwise conv: kaiming-uniform with a = sqrt(5) and
        fan_in = W, i.e. Uniform(-1/sqrt(W), 1/sqrt(W)), drawn from ``gen``."""
        bound = self.width**-0.5
        init_uniform(self.weight, -bound, bound, gen)

    def forward(self, x_BTC, seq=None, tail=None):
        if seq is None:
            return self.mix(x_BTC, None, tail)
        if seq.keep is not None:  # padded: a pad is a zero input, as before a first token
            return self.mix(x_BTC * seq.keep.unsqueeze(-1).to(x_BTC.dtype), None, tail)
        return self.mix(x_BTC, seq.seg_pos, tail)

    def mix(self, x_BTC, seg_pos_BT=None, tail=None):
        """The convolution of x after ``tail`` (zeros when None), taps masked by
        ``seg_pos``; returns (y, the last W - 1 inputs)."""
        B, T, C = x_BTC.shape
        W = self.width
        if tail is None:
            tail = x_BTC.new_zeros(B, W - 1, C)
        xp = torch.cat([tail.to(x_BTC.dtype), x_BTC], dim=1)  # [B, W-1+T, C]
        w = self.weight.to(x_BTC.dtype)
        y = x_BTC * w[:, W - 1]
        for i in range(1, W):
            tap = xp[:, W - 1 - i : W - 1 - i + T] * w[:, W - 1 - i]
            if seg_pos_BT is not None:
                tap = tap * (seg_pos_BT >= i).unsqueeze(-1).to(tap.dtype)
            y = y + tap
        return F.silu(y), xp[:, T:]
