"""delta_rule and gated_delta_rule: chunk (torch) and recurrent against the fp32 per-token
recurrence, packed documents against per-document runs, and the LASP-2 protocol with a
dense transition."""

import pytest
import torch
import torch.nn.functional as F

from hylas.kernels import delta_rule, gated_delta_rule
from tests.helpers import assert_close, outputs_and_grads

B, H, K, V = 2, 2, 16, 24  # K != V on purpose
TOL = 1e-5  # fp32 against fp32: only summation order (and the UT solve) differ
# The decay gradient is a reverse cumsum of differences of nearly equal terms.
GATE_TOL = 1e-4


def make_inputs(family, T, b=B, beta_max=1.0, strong=False, seed=0):
    """q, k (L2-normalised), v, [g,] beta; beta in [0, beta_max] (2: negative eigenvalues)."""
    return family.SPEC.inputs(b, T, H, K, V, seed=seed, beta_max=beta_max, strong=strong)


FAMILIES = pytest.mark.parametrize(
    "family", [delta_rule, gated_delta_rule], ids=lambda f: f.__name__.split(".")[-1]
)


def assert_all_close(mine, ref, family, tol=TOL):
    (o, ht, grads), (o_ref, ht_ref, g_ref) = mine, ref
    assert_close(o, o_ref, tol, "o")
    assert_close(ht, ht_ref, tol, "final state")
    gates = ["dg", "dbeta"] if family is gated_delta_rule else ["dbeta"]
    for name, g, r in zip(["dq", "dk", "dv", *gates, "dh0"], grads, g_ref, strict=False):
        assert_close(g, r, max(tol, GATE_TOL) if name == "dg" else tol, name)


def torch_chunk(family):
    return lambda *a, **kw: family.chunk(*a, backend="torch", **kw)


@FAMILIES
@pytest.mark.parametrize("T", [1, 37, 64, 200])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta01", "neg_eigval"])
def test_chunk_matches_naive(family, T, with_h0, beta_max):
    inputs = make_inputs(family, T, beta_max=beta_max)
    h0 = torch.randn(B, H, K, V).requires_grad_() if with_h0 else None
    ref = outputs_and_grads(family.naive, inputs, h0)
    mine = outputs_and_grads(torch_chunk(family), inputs, h0)
    assert mine[0].dtype == inputs[2].dtype and mine[1].dtype == torch.float32
    assert_all_close(mine, ref, family)


@FAMILIES
def test_packed_equals_each_document_alone(family):
    lengths = [50, 1, 64, 93]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = make_inputs(family, sum(lengths), b=1, beta_max=2.0)
    h0 = torch.randn(len(lengths), H, K, V).requires_grad_()
    mine = outputs_and_grads(family.chunk, inputs, h0, cu_seqlens=cu)
    assert_all_close(mine, outputs_and_grads(family.naive, inputs, h0, cu_seqlens=cu), family)
    o, ht = mine[0], mine[1]
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        piece = [x[:, s:e] for x in inputs]
        o_doc, ht_doc = family.naive(*piece, initial_state=h0[n : n + 1], output_final_state=True)
        assert_close(o[:, s:e], o_doc, TOL, f"document {n}")
        assert_close(ht[n : n + 1], ht_doc, TOL, f"document {n} state")


def test_strong_decay_is_finite_and_accurate():
    # a log decay of -20 per token: exp(+-cumsum) over one chunk would be exp(1280)
    inputs = make_inputs(gated_delta_rule, 300, b=1, strong=True)
    mine = outputs_and_grads(gated_delta_rule.chunk, inputs, None)
    assert_all_close(
        mine, outputs_and_grads(gated_delta_rule.naive, inputs, None), gated_delta_rule
    )


@FAMILIES
def test_long_sequence_is_accurate(family):
    inputs = [x.detach() for x in make_inputs(family, 4096, b=1, beta_max=2.0)]
    o, ht = family.chunk(*inputs, output_final_state=True)
    o_ref, ht_ref = family.naive(*inputs, output_final_state=True)
    assert_close(o, o_ref, 1e-4, "o")
    assert_close(ht, ht_ref, 1e-4, "ht")


@pytest.mark.slow
@FAMILIES
def test_65536_tokens_stay_finite_and_accurate(family):
    check_long_strong(family, 65536)


