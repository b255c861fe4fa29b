"""linear_attn, simple_gla and gla: chunk (torch) and recurrent against the fp32 per-token
recurrence, packed documents against per-document runs, and the LASP-2 protocol."""

import pytest
import torch

from hylas.kernels import gla, linear_attn, simple_gla
from tests.helpers import assert_close, outputs_and_grads

B, H, K, V = 2, 2, 16, 24  # K != V on purpose
TOL = 1e-5  # fp32 against fp32: only summation order differs
# Gate gradients come through a cancelling identity (see chunk_torch): a looser relative
# tolerance, and an absolute floor where the true gradient is exactly zero.
GATE_TOL, GATE_ATOL = 1e-4, 1e-5


def make_inputs(family, T, b=B, gate_scale=1.0, seed=0):
    return family.SPEC.inputs(b, T, H, K, V, seed=seed, decay_scale=gate_scale)


FAMILIES = pytest.mark.parametrize(
    "family", [linear_attn, simple_gla, gla], ids=lambda f: f.__name__.split(".")[-1]
)


def assert_all_close(mine, ref, n_gates, tol=TOL):
    (o, ht, grads), (o_ref, ht_ref, g_ref) = mine, ref
    assert_close(o, o_ref, tol, "o")
    assert_close(ht, ht_ref, tol, "final state")
    names = ["dq", "dk", "dv"] + ["dg"] * n_gates + ["dh0"]
    for name, g, r in zip(names, grads, g_ref, strict=False):
        if name == "dg":
            assert_close(g, r, max(tol, GATE_TOL), name, atol=GATE_ATOL)
        else:
            assert_close(g, r, tol, name)


@FAMILIES
@pytest.mark.parametrize("T", [1, 37, 64, 200])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "h0"])
def test_chunk_matches_naive(family, T, with_h0):
    inputs = make_inputs(family, T)
    h0 = torch.randn(B, H, K, V).requires_grad_() if with_h0 else None
    ref = outputs_and_grads(family.naive, inputs, h0)
    mine = outputs_and_grads(lambda *a, **kw: family.chunk(*a, backend="torch", **kw), inputs, h0)
    assert mine[0].dtype == inputs[2].dtype and mine[1].dtype == torch.float32
    assert_all_close(mine, ref, len(inputs) - 3)


@FAMILIES
def test_packed_equals_each_document_alone(family):
    lengths = [50, 1, 64, 93]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = make_inputs(family, sum(lengths), b=1)
    h0 = torch.randn(len(lengths), H, K, V).requires_grad_()
    mine = outputs_and_grads(family.chunk, inputs, h0, cu_seqlens=cu)
    assert_all_close(
        mine, outputs_and_grads(family.naive, inputs, h0, cu_seqlens=cu), len(inputs) - 3
    )
    o, ht = mine[0], mine[1]
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        piece = [x[:, s:e] for x in inputs]
        o_doc, ht_doc = family.naive(*piece, initial_state=h0[n : n + 1], output_final_state=True)
        assert_close(o[:, s:e], o_doc, TOL, f"document {n}")
        assert_close(ht[n : n + 1], ht_doc, TOL, f"document {n} state")


@pytest.mark.parametrize("family", [simple_gla, gla], ids=["simple_gla", "gla"])
def test_strong_decay_is_finite_and_accurate(family):
    # a log decay of -20 per token: exp(+-cumsum) over one chunk would be exp(1280)
    q, k, v, g = make_inputs(family, 300, b=1)
    g = (-20 * torch.rand(g.shape)).requires_grad_()
    mine = outputs_and_grads(family.chunk, [q, k, v, g], None)
    assert_all_close(mine, outputs_and_grads(family.naive, [q, k, v, g], None), 1)


@FAMILIES
def test_long_sequence_is_accurate(family):
    inputs = [x.detach() for x in make_inputs(family, 4096, b=1, gate_scale=0.01)]
    o, ht = family.chunk(*inputs, output_final_state=True)
    o_ref, ht_ref = family.naive(*inputs, output_final_state=True)
    assert_close(o, o_ref, 1e-4, "o")
    assert_close(ht, ht_ref, 1e-4, "ht")


@FAMILIES
def test_recurrent_continues_from_a_chunk_state(family):
    inputs = [x.detach() for x in make_inputs(family, 70)]
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
    q, k, v, *g = (x.detach() for x in make_inputs(family, 130))
    o, _ = family.chunk(q.bfloat16(), k.bfloat16(), v.bfloat16(), *g)
    o_ref, _ = family.naive(q.bfloat16(), k.bfloat16(), v.bfloat16(), *g)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, 2e-2, "bf16 o")


def _fold(A, B_state, S_in):
    """S_out = A * S_in + B, A broadcast over V (and over K for scalar decays)."""
    A = A.reshape(*A.shape, *([1] * (B_state.dim() - A.dim())))
    return A * S_in + B_state


