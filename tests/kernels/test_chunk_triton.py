"""The chunkwise Triton kernels (run by the interpreter here) against the fp32 gla.naive.

Every case checks o, the final state and the gradients of q, k, v, g and the initial state
through one random projection of both outputs.
"""

import pytest
import torch
import torch.nn.functional as F

from hylas.kernels import gla
from hylas.kernels.engines.gated.chunk_triton import chunk_gated_triton
from hylas.kernels.gla import naive
from tests.helpers import assert_close

B, H, K, V = 2, 2, 16, 24  # K != V on purpose, and V is not a power of two
TOL = 1e-4  # fp32 throughout
GATES = [None, "head", "channel"]


def make_inputs(T, gate, b=B, h=H, k_dim=K, v_dim=V, dtype=torch.float32, strong=False, seed=0):
    """q, k, v and a log decay of the given kind (None, "head" [B,T,H], "channel" [B,T,H,K]).

    strong: g = -20 * U(0, 1), a decay of up to exp(-20) per token."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, h, k_dim, generator=gen).to(dtype)
    k = torch.randn(b, T, h, k_dim, generator=gen).to(dtype)
    v = torch.randn(b, T, h, v_dim, generator=gen).to(dtype)
    shape = {"head": (b, T, h), "channel": (b, T, h, k_dim)}.get(gate)
    g = None
    if shape is not None:
        if strong:
            g = -20 * torch.rand(shape, generator=gen)
        else:
            g = F.logsigmoid(torch.randn(shape, generator=gen) * 2)
    return q, k, v, g


def oracle(q, k, v, g, **kw):
    """gla.naive with the gate widened to one value per key channel (zeros when None)."""
    if g is None:
        gk = torch.zeros(q.shape, dtype=torch.float32)
    elif g.dim() == 3:
        gk = g[..., None].expand(-1, -1, -1, q.shape[-1])
    else:
        gk = g
    return naive(q, k, v, gk, **kw)


def run_with_grads(fn, q, k, v, g, h0, cu_seqlens=None, scale=None, **kw):
    """o, ht and the gradients of [q, k, v, (g), (h0)] of (o dO).sum() + (ht dht).sum()."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    extra = [x.detach().clone().requires_grad_() for x in (g, h0) if x is not None]
    g_, h0_ = g, h0
    if g is not None:
        g_ = extra[0]
    if h0 is not None:
        h0_ = extra[-1]
    o, ht = fn(
        *leaves, g_, scale=scale, initial_state=h0_, output_final_state=True,
        cu_seqlens=cu_seqlens, **kw,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen)
    dht = torch.randn(ht.shape, generator=gen)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves + extra)
    return o, ht, grads


def check_against_naive(q, k, v, g, h0, cu_seqlens=None, tol=TOL, **kw):
    o_ref, ht_ref, g_ref = run_with_grads(oracle, q, k, v, g, h0, cu_seqlens)
    o, ht, grads = run_with_grads(chunk_gated_triton, q, k, v, g, h0, cu_seqlens, **kw)
    assert o.dtype == v.dtype and o.shape == v.shape
    assert ht.dtype == torch.float32 and ht.shape == ht_ref.shape
    assert_close(o.float(), o_ref.float(), tol, "o")
    assert_close(ht, ht_ref, tol, "ht")
    names = ["dq", "dk", "dv"] + (["dg"] if g is not None else []) + (["dh0"] * (h0 is not None))
    for name, a, e in zip(names, grads, g_ref, strict=True):
        assert a.shape == e.shape, name
        # dg is a difference of terms that cancel exactly where the state is zero (a
        # first token with no initial state): there only an absolute bound is meaningful.
        assert_close(a.float(), e.float(), tol, name, atol=1e-5 if name == "dg" else 0.0)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 37, 64, 200])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_naive(gate, T, with_h0):
    q, k, v, g = make_inputs(T, gate)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    check_against_naive(q, k, v, g, h0)


@pytest.mark.parametrize("gate", GATES)
def test_packed_documents(gate):
    """Documents restart from their own initial state; the last chunk of each is partial."""
    lengths = [50, 1, 64, 93]
    q, k, v, g = make_inputs(sum(lengths), gate, b=1, seed=2)
    cu = torch.tensor([0, 50, 51, 115, 208], dtype=torch.int32)
    h0 = torch.randn(len(lengths), H, K, V)
    check_against_naive(q, k, v, g, h0, cu_seqlens=cu)