@FAMILIES
def test_8192_tokens_stay_finite_and_accurate(family):
    """The fast twin of the 65,536-token case: four of the torch path's 2048-token chunk
    groups, the same strong gates."""
    check_long_strong(family, 8192)


def check_long_strong(family, T):
    inputs = make_inputs(family, T, b=1, beta_max=2.0, strong=True, seed=5)
    inputs = [x.detach()[:, :, :1].contiguous().requires_grad_() for x in inputs]  # one head
    o, ht = family.chunk(*inputs, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    with torch.no_grad():
        o_ref, ht_ref = family.naive(*inputs, output_final_state=True)
    assert_close(o, o_ref, 1e-4, "o")
    assert_close(ht, ht_ref, 1e-4, "ht")


@FAMILIES
def test_recurrent_continues_from_a_chunk_state(family):
    inputs = [x.detach() for x in make_inputs(family, 70, beta_max=2.0)]
    o_all, ht_all = family.naive(*inputs, output_final_state=True)
    _, h = family.chunk(*[x[:, :64] for x in inputs], output_final_state=True)
    outs = []
    for t in range(64, 70):
        o, h = family.recurrent(*[x[:, t : t + 1] for x in inputs], initial_state=h)
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_all[:, 64:], TOL, "decoded outputs")
    assert_close(h, ht_all, TOL, "decoded state")


@FAMILIES
def test_bf16_inputs_stay_close_to_the_fp32_oracle(family):
    q, k, v, *gates = (x.detach() for x in make_inputs(family, 130))
    o, _ = family.chunk(q.bfloat16(), k.bfloat16(), v.bfloat16(), *gates)
    o_ref, _ = family.naive(q.bfloat16(), k.bfloat16(), v.bfloat16(), *gates)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, 2e-2, "bf16 o")


def _fold(A, B_state, S_in):
    """S_out = A @ S_in + B with a dense A [N, H, K, K]."""
    return A @ S_in + B_state


@FAMILIES
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_two_segments_chained_through_the_transition_equal_the_whole(family, packed):
    T, cut = 150, 70
    b = 1 if packed else B
    inputs = [x.detach() for x in make_inputs(family, T, b=b, beta_max=2.0)]
    # packed: documents [0, 30), [30, 100), [100, 150): the middle one spans the cut
    cu = torch.tensor([0, 30, 100, T], dtype=torch.int32) if packed else None
    h0 = torch.randn(b, H, K, V)
    h0_docs = torch.cat([h0, torch.zeros(2, H, K, V)]) if packed else h0
    o_ref, ht_ref = family.naive(
        *inputs, initial_state=h0_docs, output_final_state=True, cu_seqlens=cu
    )

    first, second = [x[:, :cut] for x in inputs], [x[:, cut:] for x in inputs]
    cu1 = torch.tensor([0, 30, cut], dtype=torch.int32) if packed else None
    cu2 = torch.tensor([0, 100 - cut, T - cut], dtype=torch.int32) if packed else None
    o1, _ = family.chunk(*first, initial_state=h0_docs[:2] if packed else h0, cu_seqlens=cu1)
    A1, B1 = family.transition(*first, cu_seqlens=cu1)
    assert A1.shape == (b, H, K, K) and B1.shape == (b, H, K, V)
    if packed:  # a document starts inside segment 1 after its first token: the chain restarts
        assert (A1 == 0).all()
    S_in_2 = _fold(A1, B1, h0)  # what LASP-2 hands segment 2
    h0_2 = torch.cat([S_in_2, torch.zeros(1, H, K, V)]) if packed else S_in_2
    o2, ht2 = family.chunk(*second, initial_state=h0_2, output_final_state=True, cu_seqlens=cu2)
    assert_close(torch.cat([o1, o2], 1), o_ref, TOL, "chained outputs")
    assert_close(ht2, ht_ref[1:] if packed else ht_ref, TOL, "chained final states")


@FAMILIES
def test_transition_is_the_ordered_product_of_the_segment(family):
    inputs = [x.detach() for x in make_inputs(family, 90, beta_max=2.0)]
    A, B_state = family.transition(*inputs)
    # the ordered product M_90 ... M_1, formed token by token
    _, k, _, *gates = inputs
    beta = gates[-1]
    decay = gates[0].exp() if family is gated_delta_rule else torch.ones_like(beta)
    A_ref = torch.eye(K).expand(B, H, K, K)
    for t in range(90):
        kt, bt, at = k[:, t], beta[:, t, :, None, None], decay[:, t, :, None, None]
        M = at * (torch.eye(K) - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2))
        A_ref = M @ A_ref
    assert_close(A, A_ref, TOL, "A")
    for seed in range(2):
        S_in = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed))
        _, S_out = family.naive(*inputs, initial_state=S_in, output_final_state=True)
        assert_close(_fold(A, B_state, S_in), S_out, TOL, "S_out")
    A, _ = family.transition(*inputs, starts_document=True)
    assert (A == 0).all()


