"""The chunkwise delta-rule Triton kernels (run by the interpreter here) against the fp32
per-token naive_delta, for DeltaNet (g None) and Gated DeltaNet (g [B, T, H]).

Every case checks o, the final state and the gradients of q, k, v, g, beta and the
initial state through one random projection of both outputs.
"""

import pytest
import torch
import torch.nn.functional as F

from hylas.kernels.engines.delta.chunk_triton import chunk_delta_triton
from hylas.kernels.engines.delta.naive import naive_delta
from tests.helpers import assert_close

B, H, K, V = 2, 2, 16, 24  # K != V on purpose, and V is not a power of two
TOL = 1e-4  # fp32 throughout
GATED = [False, True]


def make_inputs(
    T, gated, b=B, h=H, k_dim=K, v_dim=V, beta_max=1.0, strong=False, dtype=torch.float32, seed=0
):
    """q, k (L2-normalised), v, g (None, or a [B, T, H] log decay) and beta ~ U(0, beta_max).

    beta_max = 2 allows negative eigenvalues of I - beta k^T k; strong: g = -20 * U(0, 1),
    a decay of up to exp(-20) per token."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, h, k_dim, generator=gen)
    k = F.normalize(torch.randn(b, T, h, k_dim, generator=gen), dim=-1)
    v = torch.randn(b, T, h, v_dim, generator=gen)
    beta = beta_max * torch.rand(b, T, h, generator=gen)
    g = None
    if gated:
        if strong:
            g = -20 * torch.rand(b, T, h, generator=gen)
        else:
            g = F.logsigmoid(torch.randn(b, T, h, generator=gen) * 2)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def oracle(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    return naive_delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def run_with_grads(fn, q, k, v, g, beta, h0, cu_seqlens=None, scale=None):
    """o, ht and the gradients of [q, k, v, beta, (g), (h0)] of (o dO).sum() + (ht dht).sum()."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, beta)]
    extra = [x.detach().clone().requires_grad_() for x in (g, h0) if x is not None]
    g_ = extra[0] if g is not None else None
    h0_ = extra[-1] if h0 is not None else None
    o, ht = fn(*leaves[:3], g_, leaves[3], scale, h0_, True, cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen)
    dht = torch.randn(ht.shape, generator=gen)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves + extra)
    return o, ht, grads


