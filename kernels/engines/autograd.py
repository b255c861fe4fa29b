"""The one autograd pattern of the chunkwise engines (torch and Triton, gated and delta).

An engine is a class with two static methods over folded tensors [B * T, H, *] (the
batch's rows laid end to end, contiguous; ``lay`` says where rows and documents start):

    forward(ctx, lay, scale, output_final_state, h0, q, k, v, *gates) -> (o, ht)
    backward(ctx, do, dht) -> (dh0, dq, dk, dv, *dgates)

``run`` folds the batch, and the pattern does what every engine would otherwise repeat:
contiguous inputs, an fp32 initial state, ``do`` materialised (zeros when the output got
no gradient), ``dht`` in fp32 or None, autocast off in the backward (the engines state
their own precisions), and each gradient cast back to its input's dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from hylas.kernels.layout import ChunkLayout


class Engine(Protocol):
    @staticmethod
    def forward(
        ctx, lay: ChunkLayout, scale: float, output_final_state: bool, h0, q, k, v, *gates
    ): ...

    @staticmethod
    def backward(ctx, do: torch.Tensor, dht: torch.Tensor | None) -> tuple: ...


def fold(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T, *] -> [B * T, *], contiguous (a view when it already is)."""
    return None if x is None else x.reshape(-1, *x.shape[2:]).contiguous()


def run(
    engine: type[Engine],
    lay: ChunkLayout,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *gates: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o [B, T, H, V] in v's dtype and the final states [D, H, K, V] fp32 (or None)."""
    B, T = q.shape[:2]
    folded = [fold(x) for x in (q, k, v, *gates)]
    o, ht = _Chunkwise.apply(engine, lay, scale, output_final_state, initial_state, *folded)
    return o.view(B, T, *o.shape[1:]), ht


class _Chunkwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, engine, lay, scale, output_final_state, initial_state, *inputs):
        ctx.engine = engine
        ctx.dtypes = [None if x is None else x.dtype for x in (initial_state, *inputs)]
        ctx.set_materialize_grads(False)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht = engine.forward(ctx, lay, scale, output_final_state, h0, *inputs)
        ctx.o_like = (o.shape, o.dtype, o.device)
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        shape, dtype, device = ctx.o_like
        do = torch.zeros(shape, dtype=dtype, device=device) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        with torch.autocast(device.type, enabled=False):
            grads = ctx.engine.backward(ctx, do, dht)
        cast = [
            None if g is None or dt is None else g.to(dt)
            for g, dt in zip(grads, ctx.dtypes, strict=True)
        ]
        return (None, None, None, None, *cast)
