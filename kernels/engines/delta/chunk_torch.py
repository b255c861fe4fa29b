"""The chunkwise delta rule in torch (WY / UT form): the CPU path of ``delta_rule`` and
``gated_delta_rule``.

Per head, with row vectors q_t, k_t in R^K, v_t in R^V, a write strength beta_t and a log
decay g_t <= 0 (g = 0 for DeltaNet), the state S in R^{K x V} follows::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t        o_t = scale q_t S_t

Legend: as in ``chunk_torch`` (P layout rows, N chunks, C chunk length, G chunks of a group).

Within a chunk, g_cum is the inclusive cumulative log decay (fp32, <= 0, non-increasing),
g_cum_L its value at the chunk's last token, Gam[i, j] = exp(g_cum_i - g_cum_j) for j <= i
(0 above the diagonal; every exponent <= 0) and h the state entering the chunk. Write
S_t = exp(g_t) S_{t-1} + k_t^T delta_t with the corrected write
delta_t = beta_t (v_t - k_t exp(g_t) S_{t-1}). Unrolling S_{t-1} inside the chunk turns
the deltas into one unit lower-triangular system (the UT transform)::

    Akk[i, j] = beta_i (k_i . k_j) Gam[i, j]  for j < i, else 0          [C, C]
    L = I + Akk
    u = L^{-1} (beta v)          w = L^{-1} (beta k exp(g_cum))          [C, V], [C, K]
    delta = u - w h                                                      [C, V]
    o  = scale (q exp(g_cum)) h + (scale q k^T * Gam) delta               (diagonal included)
    h' = exp(g_cum_L) h + (k exp(g_cum_L - g_cum))^T delta

The solve is a triangular solve in fp32. Only delta depends on the entering state, so the
chunk's transition is A_chunk = exp(g_cum_L) I - (k exp(g_cum_L - g_cum))^T w [K, K].

Backward of one chunk, given dO and dh' (the gradient of the state leaving it)::

    ddelta = (scale q k^T * Gam)^T dO + (k exp(g_cum_L - g_cum)) dh'
    dh     = exp(g_cum_L) dh' + scale (q exp(g_cum))^T dO - w^T ddelta   (entering state)
    du = ddelta        dw = -ddelta h^T
    dXu = L^{-T} du    dXw = L^{-T} dw        (Xu = beta v, Xw = beta k exp(g_cum))
    dAkk = -strict_lower(dXu u^T + dXw w^T)
    dq = scale [ (dO delta^T * Gam) k + exp(g_cum) (dO h^T) ]
    dk = scale (dO delta^T * Gam)^T q + exp(g_cum_L - g_cum) (delta dh'^T)
         + beta exp(g_cum) dXw + (dAkk * beta_i Gam) k + (dAkk * beta_i Gam)^T k
    dv = beta dXu
    dbeta = sum_V(v dXu) + sum_K(k exp(g_cum) dXw) + sum_j dAkk[i, j] (k_i . k_j) Gam[i, j]

and the gradient of g_cum (then dg = the reverse cumsum of dg_cum inside the chunk), from
every factor exp(g_cum_i - g_cum_j) (+ to i, - to j) and exp(g_cum_i) (+ to i)::

    Po = (scale q k^T * Gam) * (dO delta^T)        rows +, columns -
    Pa = dAkk * Akk                                rows +, columns -
    + sum_V(dO * scale (q exp(g_cum)) h)   + sum_K(Xw dXw)
    + at L: sum(exp(g_cum_L) h * dh') + sum_j r_j;  - r_j at j,
      with r_j = sum_{K,V} (k_j exp(g_cum_L - g_cum_j))^T delta_j * dh'

Memory: as in ``chunk_torch``, the forward keeps only its inputs; the backward walks the
sequence in groups of chunks, recomputing the chunk states of a group from the state
entering it, so nothing of size [N, H, K, V] or [N, C, C] is kept for the whole sequence.

Precision: the whole path runs in fp32 (the UT solve needs it); outputs are cast back to
v's dtype. Keys are expected L2-normalised (||k_t|| = 1) and beta in [0, 1], or [0, 2]
with negative eigenvalues: then every transition has norm <= 1 and nothing grows with T.
"""

from __future__ import annotations

import torch

from hylas.kernels.engines.autograd import run
from hylas.kernels.engines.gated.chunk_torch import (
    chunk_groups,
    from_chunks,
    heads_first,
    initial_states,
    stack_states,
    to_chunks,
)
from hylas.kernels.layout import ChunkLayout


def _causal(C: int, device, diagonal: int) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(diagonal)


