"""Gated DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear
RNNs via Householder Products"): each token decays the state once, then takes n_h
Householder steps, each with its own key, value and write strength.

    S = exp(g_t) S_{t-1};   for j = 1..n_h:  S = (I - beta_tj k_tj^T k_tj) S + beta_tj k_tj^T v_tj
    S_t = S;   o_t = scale * q_t S_t

Shapes: q [B, T, H, K]; k [B, T, n_h, H, K] (L2-normalised rows); v [B, T, n_h, H, V];
beta [B, T, n_h, H] in [0, 1], or [0, 2] for negative eigenvalues; g [B, T, H] log decay,
<= 0, used in fp32. States are [N, H, K, V] fp32 (N = B, or the number of documents with
``cu_seqlens``, where B == 1); outputs are in v's dtype; ``scale=None`` means K ** -0.5.

The family rides on the delta-rule engine: this is the gated delta rule over T x n_h
micro-steps, token t's j-th step at t n_h + j, with g on each token's first step (0
elsewhere) and q on its last (the output read there, after every step). Every call here,
the LASP-2 protocol included, is ``gated_delta_rule``'s on that interleaved sequence.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from hylas.kernels import gated_delta_rule
from hylas.kernels.common import default_scale
from hylas.kernels.family import FamilySpec, Gate
from hylas.kernels.layout import Documents

__all__ = [
    "SPEC",
    "chunk",
    "entering_state_grad",
    "local_transition",
    "naive",
    "recurrent",
    "transition",
]


def _check(q, k, v, g, beta) -> tuple[int, int, int, int, int, int]:
    """(B, T, n_h, H, K, V) of a call, or one sentence naming what does not fit."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.dim() != 5 or k.shape[:2] != q.shape[:2] or k.shape[3:] != (H, K):
        raise ValueError(
            f"k must be [B, T, n_h, H, K] = [{B}, {T}, n_h, {H}, {K}], got {tuple(k.shape)}"
        )
    n = k.shape[2]
    if v.dim() != 5 or v.shape[:4] != k.shape[:4]:
        raise ValueError(
            f"v must be [B, T, n_h, H, V] = [{B}, {T}, {n}, {H}, V], got {tuple(v.shape)}"
        )
    if beta is None or tuple(beta.shape) != tuple(k.shape[:4]):
        got = None if beta is None else tuple(beta.shape)
        raise ValueError(f"beta must be {list(k.shape[:4])} (a write strength per step), got {got}")
    if g is None or tuple(g.shape) != (B, T, H):
        got = None if g is None else tuple(g.shape)
        raise ValueError(f"g must be {[B, T, H]} (log decay, once per token), got {got}")
    return B, T, n, H, K, v.shape[-1]


def _interleave(q, k, v, g, beta, do=None):
    """The gated delta rule's inputs over the T x n_h micro-steps (and ``do`` placed on
    each token's last step, for the protocol's gradient)."""
    n = _check(q, k, v, g, beta)[2]
    q_steps = F.pad(q.unsqueeze(2), (0, 0, 0, 0, n - 1, 0))  # q on the last step
    g_steps = F.pad(g.unsqueeze(2), (0, 0, 0, n - 1))  # g on the first step
    out = [x.flatten(1, 2) for x in (q_steps, k, v, g_steps, beta)]
    if do is not None:
        out.append(F.pad(do.unsqueeze(2), (0, 0, 0, 0, n - 1, 0)).flatten(1, 2))
    return out, n


def _steps(cu_seqlens, q, n):
    """The documents over the micro-steps: each offset times n (made once per batch)."""
    docs = Documents.of(cu_seqlens, q.shape[0], q.shape[1])
    return None if docs is None else docs.steps(n)


