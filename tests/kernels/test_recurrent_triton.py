"""The fused recurrent Triton kernels (run by the interpreter here) against the fp32 oracles:
gla.naive for the gated families, naive_delta for the delta rule."""

import pytest
import torch
import torch.nn.functional as F

from hylas.kernels import gated_delta_rule, simple_gla
from hylas.kernels.engines.delta.chunk_triton import chunk_delta_triton
from hylas.kernels.engines.delta.naive import naive_delta
from hylas.kernels.engines.recurrent_triton import fused_recurrent_delta, fused_recurrent_gated
from hylas.kernels.gla import naive
from tests.helpers import assert_close

B, H, K, V = 2, 2, 16, 24  # K != V on purpose, and V is not a power of two


def make_inputs(T, gate, k_dim=K, v_dim=V, dtype=torch.float32, gate_scale=None, seed=0):
    """q, k, v and a log decay g of the given kind (None, "head" [B,T,H], "channel" [B,T,H,K])."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, k_dim, generator=gen).to(dtype)
    k = torch.randn(B, T, H, k_dim, generator=gen).to(dtype)
    v = torch.randn(B, T, H, v_dim, generator=gen).to(dtype)
    shape = {"head": (B, T, H), "channel": (B, T, H, k_dim)}.get(gate)
    g = None
    if shape is not None:
        if gate_scale is None:
            g = F.logsigmoid(torch.randn(shape, generator=gen) * 2)
        else:
            g = -gate_scale * torch.rand(shape, generator=gen)
        g = g.to(dtype)
    return q, k, v, g


def oracle(q, k, v, g, scale, h0):
    """gla.naive with the gate widened to one value per key channel."""
    if g is None:
        gk = torch.zeros_like(q, dtype=torch.float32)
    elif g.dim() == 3:
        gk = g[..., None].expand(-1, -1, -1, q.shape[-1])
    else:
        gk = g
    return naive(q, k, v, gk, scale, h0, output_final_state=True)


@pytest.mark.parametrize("gate", [None, "head", "channel"])
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_naive(gate, T, with_h0):
    q, k, v, g = make_inputs(T, gate)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    scale = K**-0.5
    o_ref, ht_ref = oracle(q, k, v, g, scale, h0)
    o, ht = fused_recurrent_gated(q, k, v, g, scale, initial_state=h0)
    assert o.dtype == v.dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (B, H, K, V)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, ht_ref, 1e-5, "ht")


@pytest.mark.parametrize(
    ("k_dim", "v_dim"),
    [(32, 32), (64, 72)],  # K == V; and V split over two programs with the last one masked
)
@pytest.mark.parametrize("gate", ["head", "channel"])
def test_other_sizes(k_dim, v_dim, gate):
    q, k, v, g = make_inputs(5, gate, k_dim=k_dim, v_dim=v_dim)
    h0 = torch.randn(B, H, k_dim, v_dim)
    o_ref, ht_ref = oracle(q, k, v, g, 0.3, h0)
    o, ht = fused_recurrent_gated(q, k, v, g, 0.3, initial_state=h0)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, ht_ref, 1e-5, "ht")


@pytest.mark.parametrize("gate", [None, "head", "channel"])
def test_bf16_inputs(gate):
    q, k, v, g = make_inputs(5, gate, dtype=torch.bfloat16)
    h0 = torch.randn(B, H, K, V)
    o_ref, ht_ref = oracle(q, k, v, g, K**-0.5, h0)
    o, ht = fused_recurrent_gated(q, k, v, g, K**-0.5, initial_state=h0)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert_close(o.float(), o_ref.float(), 2e-2, "o")
    assert_close(ht, ht_ref, 2e-2, "ht")


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_strong_decay_is_finite(gate):
    q, k, v, g = make_inputs(33, gate, gate_scale=20.0)
    h0 = torch.randn(B, H, K, V)
    o, ht = fused_recurrent_gated(q, k, v, g, K**-0.5, initial_state=h0)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    o_ref, ht_ref = oracle(q, k, v, g, K**-0.5, h0)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, ht_ref, 1e-5, "ht")


def test_continuing_from_the_returned_state():
    """Decoding 3 + 4 tokens in two calls equals decoding all 7 in one."""
    q, k, v, g = make_inputs(7, "channel")
    o_all, ht_all = fused_recurrent_gated(q, k, v, g, 0.25)
    o_a, ht_a = fused_recurrent_gated(q[:, :3], k[:, :3], v[:, :3], g[:, :3], 0.25)
    o_b, ht_b = fused_recurrent_gated(q[:, 3:], k[:, 3:], v[:, 3:], g[:, 3:], 0.25, ht_a)
    assert_close(torch.cat([o_a, o_b], dim=1), o_all, 1e-6, "o")
    assert_close(ht_b, ht_all, 1e-6, "ht")


def test_no_final_state():
    q, k, v, g = make_inputs(2, "head")
    o, ht = fused_recurrent_gated(q, k, v, g, 1.0, output_final_state=False)
    assert ht is None
    assert_close(o, oracle(q, k, v, g, 1.0, None)[0], 1e-5, "o")


@pytest.mark.parametrize(
    "bad",
    [
        {"v": torch.zeros(B, 3, H + 1, V)},
        {"g": torch.zeros(B, 3, H, K + 1)},
        {"initial_state": torch.zeros(B, H, V, K)},
    ],
)
def test_bad_shapes_raise_in_the_family_before_the_kernel(bad):
    """Shapes are checked once, in the family's call; the kernel wrapper only launches."""
    q, k, v, g = make_inputs(3, "head")
    args = {"v": v, "g": g, "initial_state": None} | bad
    with pytest.raises(ValueError, match=r"must be \["):
        simple_gla.recurrent(
            q, k, args["v"], args["g"], initial_state=args["initial_state"], backend="triton"
        )


