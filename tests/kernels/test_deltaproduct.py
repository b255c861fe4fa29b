"""Gated DeltaProduct: its oracle against a case worked by hand, every path against the
oracle at n_h = 1, 2 and 3 (packed documents too, with every gradient), and n_h = 1
against Gated DeltaNet."""

import pytest
import torch

from hylas.kernels import gated_delta_rule, gated_deltaproduct
from tests.helpers import assert_close, outputs_and_grads

B, H, K, V = 2, 2, 16, 8
TOL = 1e-4  # fp32 chunked against the per-token loop
SPEC = gated_deltaproduct.SPEC


def test_the_oracle_matches_two_tokens_worked_by_hand():
    """H = 1, K = 2, V = 1, n_h = 2, scale 1, both decays 1/2.

    Token 1: S = 0; step 1, k = (1, 0), v = 2, beta = 1: S = (2, 0); step 2, k = (0, 1),
    v = 3, beta = 1/2: k S = 0, S = (2, 1.5); q = (1, 1): o = 3.5.
    Token 2: S = (1, 0.75); step 1, k = (0.6, 0.8), v = 1, beta = 1: k S = 1.2,
    S = (1, 0.75) - 0.2 (0.6, 0.8) = (0.88, 0.59); step 2, k = (1, 0), v = 0, beta = 2
    (a negative eigenvalue): k S = 0.88, S = (0.88 - 1.76, 0.59) = (-0.88, 0.59);
    q = (1, -1): o = -1.47."""
    q = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).view(1, 2, 1, 2)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]]).view(1, 2, 2, 1, 2)
    v = torch.tensor([[2.0, 3.0], [1.0, 0.0]]).view(1, 2, 2, 1, 1)
    beta = torch.tensor([[1.0, 0.5], [1.0, 2.0]]).view(1, 2, 2, 1)
    g = torch.full((1, 2, 1), 0.5).log()
    o, ht = gated_deltaproduct.naive(q, k, v, g, beta, scale=1.0, output_final_state=True)
    assert torch.allclose(o.flatten(), torch.tensor([3.5, -1.47]), atol=1e-6)
    assert torch.allclose(ht.flatten(), torch.tensor([-0.88, 0.59]), atol=1e-6)


def paths():
    return {
        "torch": lambda *a, **kw: gated_deltaproduct.chunk(*a, backend="torch", **kw),
        "triton": lambda *a, **kw: gated_deltaproduct.chunk(*a, backend="triton", **kw),
    }


def assert_all_close(mine, ref, tol=TOL):
    (o, ht, grads), (o_ref, ht_ref, grads_ref) = mine, ref
    assert_close(o, o_ref, tol, "o")
    assert_close(ht, ht_ref, tol, "final state")
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref, strict=True):
        assert_close(a, b, tol, name)


@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_chunk_matches_the_oracle_with_every_gradient(n_h, path):
    inputs = SPEC.inputs(B, 37, H, K, V, n_h=n_h, beta_max=2.0, seed=n_h)
    h0 = torch.randn(B, H, K, V).requires_grad_()
    ref = outputs_and_grads(gated_deltaproduct.naive, inputs, h0)
    assert_all_close(outputs_and_grads(paths()[path], inputs, h0), ref)


@pytest.mark.parametrize("n_h", [1, 2, 3])
def test_packed_documents_match_the_oracle(n_h):
    lengths = [20, 1, 33]
    cu = torch.tensor([0, 20, 21, 54], dtype=torch.int32)
    inputs = SPEC.inputs(1, sum(lengths), H, K, V, n_h=n_h, seed=10 + n_h)
    h0 = torch.randn(len(lengths), H, K, V).requires_grad_()
    ref = outputs_and_grads(gated_deltaproduct.naive, inputs, h0, cu_seqlens=cu)
    for path in ("torch", "triton"):
        mine = outputs_and_grads(paths()[path], inputs, h0, cu_seqlens=cu)
        assert_all_close(mine, ref)


@pytest.mark.parametrize("n_h", [1, 2, 3])
def test_recurrent_continues_from_a_chunk_state(n_h):
    inputs = [x.detach() for x in SPEC.inputs(B, 70, H, K, V, n_h=n_h, seed=20 + n_h)]
    o_all, ht_all = gated_deltaproduct.naive(*inputs, output_final_state=True)
    _, h = gated_deltaproduct.chunk(*[x[:, :64] for x in inputs], output_final_state=True)
    for backend in ("torch", "triton"):
        outs, state = [], h
        for t in range(64, 70):
            step = [x[:, t : t + 1] for x in inputs]
            o, state = gated_deltaproduct.recurrent(*step, initial_state=state, backend=backend)
            outs.append(o)
        assert_close(torch.cat(outs, 1), o_all[:, 64:], TOL, f"{backend} decoded outputs")
        assert_close(state, ht_all, TOL, f"{backend} decoded state")


def test_one_step_a_token_is_gated_deltanet():
    q, k, v, g, beta = SPEC.inputs(B, 100, H, K, V, n_h=1, requires_grad=False)
    h0 = torch.randn(B, H, K, V)
    mine = gated_deltaproduct.chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ref = gated_delta_rule.chunk(
        q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0], initial_state=h0, output_final_state=True
    )
    assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])


def test_the_protocol_is_the_oracles():
    """LASP-2: S_out = A S_in + B for a segment, and G = d(outputs . do)/d(S_in), both
    against the oracle run from S_in."""
    q, k, v, g, beta = (x.detach() for x in SPEC.inputs(1, 45, H, K, V, seed=30))
    A, B_state = gated_deltaproduct.transition(q, k, v, g, beta)
    S_in = torch.randn(1, H, K, V, requires_grad=True)
    o, S_out = gated_deltaproduct.naive(
        q, k, v, g, beta, initial_state=S_in, output_final_state=True
    )
    assert_close(A @ S_in.detach() + B_state, S_out.detach(), TOL, "S_out")
    do = torch.randn_like(o)
    (G_ref,) = torch.autograd.grad((o * do).sum(), S_in)
    G = gated_deltaproduct.entering_state_grad(q, k, v, g, beta, do)
    assert_close(G, G_ref, TOL, "G")
    A_local = gated_deltaproduct.local_transition(q, k, v, g, beta)
    assert_close(A_local, A, TOL, "A from the local kernel")


def test_inputs_of_the_wrong_shape_are_refused():
    q, k, v, g, beta = SPEC.inputs(1, 8, H, K, V, requires_grad=False)
    with pytest.raises(ValueError, match=r"k must be \[B, T, n_h, H, K\]"):
        gated_deltaproduct.chunk(q, k[:, :, 0], v, g, beta)
    with pytest.raises(ValueError, match=r"beta must be \[1, 8, 2, 2\]"):
        gated_deltaproduct.chunk(q, k, v, g, beta[:, :, 0])
    with pytest.raises(ValueError, match=r"g must be \[1, 8, 2\]"):
        gated_deltaproduct.chunk(q, k, v, beta, beta)