def check_against_naive(q, k, v, g, beta, h0, cu_seqlens=None, tol=TOL):
    o_ref, ht_ref, g_ref = run_with_grads(oracle, q, k, v, g, beta, h0, cu_seqlens)
    o, ht, grads = run_with_grads(chunk_delta_triton, q, k, v, g, beta, h0, cu_seqlens)
    assert o.dtype == v.dtype and o.shape == v.shape
    assert ht.dtype == torch.float32 and ht.shape == ht_ref.shape
    assert_close(o.float(), o_ref.float(), tol, "o")
    assert_close(ht, ht_ref, tol, "ht")
    names = ["dq", "dk", "dv", "dbeta"] + ["dg"] * (g is not None) + ["dh0"] * (h0 is not None)
    for name, a, e in zip(names, grads, g_ref, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        # dg sums terms that cancel exactly where the state is zero (a first token with no
        # initial state): there only an absolute bound is meaningful.
        assert_close(a.float(), e.float(), tol, name, atol=1e-5 if name == "dg" else 0.0)


@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
@pytest.mark.parametrize(
    ("T", "with_h0", "beta_max"),
    # One chunk of one token; a partial chunk; exactly one chunk; four chunks, the last
    # partial. Every T runs once, with or without an initial state, beta in [0, 1] or [0, 2].
    [(1, True, 2.0), (37, False, 1.0), (64, True, 1.0), (200, True, 2.0)],
)
def test_matches_naive(gated, T, with_h0, beta_max):
    q, k, v, g, beta = make_inputs(T, gated, beta_max=beta_max)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    check_against_naive(q, k, v, g, beta, h0)


@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
def test_no_initial_state_over_several_chunks(gated):
    q, k, v, g, beta = make_inputs(150, gated, h=1, beta_max=2.0, seed=1)
    check_against_naive(q, k, v, g, beta, None)


@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
def test_packed_documents(gated):
    """Documents restart from their own initial state; the last chunk of each is partial."""
    lengths = [50, 1, 64, 93]
    q, k, v, g, beta = make_inputs(sum(lengths), gated, b=1, beta_max=2.0, seed=2)
    cu = torch.tensor([0, 50, 51, 115, 208], dtype=torch.int32)
    h0 = torch.randn(len(lengths), H, K, V)
    check_against_naive(q, k, v, g, beta, h0, cu_seqlens=cu)


def test_packed_equals_separate_runs():
    """The packed result is the concatenation of the documents run one by one."""
    lengths = [50, 1, 64, 93]
    q, k, v, g, beta = make_inputs(sum(lengths), True, b=1, seed=3)
    cu = torch.tensor([0, 50, 51, 115, 208], dtype=torch.int32)
    h0 = torch.randn(len(lengths), H, K, V)
    o, ht = chunk_delta_triton(q, k, v, g, beta, 0.3, h0, True, cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        part = (x[:, s:e] for x in (q, k, v, g, beta))
        o_n, ht_n = chunk_delta_triton(*part, 0.3, h0[n : n + 1], True)
        assert_close(o[:, s:e], o_n, 1e-6, f"o of document {n}")
        assert_close(ht[n : n + 1], ht_n, 1e-6, f"ht of document {n}")


def test_strong_decay_is_finite_and_accurate():
    """g = -20 * U(0, 1) per token: any exp(+gamma) over a chunk would overflow fp32."""
    q, k, v, g, beta = make_inputs(150, True, strong=True, beta_max=2.0, seed=4)
    check_against_naive(q, k, v, g, beta, torch.randn(B, H, K, V))


def test_no_exp_of_a_positive_number(monkeypatch):
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
    q, k, v, g, beta = make_inputs(100, True, b=1, h=1, strong=True, seed=10)
    cu = torch.tensor([0, 30, 31, 100], dtype=torch.int32)
    run_with_grads(chunk_delta_triton, q, k, v, g, beta, torch.randn(3, 1, K, V), cu)
    assert largest and max(largest) <= 0.0


@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
def test_several_key_and_value_blocks(gated):
    """K = 72 and V = 80: two 64-wide key blocks (in the scans, two register blocks of
    the state) and two 64-wide value blocks, the last ones masked."""
    q, k, v, g, beta = make_inputs(70, gated, b=1, h=1, k_dim=72, v_dim=80, seed=6)
    check_against_naive(q, k, v, g, beta, torch.randn(1, 1, 72, 80))


@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
@pytest.mark.parametrize(
    ("k_dim", "v_dim"), [(96, 192), (200, 40)], ids=["recipe-96x192", "four-key-blocks"]
)
def test_recipe_and_wide_heads(gated, k_dim, v_dim):
    """The recipes' heads, K = 96 and V = 192 (the scans hold two 64-row key blocks and
    run three 64-column value blocks), and K = 200 (four key blocks, the last masked, over
    32-column value blocks), fp32, packed, with a partial last chunk."""
    q, k, v, g, beta = make_inputs(90, gated, b=1, h=1, k_dim=k_dim, v_dim=v_dim, seed=11)
    cu = torch.tensor([0, 20, 90], dtype=torch.int32)
    h0 = torch.randn(2, 1, k_dim, v_dim)
    check_against_naive(q, k, v, g, beta, h0, cu_seqlens=cu)


def test_without_final_state():
    """output_final_state=False: ht is None and the gradients need no dht."""
    q, k, v, g, beta = make_inputs(70, True, h=1, seed=7)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    o, ht = chunk_delta_triton(*leaves, 0.25)
    assert ht is None
    o_ref, _ = naive_delta(*leaves, scale=0.25)
    assert_close(o, o_ref, TOL, "o")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((o * do).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves)
    for name, a, e in zip(["dq", "dk", "dv", "dg", "dbeta"], grads, grads_ref, strict=True):
        assert_close(a, e, TOL, name, atol=1e-5 if name == "dg" else 0.0)


def test_bf16_inputs():
    """16-bit inputs: loads are cast to fp32, o comes back in v's dtype."""
    q, k, v, g, beta = make_inputs(40, True, h=1, dtype=torch.bfloat16, seed=8)
    o, ht = chunk_delta_triton(q, k, v, g, beta, K**-0.5, None, True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_ref, ht_ref = naive_delta(q, k, v, g, beta, K**-0.5, output_final_state=True)
    assert_close(o.float(), o_ref.float(), 2e-2, "o")
    assert_close(ht, ht_ref, 1e-2, "ht")


@pytest.mark.slow
@pytest.mark.parametrize("gated", GATED, ids=["deltanet", "gated"])
def test_larger_matrices(gated):
    """H = 4, K = V = 64, several chunks per document."""
    q, k, v, g, beta = make_inputs(300, gated, b=1, h=4, k_dim=64, v_dim=64, beta_max=2.0)
    check_against_naive(q, k, v, g, beta, torch.randn(1, 4, 64, 64))