@FAMILIES
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_entering_state_grad_is_autograds_gradient(family, packed):
    T = 150
    b = 1 if packed else B
    inputs = [x.detach() for x in make_inputs(family, T, b=b, beta_max=2.0)]
    cu = torch.tensor([0, 135, T], dtype=torch.int32) if packed else None
    h0 = torch.randn(2 if packed else b, H, K, V, requires_grad=True)
    o, _ = family.naive(*inputs, initial_state=h0, cu_seqlens=cu)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    (dh0,) = torch.autograd.grad((o * do).sum(), [h0])
    G = family.entering_state_grad(*inputs, do=do, cu_seqlens=cu)
    assert_close(G, dh0[:1] if packed else dh0, TOL, "G")
    G0 = family.entering_state_grad(*inputs, do=do, cu_seqlens=cu, starts_document=True)
    assert (G0 == 0).all()


def test_bad_arguments_are_refused():
    q, k, v, g, beta = (x.detach() for x in make_inputs(gated_delta_rule, 8))
    with pytest.raises(ValueError, match=r"beta must be \[2, 8, 2\]"):
        delta_rule.chunk(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match=r"g must be \[2, 8, 2\]"):
        gated_delta_rule.chunk(q, k, v, g[:1], beta)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule.chunk(q, k, v, beta, initial_state=torch.zeros(B, H, V, K))
    with pytest.raises(ValueError, match="batch size must be 1"):
        delta_rule.chunk(q, k, v, beta, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


@FAMILIES
def test_triton_backend_through_the_family_call(family):
    """The family's chunk(backend="triton") reaches the Triton kernels (interpreter here;
    the kernel matrix itself is in test_chunk_delta_triton.py)."""
    inputs = make_inputs(family, 37, beta_max=2.0)
    h0 = torch.randn(B, H, K, V).requires_grad_()
    ref = outputs_and_grads(family.naive, inputs, h0)
    triton_chunk = lambda *a, **kw: family.chunk(*a, backend="triton", **kw)  # noqa: E731
    assert_all_close(outputs_and_grads(triton_chunk, inputs, h0), ref, family, tol=1e-4)


@pytest.mark.parametrize("backend", ["naive", "torch", "triton", "recurrent", "recurrent-triton"])
def test_gated_two_tokens_by_hand(backend):
    """Two tokens of Gated DeltaNet from a given state, written out by hand: the public
    argument order (g, beta) reaches every implementation unswapped."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, 4, generator=gen)
    k = F.normalize(torch.randn(1, 2, 1, 4, generator=gen), dim=-1)
    v = torch.randn(1, 2, 1, 3, generator=gen)
    g = torch.tensor([[[-0.5], [-1.5]]])
    beta = torch.tensor([[[0.25], [0.75]]])
    S = torch.randn(1, 1, 4, 3, generator=gen)
    h0 = S.clone()
    outs = []
    for t in range(2):
        kt, vt = k[0, t, 0][:, None], v[0, t, 0][None, :]  # column k, row v
        S = g[0, t, 0].exp() * (torch.eye(4) - beta[0, t, 0] * kt @ kt.T) @ S[0, 0]
        S = (S + beta[0, t, 0] * kt @ vt)[None, None]
        outs.append(0.5 * q[0, t, 0] @ S[0, 0])
    o_ref = torch.stack(outs)[None, :, None]
    kw = dict(scale=0.5, initial_state=h0, output_final_state=True)
    if backend == "naive":
        o, ht = gated_delta_rule.naive(q, k, v, g, beta, **kw)
    elif backend.startswith("recurrent"):
        rec_backend = "triton" if backend.endswith("triton") else "auto"
        o, ht = gated_delta_rule.recurrent(q, k, v, g, beta, backend=rec_backend, **kw)
    else:
        o, ht = gated_delta_rule.chunk(q, k, v, g, beta, backend=backend, **kw)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, S, 1e-5, "final state")
