"""What the engines' oracles share: a per-token recurrence run over each sequence (a batch
row, or a packed document) in fp32. Each engine's oracle (``engines/gated/naive.py``,
``engines/delta/naive.py``) is its recurrence, written token by token."""

from __future__ import annotations

import itertools

import torch

from hylas.kernels.common import check_qkv, check_state, default_scale
from hylas.kernels.layout import Documents


def run_documents(recurrence, q, k, v, gates, scale, initial_state, output_final_state, cu_seqlens):
    """Run ``recurrence`` over each sequence (a batch row, or a packed document) in fp32.

    gates: per-token tensors [B, T, H, *] handed to the recurrence after v.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    scale = default_scale(scale, K)
    docs = Documents.of(cu_seqlens, B, T)
    if docs is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, s, e) for s, e in itertools.pairwise(docs.offsets)]
    check_state(initial_state, len(spans), H, K, V)
    out_dtype = v.dtype
    q, k, v, *gates = (x.float() for x in (q, k, v, *gates))
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(spans):
        state = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].float()
        pieces = [x[b, s:e] for x in (q, k, v, *gates)]
        o[b, s:e], state = recurrence(*pieces, scale, state)
        finals.append(state)
    return o.to(out_dtype), torch.stack(finals) if output_final_state else None