def test_packed_equals_separate_runs():
    """The packed result is the concatenation of the documents run one by one."""
    q, k, v, g = make_inputs(90, "channel", b=1, seed=3)
    cu = torch.tensor([0, 20, 90], dtype=torch.int32)
    o, ht = chunk_gated_triton(q, k, v, g, 0.3, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate([(0, 20), (20, 90)]):
        o_n, ht_n = chunk_gated_triton(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], 0.3, output_final_state=True
        )
        assert_close(o[:, s:e], o_n, 1e-6, f"o of document {n}")
        assert_close(ht[n : n + 1], ht_n, 1e-6, f"ht of document {n}")


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_strong_decay_is_finite_and_accurate(gate):
    """g = -20 * U(0, 1) per token: any exp(+b) over a chunk would overflow fp32."""
    q, k, v, g = make_inputs(150, gate, strong=True, seed=4)
    check_against_naive(q, k, v, g, torch.randn(B, H, K, V))


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_no_exp_of_a_positive_number(gate, monkeypatch):
    """Every exponent the kernels evaluate, padded lanes included, is <= 0 (forward and
    backward, partial chunks, packed documents): checked by hooking the interpreter's exp."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_exp"):
        pytest.skip("this Triton's interpreter has no create_exp hook")
    largest = []
    original = builder.create_exp

    def create_exp(self, arg):
        largest.append(float(arg.data.max()))
        return original(self, arg)

    monkeypatch.setattr(builder, "create_exp", create_exp)
    q, k, v, g = make_inputs(100, gate, b=1, strong=True, seed=10)
    cu = torch.tensor([0, 30, 31, 100], dtype=torch.int32)
    run_with_grads(chunk_gated_triton, q, k, v, g, torch.randn(3, H, K, V), cu)
    assert largest and max(largest) <= 0.0


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("gate", GATES)
def test_other_chunk_sizes(chunk_size, gate):
    q, k, v, g = make_inputs(45, gate, h=1, seed=5)
    check_against_naive(q, k, v, g, torch.randn(B, 1, K, V), chunk_size=chunk_size)


@pytest.mark.parametrize("gate", GATES)
def test_several_key_and_value_blocks(gate):
    """K = 72 and V = 80 span two 64-wide blocks each, the last one masked."""
    q, k, v, g = make_inputs(70, gate, b=1, h=1, k_dim=72, v_dim=80, seed=6)
    check_against_naive(q, k, v, g, torch.randn(1, 1, 72, 80))


@pytest.mark.parametrize("gate", GATES)
def test_recipe_head_sizes(gate):
    """The recipes' heads, K = 96 and V = 192 (two key blocks, three value blocks), fp32,
    packed, with a partial last chunk."""
    q, k, v, g = make_inputs(90, gate, b=1, h=1, k_dim=96, v_dim=192, seed=12)
    cu = torch.tensor([0, 20, 90], dtype=torch.int32)
    check_against_naive(q, k, v, g, torch.randn(2, 1, 96, 192), cu_seqlens=cu)


def test_without_final_state():
    """output_final_state=False: ht is None and the gradients need no dht."""
    q, k, v, g = make_inputs(70, "channel", seed=7)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    o, ht = chunk_gated_triton(*leaves, scale=0.25)
    assert ht is None
    o_ref, _ = oracle(*leaves, scale=0.25)
    assert_close(o, o_ref, TOL, "o")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((o * do).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves)
    for name, a, e in zip(["dq", "dk", "dv", "dg"], grads, grads_ref, strict=True):
        assert_close(a, e, TOL, name)


def test_strided_inputs():
    """Non-contiguous q, k, v, g (e.g. heads-first views) give the contiguous result."""
    q, k, v, g = make_inputs(40, "channel", seed=9)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g)]
    assert not views[0].is_contiguous()
    o, ht = chunk_gated_triton(*views, 0.25, output_final_state=True)
    o_ref, ht_ref = chunk_gated_triton(q, k, v, g, 0.25, output_final_state=True)
    assert_close(o, o_ref, 1e-6, "o")
    assert_close(ht, ht_ref, 1e-6, "ht")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """16-bit inputs: loads are cast to fp32, o comes back in v's dtype."""
    q, k, v, g = make_inputs(40, "channel", dtype=dtype, seed=8)
    o, ht = chunk_gated_triton(q, k, v, g, K**-0.5, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    o_ref, ht_ref = oracle(q.float(), k.float(), v.float(), g, output_final_state=True)
    assert_close(o.float(), o_ref, 1e-2, "o")
    assert_close(ht, ht_ref, 1e-3, "ht")


def test_rejects_bad_arguments():
    q, k, v, g = make_inputs(8, "channel")
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_triton(q, k, v, g[..., :4], 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_triton(q, k, v, g, 1.0, chunk_size=48)
    with pytest.raises(ValueError, match="initial_state"):  # checked once, in the family call
        gla.chunk(q, k, v, g, initial_state=torch.zeros(3, H, K, V), backend="triton")
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_triton(q, k, v, g, 1.0, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("gate", GATES)
def test_long_packed_documents(gate):
    """Many chunks per document, K = V = 64."""
    lengths = [300, 129, 64, 507]
    q, k, v, g = make_inputs(sum(lengths), gate, b=1, k_dim=64, v_dim=64, seed=11)
    cu = torch.tensor([0, 300, 429, 493, 1000], dtype=torch.int32)
    check_against_naive(q, k, v, g, torch.randn(len(lengths), H, 64, 64), cu_seqlens=cu)