@FAMILIES
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_two_segments_chained_through_the_transition_equal_the_whole(family, packed):
    T, cut = 150, 70
    b = 1 if packed else B
    inputs = [x.detach() for x in make_inputs(family, T, b=b)]
    # packed: documents [0, 30), [30, 100), [100, 150): the middle one spans the cut
    cu = torch.tensor([0, 30, 100, T], dtype=torch.int32) if packed else None
    # the layer's initial state feeds the first document; later documents start from zero
    h0 = torch.randn(b, H, K, V)
    h0_docs = torch.cat([h0, torch.zeros(2, H, K, V)]) if packed else h0
    o_ref, ht_ref = family.naive(
        *inputs, initial_state=h0_docs, output_final_state=True, cu_seqlens=cu
    )

    first, second = [x[:, :cut] for x in inputs], [x[:, cut:] for x in inputs]
    cu1 = torch.tensor([0, 30, cut], dtype=torch.int32) if packed else None
    cu2 = torch.tensor([0, 100 - cut, T - cut], dtype=torch.int32) if packed else None
    h0_1 = h0_docs[:2] if packed else h0
    o1, _ = family.chunk(*first, initial_state=h0_1, cu_seqlens=cu1)
    A1, B1 = family.transition(*first, cu_seqlens=cu1)
    if packed:  # a document starts inside segment 1 after its first token: the chain restarts
        assert (A1 == 0).all()
    S_in_2 = _fold(A1, B1, h0)  # what LASP-2 hands segment 2
    # segment 2 starts mid-document: its first document continues from S_in_2
    h0_2 = torch.cat([S_in_2, torch.zeros(1, H, K, V)]) if packed else S_in_2
    o2, ht2 = family.chunk(*second, initial_state=h0_2, output_final_state=True, cu_seqlens=cu2)
    assert_close(torch.cat([o1, o2], 1), o_ref, TOL, "chained outputs")
    assert_close(ht2, ht_ref[1:] if packed else ht_ref, TOL, "chained final states")


@FAMILIES
def test_transition_is_the_affine_map_of_the_segment(family):
    inputs = [x.detach() for x in make_inputs(family, 90)]
    A, B_state = family.transition(*inputs)
    for seed in range(2):
        S_in = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed))
        _, S_out = family.naive(*inputs, initial_state=S_in, output_final_state=True)
        assert_close(_fold(A, B_state, S_in), S_out, TOL, "S_out")
    A, _ = family.transition(*inputs, starts_document=True)
    assert (A == 0).all()


@FAMILIES
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_entering_state_grad_is_autograds_gradient(family, packed):
    T = 120
    b = 1 if packed else B
    inputs = [x.detach() for x in make_inputs(family, T, b=b)]
    cu = torch.tensor([0, 45, T], dtype=torch.int32) if packed else None
    h0 = torch.randn(2 if packed else b, H, K, V, requires_grad=True)
    o, _ = family.naive(*inputs, initial_state=h0, cu_seqlens=cu)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    (dh0,) = torch.autograd.grad((o * do).sum(), [h0])
    G = family.entering_state_grad(*inputs, do=do, cu_seqlens=cu)
    assert_close(G, dh0[:1] if packed else dh0, TOL, "G")
    G0 = family.entering_state_grad(*inputs, do=do, cu_seqlens=cu, starts_document=True)
    assert (G0 == 0).all()


def test_bad_arguments_are_refused(monkeypatch):
    q, k, v, gk = (x.detach() for x in make_inputs(gla, 8))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gla.chunk(q, k, v, gk, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        gla.chunk(q, k, v, gk, backend="cuda")
    with pytest.raises(ValueError, match="initial_state"):
        gla.chunk(q, k, v, gk, initial_state=torch.zeros(B, H, V, K))
    with pytest.raises(ValueError, match="batch size must be 1"):
        gla.chunk(q, k, v, gk, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="from 0 to T"):
        gla.chunk(q[:1], k[:1], v[:1], gk[:1], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"gk must be \[2, 8, 2, 16\]"):
        gla.chunk(q, k, v, gk[..., 0])
    with pytest.raises(ValueError, match=r"g must be \[2, 8, 2\]"):
        simple_gla.chunk(q, k, v, gk)


@pytest.mark.slow
@pytest.mark.parametrize("family", [simple_gla, gla], ids=["simple_gla", "gla"])
def test_65536_tokens_with_strong_decay_stay_finite_and_accurate(family):
    check_long_strong_decay(family, 65536)


@pytest.mark.parametrize("family", [simple_gla, gla], ids=["simple_gla", "gla"])
def test_8192_tokens_with_strong_decay_stay_finite_and_accurate(family):
    """The fast twin of the 65,536-token case: four of the torch path's 2048-token chunk
    groups, the same strong decays."""
    check_long_strong_decay(family, 8192)


def check_long_strong_decay(family, T):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, T, 1, d, generator=gen) for d in (16, 16, 16))
    shape = (1, T, 1) if family is simple_gla else (1, T, 1, 16)
    g = -20 * torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    o, ht = family.chunk(*leaves, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    with torch.no_grad():
        o_ref, ht_ref = family.naive(q, k, v, g, output_final_state=True)
    assert_close(o, o_ref, 1e-4, "o")
    assert_close(ht, ht_ref, 1e-4, "ht")


@FAMILIES
def test_triton_backend_through_the_family_call(family):
    """The family's chunk(backend="triton") reaches the Triton kernels (interpreter here;
    the kernel matrix itself is in test_chunk_triton.py)."""
    inputs = make_inputs(family, 37)
    h0 = torch.randn(B, H, K, V).requires_grad_()
    ref = outputs_and_grads(family.naive, inputs, h0)
    mine = outputs_and_grads(lambda *a, **kw: family.chunk(*a, backend="triton", **kw), inputs, h0)
    assert_all_close(mine, ref, len(inputs) - 3, tol=1e-4)


@FAMILIES
def test_packed_documents_across_many_chunk_groups(family):
    # the torch path walks the sequence in groups of chunks (up to 2048 tokens); documents
    # here start and end inside groups and span group boundaries
    lengths = [1500, 700, 2100, 37]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = make_inputs(family, sum(lengths), b=1, gate_scale=0.1)
    h0 = torch.randn(len(lengths), H, K, V).requires_grad_()
    mine = outputs_and_grads(family.chunk, inputs, h0, cu_seqlens=cu)
    ref = outputs_and_grads(family.naive, inputs, h0, cu_seqlens=cu)
    assert_all_close(mine, ref, len(inputs) - 3, tol=1e-4)