# ----------------------------------------------------------------------------------------
# The delta rule (fused_recurrent_delta) against the fp32 naive_delta


def make_delta_inputs(T, gated, k_dim=K, v_dim=V, beta_max=2.0, dtype=torch.float32, seed=0):
    """q, k (L2-normalised), v, beta ~ U(0, beta_max) and g None or [B, T, H] (log decay)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, k_dim, generator=gen)
    k = F.normalize(torch.randn(B, T, H, k_dim, generator=gen), dim=-1)
    v = torch.randn(B, T, H, v_dim, generator=gen)
    beta = beta_max * torch.rand(B, T, H, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) * 2) if gated else None
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize(("T", "with_h0"), [(1, True), (5, False), (33, True)])
def test_delta_matches_naive(gated, T, with_h0):
    q, k, v, g, beta = make_delta_inputs(T, gated)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    o_ref, ht_ref = naive_delta(q, k, v, g, beta, K**-0.5, h0, output_final_state=True)
    o, ht = fused_recurrent_delta(q, k, v, g, beta, K**-0.5, initial_state=h0)
    assert o.dtype == v.dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (B, H, K, V)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, ht_ref, 1e-5, "ht")


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("prefill", ["chunk", "recurrent"])
def test_delta_decoding_after_a_prefill(gated, prefill):
    """Tokens 64..69 decoded one at a time from the state after the first 64 (from the
    chunkwise kernel or from this one) equal naive_delta over all 70 tokens."""
    q, k, v, g, beta = make_delta_inputs(70, gated, seed=1)
    o_ref, ht_ref = naive_delta(q, k, v, g, beta, 0.3, output_final_state=True)
    first = [None if x is None else x[:, :64] for x in (q, k, v, g, beta)]
    if prefill == "chunk":
        o_first, state = chunk_delta_triton(*first, 0.3, None, True)
    else:
        o_first, state = fused_recurrent_delta(*first, 0.3)
    outputs = [o_first]
    for t in range(64, 70):
        step = [None if x is None else x[:, t : t + 1] for x in (q, k, v, g, beta)]
        o_t, state = fused_recurrent_delta(*step, 0.3, initial_state=state)
        outputs.append(o_t)
    assert_close(torch.cat(outputs, dim=1), o_ref, 1e-5, "o")
    assert_close(outputs[-1], o_ref[:, -1:], 1e-5, "o of the last token")
    assert_close(state, ht_ref, 1e-5, "ht")


def test_delta_several_value_blocks():
    """K = 64, V = 72: the state slice holds all of K, so V splits over two programs."""
    q, k, v, g, beta = make_delta_inputs(5, True, k_dim=64, v_dim=72)
    h0 = torch.randn(B, H, 64, 72)
    o_ref, ht_ref = naive_delta(q, k, v, g, beta, 0.3, h0, output_final_state=True)
    o, ht = fused_recurrent_delta(q, k, v, g, beta, 0.3, initial_state=h0)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(ht, ht_ref, 1e-5, "ht")


def test_delta_bf16_inputs_and_no_final_state():
    q, k, v, g, beta = make_delta_inputs(5, True, dtype=torch.bfloat16)
    h0 = torch.randn(B, H, K, V)
    o, ht = fused_recurrent_delta(q, k, v, g, beta, K**-0.5, h0, output_final_state=False)
    assert o.dtype == torch.bfloat16 and ht is None
    o_ref, _ = naive_delta(q, k, v, g, beta, K**-0.5, h0)
    assert_close(o.float(), o_ref.float(), 2e-2, "o")


@pytest.mark.parametrize(
    "bad",
    [{"beta": torch.zeros(B, 3, H, 1)}, {"g": torch.zeros(B, 3, H, K)}],
)
def test_delta_bad_shapes_raise_in_the_family_before_the_kernel(bad):
    q, k, v, g, beta = make_delta_inputs(3, True)
    args = {"beta": beta, "g": g} | bad
    with pytest.raises(ValueError, match=r"must be \["):
        gated_delta_rule.recurrent(q, k, v, args["g"], args["beta"], backend="triton")


@pytest.mark.parametrize("family", ["gla", "gated_delta_rule"])
def test_public_recurrent_follows_the_backend_rule(family, monkeypatch):
    """``recurrent(backend=...)`` goes through resolve_backend like ``chunk``: "triton" runs
    the fused kernel (here in the interpreter), "torch" and "auto" on CPU the recurrence."""
    from hylas import kernels
    from hylas.kernels.engines import recurrent_triton

    mod = getattr(kernels, family)
    fused = "fused_recurrent_gated" if family == "gla" else "fused_recurrent_delta"
    calls = []
    original = getattr(recurrent_triton, fused)
    monkeypatch.setattr(recurrent_triton, fused, lambda *a: calls.append(1) or original(*a))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, 2, 16, generator=gen), torch.randn(1, 3, 2, 16, generator=gen)
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 3, 2, 24, generator=gen)
    if family == "gla":
        gates = [F.logsigmoid(torch.randn(1, 3, 2, 16, generator=gen))]
    else:
        gates = [F.logsigmoid(torch.randn(1, 3, 2, generator=gen)), torch.rand(1, 3, 2)]
    h0 = torch.randn(1, 2, 16, 24, generator=gen)
    outs = {}
    for backend in ("torch", "auto", "triton"):
        outs[backend] = mod.recurrent(q, k, v, *gates, initial_state=h0, backend=backend)
        assert len(calls) == (backend == "triton"), backend
    for backend in ("auto", "triton"):
        assert_close(outs[backend][0], outs["torch"][0], 1e-5, f"o ({backend})")
        assert_close(outs[backend][1], outs["torch"][1], 1e-5, f"ht ({backend})")