def _on_steps(call, q, k, v, g, beta, scale, **kw):
    """``gated_delta_rule``'s ``call`` over the micro-steps, read at each token's last."""
    (qs, ks, vs, gs, bs), n = _interleave(q, k, v, g, beta)
    if kw.get("cu_seqlens") is not None:
        kw["cu_seqlens"] = _steps(kw["cu_seqlens"], q, n)
    scale = default_scale(scale, q.shape[-1])
    o, ht = call(qs, ks, vs, gs, bs, scale=scale, **kw)
    B, TN, H, V = o.shape
    return o.view(B, TN // n, n, H, V)[:, :, -1], ht


def chunk(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Chunkwise, with gradients for q, k, v, g, beta and initial_state. backend: auto | torch | triton."""
    return _on_steps(
        gated_delta_rule.chunk,
        *(q, k, v, g, beta, scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


def recurrent(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True, backend="auto"
):
    """Decode a few tokens from ``initial_state`` [B, H, K, V] (fused Triton on CUDA).

    backend: auto | torch | triton, as for ``chunk``."""
    return _on_steps(
        gated_delta_rule.recurrent,
        *(q, k, v, g, beta, scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        backend=backend,
    )


def naive(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The fp32 per-token recurrence, written from the paper (not from the interleaving):
    the oracle, differentiable."""
    B, T, n, H, K, V = _check(q, k, v, g, beta)
    scale = default_scale(scale, K)
    dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    docs = Documents.of(cu_seqlens, B, T)
    if docs is None:
        rows = [(b, 0, T) for b in range(B)]
    else:
        rows = [(0, s, e) for s, e in itertools.pairwise(docs.offsets)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finals = []
    for i, (b, start, end) in enumerate(rows):
        if initial_state is None:
            S = q.new_zeros(H, K, V)
        else:
            S = initial_state[i].float()
        for t in range(start, end):
            S = S * g[b, t].exp()[:, None, None]  # the decay, once, before the steps
            for j in range(n):
                kj, vj, bj = k[b, t, j], v[b, t, j], beta[b, t, j]  # [H, K], [H, V], [H]
                read = torch.einsum("hk,hkv->hv", kj, S)  # k S
                S = S + bj[:, None, None] * torch.einsum("hk,hv->hkv", kj, vj - read)
            outputs[b].append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        finals.append(S)
    o = torch.stack([torch.stack(row) for row in outputs])
    return o.to(dtype), (torch.stack(finals) if output_final_state else None)


def transition(q, k, v, g, beta, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: (A [N, H, K, K], B [N, H, K, V]) with S_out = A @ S_in + B."""
    (qs, ks, vs, gs, bs), n = _interleave(q, k, v, g, beta)
    steps = _steps(cu_seqlens, q, n)
    scale = default_scale(scale, q.shape[-1])
    return gated_delta_rule.transition(qs, ks, vs, gs, bs, scale, steps, starts_document)


def entering_state_grad(q, k, v, g, beta, do, scale=None, cu_seqlens=None, starts_document=False):
    """LASP-2: G [N, H, K, V], the gradient of the segment's outputs on its entering state."""
    (qs, ks, vs, gs, bs, dos), n = _interleave(q, k, v, g, beta, do)
    steps = _steps(cu_seqlens, q, n)
    scale = default_scale(scale, q.shape[-1])
    return gated_delta_rule.entering_state_grad(
        qs, ks, vs, gs, bs, dos, scale, steps, starts_document
    )


def local_transition(q, k, v, g, beta, scale=None, backend="auto"):
    """LASP-2: A [B, H, K, K] of S_out = A S_in + B for each row, from the local kernel."""
    (qs, ks, vs, gs, bs), _ = _interleave(q, k, v, g, beta)
    return gated_delta_rule.local_transition(
        qs, ks, vs, gs, bs, scale=default_scale(scale, q.shape[-1]), backend=backend
    )


def make_inputs(spec: FamilySpec, B: int, T: int, H: int, K: int, V: int, *, n_h: int = 2, **kw):
    """q, k (unit rows), v with ``n_h`` keys and values a token; g and beta in fp32: the
    gated delta rule's inputs (``hylas.kernels.family.standard_inputs``, the same options)
    for T x n_h micro-steps, q read from each token's last and g from its first."""
    requires_grad = kw.pop("requires_grad", True)
    steps = gated_delta_rule.SPEC.inputs(B, T * n_h, H, K, V, requires_grad=False, **kw)
    q, k, v, g, beta = (x.unflatten(1, (T, n_h)) for x in steps)
    tensors = (q[:, :, -1], k, v, g[:, :, 0], beta)
    return [x.contiguous().requires_grad_(requires_grad) for x in tensors]


# LASP-2 (docs/architecture.md, "Sequence parallelism"): as the gated delta rule's, the
# entering state changes every step's writes, so the local kernel waits for it. FLOPs per
# token are per Householder step: a mixer multiplies by its n_h.
SPEC = FamilySpec(
    "gated_deltaproduct",
    (Gate("g", "scalar"), Gate("beta", "beta")),
    split_output=False,
    delta=True,
    make_inputs=make_inputs,
)