class DeltaChunk:
    """The UT-transform quantities of a group of chunks, heads first: [P, G, H, C, *] fp32."""

    def __init__(self, q, k, v, beta, g_cum, scale):
        self.q, self.k, self.v, self.beta, self.g_cum, self.scale = q, k, v, beta, g_cum, scale
        C = k.shape[-2]
        diff = g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2)
        self.Gam = diff.masked_fill(~_causal(C, k.device, 0), float("-inf")).exp()
        self.KK = k @ k.transpose(-1, -2)
        self.Akk = (beta.unsqueeze(-1) * self.KK * self.Gam).tril(-1)
        self.L = self.Akk + torch.eye(C, device=k.device)
        self.e_g_cum = g_cum.exp().unsqueeze(-1)  # [.., C, 1]
        self.e_last = g_cum[..., -1:].exp()  # [.., 1]
        self.k_dec = k * (g_cum[..., -1:] - g_cum).exp().unsqueeze(-1)  # k exp(g_cum_L - g_cum)
        self.Xu = beta.unsqueeze(-1) * v
        self.Xw = beta.unsqueeze(-1) * k * self.e_g_cum
        self.u = self._solve(self.Xu)
        self.w = self._solve(self.Xw)
        self.q_dec = q * scale * self.e_g_cum
        self.QK = (q * scale) @ k.transpose(-1, -2) * self.Gam

    def _solve(self, x):
        return torch.linalg.solve_triangular(self.L, x, upper=False, unitriangular=True)

    def _solve_transposed(self, x):
        return torch.linalg.solve_triangular(
            self.L.transpose(-1, -2), x, upper=True, unitriangular=True
        )

    def transition(self):
        """A_chunk = exp(g_cum_L) I - k_dec^T w: [P, G, H, K, K]."""
        eye = torch.eye(self.k.shape[-1], device=self.k.device)
        return self.e_last.unsqueeze(-1) * eye - self.k_dec.transpose(-1, -2) @ self.w


def prepare_chunks(q, k, v, g, beta, lay: ChunkLayout):
    """Inputs in the chunked layout, fp32, heads first: [P, N, H, C, *] (g_cum, beta [P,N,H,C])."""
    qc, kc, vc = (heads_first(to_chunks(x.float(), lay)) for x in (q, k, v))
    beta_c = to_chunks(beta.float(), lay).transpose(2, 3)
    if g is None:
        g_cum = torch.zeros_like(beta_c)
    else:
        g_cum = to_chunks(g.float(), lay).cumsum(2).transpose(2, 3)
    return qc, kc, vc, g_cum, beta_c


def scan_states(ch: DeltaChunk, n0: int, state, h0, lay: ChunkLayout, finals: list):
    """Walk a group's chunks in order: entering states [P,G,H,K,V], deltas, carried state."""
    entering, deltas = [], []
    for i in range(ch.k.shape[1]):
        n = n0 + i
        if n in lay.start_doc:
            d = lay.start_doc[n]
            state = h0 if not lay.packed else h0[d : d + 1]
        entering.append(state)
        delta = ch.u[:, i] - ch.w[:, i] @ state
        deltas.append(delta)
        state = ch.e_last[:, i].unsqueeze(-1) * state + ch.k_dec[:, i].transpose(-1, -2) @ delta
        if n in lay.end_doc:
            finals.append(state)
    return torch.stack(entering, 1), torch.stack(deltas, 1), state


def _forward(q, k, v, g, beta, scale, h0, lay: ChunkLayout):
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    qc, kc, vc, gc, beta_c = prepare_chunks(q, k, v, g, beta, lay)
    h0 = initial_states(h0, lay.docs, H, K, V, q)
    o = torch.empty(*vc.shape, dtype=torch.float32, device=q.device)
    state, finals = None, []
    for grp in chunk_groups(lay.N, lay.C):
        ch = DeltaChunk(qc[:, grp], kc[:, grp], vc[:, grp], beta_c[:, grp], gc[:, grp], scale)
        h, delta, state = scan_states(ch, grp.start, state, h0, lay, finals)
        o[:, grp] = ch.q_dec @ h + ch.QK @ delta
    return o, stack_states(finals, lay)


