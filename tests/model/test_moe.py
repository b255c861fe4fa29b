"""The MoE feed-forward against a per-token loop over experts, capacity dropping by hand,
and the auxiliary losses against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from hylas.model.moe import MoE
from tests.helpers import assert_close

D, FF, E = 16, 24, 6


def build(top_k=2, shared=0, router="softmax", capacity=0.0, seed=0):
    torch.manual_seed(seed)
    return MoE(D, FF, E, top_k, shared, router, capacity)


def per_token_reference(moe: MoE, x):
    """Each token, one at a time: its k experts' SwiGLU outputs times the router weights."""
    x = x.reshape(-1, D)
    logits = x @ moe.router.weight.T
    scores = logits.softmax(-1) if moe.router.score == "softmax" else logits.sigmoid()
    out = torch.zeros_like(x)
    ex = moe.experts
    for n in range(x.shape[0]):
        top, idx = scores[n].topk(moe.top_k)
        for w, e in zip(top / top.sum(), idx.tolist(), strict=True):
            h = F.silu(x[n] @ ex.w_gate[e]) * (x[n] @ ex.w_up[e])
            out[n] += w * (h @ ex.w_down[e])
        if moe.shared is not None:
            out[n] += moe.shared(x[n])
    return out


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1])
def test_dropless_output_equals_a_per_token_loop(router, top_k, shared):
    moe = build(top_k, shared, router)
    x = torch.randn(2, 13, D)
    y = moe(x)
    assert y.shape == x.shape
    assert_close(y.reshape(-1, D), per_token_reference(moe, x), 1e-5, "moe output")
    stats = moe.last_stats
    assert stats.counts.sum() == 26 * top_k and stats.dropped == 0  # every token routed k times


def test_capacity_drops_exactly_the_overflow_in_token_order():
    moe = build(top_k=2, capacity=0.5)
    x = torch.randn(40, D)
    y = moe(x)
    stats = moe.last_stats
    capacity = math.ceil(0.5 * 40 * 2 / E)
    expected = int((stats.counts - capacity).clamp(min=0).sum())
    assert stats.dropped == expected > 0
    assert stats.dropped_fraction() == pytest.approx(expected / 80)
    # by hand: each expert keeps its first `capacity` assignments in token order
    logits = x @ moe.router.weight.T
    top, idx = logits.softmax(-1).topk(2)
    weights = top / top.sum(-1, keepdim=True)
    seen = [0] * E
    ref = torch.zeros_like(x)
    ex = moe.experts
    for n in range(40):
        for w, e in zip(weights[n], idx[n].tolist(), strict=True):
            seen[e] += 1
            if seen[e] <= capacity:
                h = F.silu(x[n] @ ex.w_gate[e]) * (x[n] @ ex.w_up[e])
                ref[n] += w * (h @ ex.w_down[e])
    assert_close(y, ref, 1e-5, "capacity-limited output")


def test_aux_and_z_losses_equal_a_hand_computation():
    moe = build(top_k=2)
    x = torch.randn(30, D)
    moe(x)
    stats = moe.last_stats
    logits = (x @ moe.router.weight.T).double()
    probs = logits.softmax(-1)
    chosen = probs.topk(2).indices
    f = [sum(int(e in chosen[n]) for n in range(30)) / 60 for e in range(E)]
    P = [probs[:, e].mean().item() for e in range(E)]
    aux = E * sum(fe * pe for fe, pe in zip(f, P, strict=True))
    z = (torch.logsumexp(logits, -1) ** 2).mean().item()
    assert stats.aux_loss().item() == pytest.approx(aux, rel=1e-5)
    assert stats.z_loss().item() == pytest.approx(z, rel=1e-5)
    assert stats.load_imbalance() == pytest.approx(max(f) / (1 / E), rel=1e-6)


def test_pooled_statistics_do_not_depend_on_how_the_batch_is_split():
    moe = build(top_k=2)
    x = torch.randn(32, D)
    moe(x)
    whole = moe.last_stats
    moe(x[:11])
    first = moe.last_stats
    moe(x[11:])
    pooled = first + moe.last_stats
    assert torch.equal(pooled.counts, whole.counts)
    assert_close(pooled.aux_loss(), whole.aux_loss(), 1e-6, "aux loss")
    assert_close(pooled.z_loss(), whole.z_loss(), 1e-6, "z loss")


def test_gradients_reach_the_router_and_every_used_expert():
    moe = build(top_k=2, shared=1)
    x = torch.randn(64, D)
    y = moe(x)
    stats = moe.last_stats
    (y.pow(2).mean() + 0.01 * stats.aux_loss() + 0.001 * stats.z_loss()).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = stats.counts > 0
    for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
        per_expert = w.grad.abs().flatten(1).sum(1)
        assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()


def test_active_parameters_count_k_experts():
    moe = build(top_k=2, shared=1)
    per_expert = 3 * D * FF
    assert moe.num_active_parameters() == E * D + 2 * per_expert + 3 * D * FF


def moe_config(**moe):
    from hylas.model.config import ModelConfig, MoEConfig

    base = dict(vocab_size=300, d_model=32, n_layers=4, n_heads=2, linear_to_full="3:1")
    return ModelConfig(**base, moe=MoEConfig(**moe)).validate()


@pytest.mark.parametrize(
    ("moe", "pattern"),
    [
        ({}, "DDDD"),
        ({"num_experts": 4}, "MMMM"),
        ({"num_experts": 4, "pattern": "DM"}, "DMDM"),
        ({"num_experts": 4, "first_dense": 1}, "DMMM"),
        ({"num_experts": 4, "pattern": "MD", "first_dense": 2}, "DDMD"),
    ],
)
def test_ffn_pattern_places_moe_layers(moe, pattern):
    from hylas.model.decoder import HylasLM

    cfg = moe_config(**moe)
    assert cfg.ffn_pattern == pattern
    kinds = ["M" if isinstance(b.ffn, MoE) else "D" for b in HylasLM(cfg).blocks]
    assert "".join(kinds) == pattern


def test_bad_moe_settings_are_refused():
    from hylas.model.config import ConfigError

    with pytest.raises(ConfigError, match="top_k must be in"):
        moe_config(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="router must be softmax or sigmoid"):
        moe_config(num_experts=4, router="relu")
    with pytest.raises(ConfigError, match="no layer is MoE"):
        moe_config(num_experts=4, first_dense=4)
    with pytest.raises(ConfigError, match="only M"):
        moe_config(num_experts=4, pattern="MX")


def test_model_loss_adds_the_weighted_aux_losses_and_counts_active_parameters():
    from hylas.model.decoder import HylasLM
    from hylas.train.loss import lm_loss

    cfg = moe_config(num_experts=4, top_k=1, pattern="DM", aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)
    model = HylasLM(cfg)
    ids = torch.randint(0, 300, (2, 24))
    out = model(ids)
    assert len(out.moe_stats) == 2
    aux = sum(0.1 * s.aux_loss() + 0.01 * s.z_loss() for s in out.moe_stats)
    ce = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    assert_close(lm_loss(model, out, ids), ce + aux, 1e-6, "loss")
    per_expert = 3 * 32 * cfg.ffn_dim
    assert model.num_active_parameters() == model.num_parameters() - 2 * 3 * per_expert
