"""The shipped recipes: each loads, builds on the meta device, its FLOPs per token equal a
count made by hand from its sizes, and the cluster-sized ones have parameter counts within
10% of their names."""

import re

import pytest
import torch

from hylas.model.decoder import HylasLM
from hylas.train.config import load_config, recipe_names


def _count(number: str, unit: str) -> float:
    return float(number) * (1e6 if unit == "m" else 1e9)


def named_size(name: str) -> tuple[float | None, float | None]:
    """(total, active) from a recipe name: 'hybrid-340m' -> (340e6, None),
    'moe-a0.3b-2b' -> (2e9, 0.3e9); (None, None) when the name holds no size."""
    m = re.search(r"a(\d+(?:\.\d+)?)([mb])-(\d+(?:\.\d+)?)([mb])$", name)
    if m:
        return _count(m[3], m[4]), _count(m[1], m[2])
    m = re.search(r"(\d+(?:\.\d+)?)([mb])$", name)
    return (None, None) if m is None else (_count(m[1], m[2]), None)


def hand_flops(d, layers, heads, kv_heads, mixer, ffn, vocab, seq, experts=None):
    """Training FLOPs per token counted from a recipe's sizes (3 x forward; forward = 2 x
    every matmul weight a token uses, plus the sequence terms), written from the sizes alone.

    ``layers`` = (linear layers, softmax layers); ``mixer`` = (name, key width, value width,
    gate weights) of the linear layers; ``experts`` = (E, top k, d_expert) for MoE FFNs."""
    n_linear, n_full = layers
    name, key, value, gate_weights = mixer
    K, V, C = key // heads, value // heads, min(64, seq)
    head_dim = d // heads
    linear_proj = 2 * d * key + 2 * d * value + value * d + gate_weights  # q k, v g, o
    attn_proj = 2 * d * d + 2 * d * kv_heads * head_dim  # q o, k v
    if experts is None:
        ffn_weights = 3 * d * ffn  # SwiGLU
    else:
        E, top_k, d_expert = experts
        ffn_weights = d * E + top_k * 3 * d * d_expert  # the router and the chosen experts
    matmul = n_linear * linear_proj + n_full * attn_proj + (n_linear + n_full) * ffn_weights
    matmul += vocab * d  # the LM head (tied: the embedding, counted once)
    # The chunkwise kernel per head and token: 2 C (K + V) + 4 K V; Gated DeltaNet adds the
    # delta rule's 2 C (K + V) + 2 K V + C^2, and its short convs 2 x 4 per channel of q, k, v.
    linear_seq = heads * (2 * C * (K + V) + 4 * K * V)
    if name == "gated_deltanet":
        linear_seq += heads * (2 * C * (K + V) + 2 * K * V + C * C) + 8 * (2 * key + value)
    attn_seq = 4 * heads * head_dim * (seq + 1) / 2  # q k^T and A v, the causal average
    return 3 * (2 * matmul + n_linear * linear_seq + n_full * attn_seq)


# Gated DeltaNet key 0.75 d, value 1.5 d, a and b projections d x heads each;
# GLA key 0.5 d, value d, the low-rank gate d x 16 + 16 x key.
GLA_256 = ("gla", 128, 256, 256 * 16 + 16 * 128)


def gdn(d, heads):
    return ("gated_deltanet", 3 * d // 4, 3 * d // 2, 2 * d * heads)


RECIPES = {
    "tiny": dict(
        d=256, layers=(3, 1), heads=4, kv_heads=4, mixer=GLA_256, ffn=704, vocab=4096, seq=256
    ),
    "tiny-gdn": dict(
        d=256, layers=(3, 1), heads=4, kv_heads=4, mixer=gdn(256, 4), ffn=704, vocab=4096, seq=256
    ),
    "hybrid-340m": dict(
        d=1024,
        layers=(18, 6),
        heads=8,
        kv_heads=4,
        mixer=gdn(1024, 8),
        ffn=2560,
        vocab=32000,
        seq=2048,
    ),
    "hybrid-1.3b": dict(
        d=2048,
        layers=(18, 6),
        heads=16,
        kv_heads=8,
        mixer=gdn(2048, 16),
        ffn=5120,
        vocab=32000,
        seq=2048,
    ),
    "moe-a0.3b-2b": dict(
        d=1024,
        layers=(18, 6),
        heads=8,
        kv_heads=4,
        mixer=gdn(1024, 8),
        ffn=None,
        vocab=32000,
        seq=2048,
        experts=(48, 4, 512),
    ),
    "moe-a1b-7b": dict(
        d=2048,
        layers=(18, 6),
        heads=16,
        kv_heads=8,
        mixer=gdn(2048, 16),
        ffn=None,
        vocab=32000,
        seq=2048,
        experts=(56, 4, 768),
    ),
}


def test_hybrid_340m_is_2_28_gflop_per_token():
    """Worked through once with literal numbers. Per Gated DeltaNet layer: projections
    2 x 1024 x 768 + 2 x 1024 x 1536 + 1536 x 1024 + 2 x 1024 x 8 = 6,307,840 weights; kernel
    8 heads x (4 x 64 x 288 + 6 x 96 x 192 + 64^2) = 1,507,328 and convs 8 x 3072 = 24,576
    FLOPs. Per softmax layer: 3,145,728 weights and 4 x 8 x 128 x 2049 / 2 = 4,196,352 FLOPs.
    FFN 3 x 1024 x 2560 = 7,864,320 per layer; head 32000 x 1024 = 32,768,000.
    Weights 18 x 6,307,840 + 6 x 3,145,728 + 24 x 7,864,320 + 32,768,000 = 353,927,168;
    forward 2 x 353,927,168 + 18 x 1,531,904 + 6 x 4,196,352 = 760,606,720; x 3."""
    cfg = load_config("hybrid-340m")
    with torch.device("meta"):
        model = HylasLM(cfg.model)
    assert model.flops_per_token(2048) == 2_281_820_160


def test_the_recipes_include_tiny_cpu_ones_and_cluster_sizes():
    names = recipe_names()
    assert set(names) == set(RECIPES)  # each has a hand count
    assert {"tiny", "tiny-gdn", "hybrid-340m", "hybrid-1.3b"} <= set(names)
    assert {"moe-a0.3b-2b", "moe-a1b-7b"} <= set(names)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds_on_the_meta_device_at_its_named_size(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = HylasLM(cfg.model)
    n = model.num_parameters()
    assert model.flops_per_token(cfg.train.seq_len) == pytest.approx(
        hand_flops(**RECIPES[name]), rel=1e-12
    )
    total, active = named_size(name)
    if total is not None:
        assert abs(n / total - 1) <= 0.10, f"{name}: {n / 1e6:.1f}M parameters"
    if active is not None:
        a = model.num_active_parameters()
        assert abs(a / active - 1) <= 0.10, f"{name}: {a / 1e6:.1f}M active parameters"
    else:
        assert model.num_active_parameters() == n