class DeltaTorch:
    """The delta engine in torch, in the engines' autograd pattern (``hylas.kernels.engines.autograd``)."""

    @staticmethod
    def forward(ctx, lay: ChunkLayout, scale, output_final_state, h0, q, k, v, g, beta):
        o, finals = _forward(q, k, v, g, beta, scale, h0, lay)
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.meta = (scale, lay)
        return from_chunks(heads_first(o), lay).to(v.dtype), (
            finals if output_final_state else None
        )

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        scale, lay = ctx.meta
        H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
        qc, kc, vc, gc, beta_c = prepare_chunks(q, k, v, g, beta, lay)
        doc = heads_first(to_chunks(do.float(), lay))
        states_in = initial_states(h0, lay.docs, H, K, V, q)
        groups = chunk_groups(lay.N, lay.C)

        def chunks_of(grp):
            return DeltaChunk(qc[:, grp], kc[:, grp], vc[:, grp], beta_c[:, grp], gc[:, grp], scale)

        # Pass 1: the state entering each group (and the final states).
        group_states, finals, state = [], [], None
        for grp in groups:
            group_states.append(state)
            _, _, state = scan_states(chunks_of(grp), grp.start, state, states_in, lay, finals)
        finals = stack_states(finals, lay)
        dht = torch.zeros_like(finals) if dht is None else dht

        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        dbeta, dg_cum = torch.empty_like(beta_c), torch.empty_like(gc)
        grad, dh0 = None, []
        # Pass 2, last group first: recompute the group, then the reverse state scan.
        for grp, state in zip(reversed(groups), reversed(group_states), strict=True):
            ch = chunks_of(grp)
            h, delta, _ = scan_states(ch, grp.start, state, states_in, lay, [])
            dog = doc[:, grp]
            ddelta_local = ch.QK.transpose(-1, -2) @ dog
            q_dec_do = ch.q_dec.transpose(-1, -2) @ dog
            ddeltas, leaving = [None] * (grp.stop - grp.start), [None] * (grp.stop - grp.start)
            for i in reversed(range(grp.stop - grp.start)):
                n = grp.start + i
                if n in lay.end_doc:
                    d = lay.end_doc[n]
                    grad = dht if not lay.packed else dht[d : d + 1]
                leaving[i] = grad
                ddelta = ddelta_local[:, i] + ch.k_dec[:, i] @ grad
                ddeltas[i] = ddelta
                grad = (
                    ch.e_last[:, i].unsqueeze(-1) * grad
                    + q_dec_do[:, i]
                    - ch.w[:, i].transpose(-1, -2) @ ddelta
                )
                if n in lay.start_doc:
                    dh0.append(grad)
            grads = _chunk_grads(
                ch, dog, h, delta, torch.stack(ddeltas, 1), torch.stack(leaving, 1)
            )
            dq[:, grp], dk[:, grp], dv[:, grp], dbeta[:, grp], dg_cum[:, grp] = grads

        def back(x):
            return from_chunks(heads_first(x), lay)

        dg = None
        if g is not None:  # g_cum is the within-chunk cumsum of g: reverse cumsum inside chunks
            dg = back(dg_cum.flip(-1).cumsum(-1).flip(-1).unsqueeze(-1)).squeeze(-1)
        dbeta_t = back(dbeta.unsqueeze(-1)).squeeze(-1)
        dh0 = None if h0 is None else stack_states(dh0[::-1], lay)
        return dh0, back(dq * scale), back(dk), back(dv), dg, dbeta_t


def _chunk_grads(ch: DeltaChunk, do, h, delta, ddelta, dh_out):
    """dq (of q before scaling), dk, dv, dbeta and dg_cum of a group of chunks, given the
    reverse scan's ddelta and the gradients of the states leaving the chunks. Heads first,
    fp32; the formulas are those of the module docstring."""
    scale_q = ch.QK  # scale q k^T * Gam
    dOdT = do @ delta.transpose(-1, -2)  # [.., C, C]
    dOdT_gam = dOdT * ch.Gam
    dq = dOdT_gam @ ch.k + ch.e_g_cum * (do @ h.transpose(-1, -2))
    delta_dh = delta @ dh_out.transpose(-1, -2)  # [.., C, K]
    to_last = (ch.g_cum[..., -1:] - ch.g_cum).exp().unsqueeze(-1)
    dk = dOdT_gam.transpose(-1, -2) @ (ch.q * ch.scale) + to_last * delta_dh

    dXu = ch._solve_transposed(ddelta)
    dXw = ch._solve_transposed(-(ddelta @ h.transpose(-1, -2)))
    dAkk = -(dXu @ ch.u.transpose(-1, -2) + dXw @ ch.w.transpose(-1, -2)).tril(-1)
    dA_b = dAkk * ch.beta.unsqueeze(-1) * ch.Gam  # d(k_i . k_j) of Akk
    dk = dk + ch.beta.unsqueeze(-1) * ch.e_g_cum * dXw + dA_b @ ch.k + dA_b.transpose(-1, -2) @ ch.k
    dv = ch.beta.unsqueeze(-1) * dXu
    dbeta = (
        (ch.v * dXu).sum(-1) + (ch.k * ch.e_g_cum * dXw).sum(-1) + (dAkk * ch.KK * ch.Gam).sum(-1)
    )

    Po = scale_q * dOdT
    Pa = dAkk * ch.Akk
    r = (ch.k_dec * delta_dh).sum(-1)  # [.., C]
    dg_cum = (
        Po.sum(-1)
        - Po.sum(-2)
        + Pa.sum(-1)
        - Pa.sum(-2)
        + (do * (ch.q_dec @ h)).sum(-1)
        + (ch.Xw * dXw).sum(-1)
        - r
    )
    end = (ch.e_last.unsqueeze(-1) * h * dh_out).sum((-1, -2)) + r.sum(-1)  # [P, G, H]
    dg_cum[..., -1] += end
    return dq, dk, dv, dbeta, dg_cum


def chunk_delta_torch(q, k, v, g, beta, scale, initial_state, output_final_state, lay: ChunkLayout):
    """o [B,T,H,V] (v's dtype), final states [D,H,K,V] fp32 or None; see the module docstring."""
    return run(DeltaTorch, lay, scale, initial_state, output_final_state, q, k, v, g, beta)
