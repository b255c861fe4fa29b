"""Every registered linear mixer, in a 3:1 hybrid: finite forward and backward, packed
documents equal per-document runs, cached decoding equals the full forward; softmax
attention's window and QK-norm; parameter counts and FLOPs."""

import dataclasses
import itertools

import pytest
import torch

from hylas.model.attention import SoftmaxAttention
from hylas.model.config import AttentionConfig, ConfigError, ModelConfig
from hylas.model.decoder import HylasLM
from hylas.model.linear_mixers import LinearMixer
from hylas.model.registry import LINEAR_MIXERS, check_linear_mixer, mixer_registry
from hylas.train.ac import apply_activation_checkpointing
from hylas.train.loss import lm_loss
from tests.helpers import assert_close

check_linear_mixer("gla")  # fills the registry
MIXERS = sorted(LINEAR_MIXERS)
VOCAB = 300


def config(mixer, **kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=4,
        n_heads=2,
        n_kv_heads=1,
        linear_mixer=mixer,
        linear_to_full="3:1",
    )
    if isinstance(kw.get("attention"), dict):
        kw["attention"] = AttentionConfig(**kw["attention"])
    return ModelConfig(**{**base, **kw}).validate()


def build(mixer, seed=0, **kw) -> HylasLM:
    torch.manual_seed(seed)
    model = HylasLM(config(mixer, **kw), kernel_backend="torch")
    with torch.no_grad():  # break the symmetry of init (e.g. Mamba2's D = 1, norms = 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_a_mixer_name_builds_its_registered_class_and_an_unknown_one_is_refused():
    for mixer in MIXERS:
        model = HylasLM(config(mixer))
        kinds = {
            type(b.mixer)
            for b, kind in zip(model.blocks, model.cfg.pattern, strict=True)
            if kind == "L"
        }
        assert kinds == {LINEAR_MIXERS[mixer]} and LINEAR_MIXERS[mixer].name == mixer
        assert isinstance(model.blocks[3].mixer, SoftmaxAttention)
        assert mixer_registry() == {**LINEAR_MIXERS, "attention": SoftmaxAttention}
    with pytest.raises(ConfigError, match=r"'glaa' is not a known linear mixer; available: delta"):
        config("glaa")


def test_every_linear_mixer_shares_the_wrappers_parameter_names():
    shared = {"q_proj", "k_proj", "v_proj", "g_proj", "o_norm", "o_proj"}
    for mixer in MIXERS:
        layer = HylasLM(config(mixer)).blocks[0].mixer
        names = {n.split(".")[0] for n, _ in layer.named_parameters()}
        assert shared <= names, mixer


@pytest.mark.parametrize("mixer", MIXERS)
def test_each_linear_mixer_trains_in_a_hybrid(mixer):
    """Ten AdamW steps on one batch: every weight gets a finite, non-zero gradient at the
    first step (a mixer cut off from the loss would not), and the loss falls from ln 300 =
    5.70 by more than 1.5 (3.3-3.8 measured)."""
    model = build(mixer)
    ids = torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        loss = lm_loss(model, model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().max() > 0, f"{name} has a zero gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.5, losses


@pytest.mark.parametrize("mixer", MIXERS)
def test_packed_batch_equals_each_document_alone(mixer):
    model = build(mixer).eval()
    lengths = [[23, 1, 40], [30, 34]]  # two samples of 64 tokens, documents inside
    T = 64
    ids = torch.randint(0, VOCAB, (2, T))
    offsets = [0]
    for row in lengths:
        for n in row:
            offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu).logits
        flat_ids = ids.flatten()
        for s, e in itertools.pairwise(offsets):
            alone = model(flat_ids[s:e].unsqueeze(0)).logits[0]
            assert_close(packed.flatten(0, 1)[s:e], alone, 1e-5, f"{mixer} document [{s}, {e})")


@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_decoding_equals_the_full_forward(mixer):
    model = build(mixer).eval()
    ids = torch.randint(0, VOCAB, (2, 90))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :70], use_cache=True)  # prefill: the chunked kernels
        parts, cache = [out.logits], out.cache
        for t in range(70, 80):  # one token at a time: the recurrent kernels
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.cache
        out = model(ids[:, 80:], cache=cache, use_cache=True)  # several tokens with a past
        parts.append(out.logits)
    assert_close(torch.cat(parts, 1), full, 1e-4, f"{mixer} decoded logits")


def mixing_faults(layer: LinearMixer, T: int = 40) -> list[str]:
    """What is wrong with how one linear layer mixes tokens, as sentences (none: it mixes).

    Beyond the reach of its short conv (4 tokens), a layer's output at t can only depend on
    x_s (s < t) through its recurrent state. So: changing token 0 must change the output at
    every t in [8, 12) (a layer whose output is zero, or whose state starts afresh at every
    token, changes it by exactly 0; the weakest carry here, Mamba2's small dt against its D
    skip, moves it by 1e-5), and changing token 20 must leave every output before 20 as it
    was (causality)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, T, layer.o_proj.out_features, generator=gen)
    faults = []
    with torch.no_grad():
        base = layer(x)[0][0]
        for t in (0, 20):
            x2 = x.clone()
            x2[0, t] = torch.randn(x.shape[-1], generator=gen)
            moved = (layer(x2)[0][0] - base).norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)
            if t == 0 and not (moved[8:12] > 1e-6).all():
                faults.append(f"token 0 moves outputs 8..11 by only {moved[8:12].min():.1e}")
            if t == 20 and moved[:20].max() > 1e-6:
                faults.append(f"token 20 moves an earlier output by {moved[:20].max():.1e}")
    return faults


@pytest.mark.parametrize("mixer", MIXERS)
def test_each_linear_mixer_carries_the_past_through_its_state(mixer):
    layer = build(mixer).blocks[0].mixer
    assert mixing_faults(layer) == []


def test_the_mixing_check_catches_a_zero_output_and_a_fresh_state():
    """The check above, shown failing on two deliberately broken mixers."""
    for mixer in ("gla", "gated_deltanet"):
        zero = build(mixer).blocks[0].mixer
        zero.kernel = lambda *args, real=zero.kernel: (torch.zeros_like(real(*args)[0]), None)
        assert any("token 0 moves" in f for f in mixing_faults(zero)), mixer

        fresh = build(mixer).blocks[0].mixer

        def per_token(q, k, v, gates, state, use_cache, seq, layer=fresh):
            steps = [  # every token from a zero state
                layer.family.recurrent(
                    *(x[:, t : t + 1] for x in (q, k, v, *gates)), scale=layer.scale
                )[0]
                for t in range(q.shape[1])
            ]
            return torch.cat(steps, 1), None

        fresh.kernel = per_token
        assert any("token 0 moves" in f for f in mixing_faults(fresh)), mixer


def test_linear_cache_is_constant_in_length():
    model = build("gated_deltanet").eval()
    with torch.no_grad():
        short = model(torch.randint(0, VOCAB, (1, 10)), use_cache=True).cache
        long = model(torch.randint(0, VOCAB, (1, 300)), use_cache=True).cache
    for kind, a, b in zip(model.cfg.pattern, short.states, long.states, strict=True):
        sizes = [
            [t.numel() for t in torch.utils._pytree.tree_leaves(x) if t is not None] for x in (a, b)
        ]
        if kind == "L":
            assert sizes[0] == sizes[1]
        else:
            assert sum(sizes[1]) == 30 * sum(sizes[0])  # softmax KV cache grows with T


def test_more_value_heads_than_qk_heads():
    model = build("gated_deltanet", linear_v_heads=4).eval()
    mixer = model.blocks[0].mixer
    assert (mixer.n_heads, mixer.n_v_heads) == (2, 4)
    assert mixer.q_proj.out_features == 2 * mixer.head_k
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :30], use_cache=True)
        step = model(ids[:, 30:], cache=out.cache, use_cache=True)
    assert_close(torch.cat([out.logits, step.logits], 1), full, 1e-4, "decoded logits")


def test_negative_eigenvalues_double_beta():
    plain = build("deltanet").blocks[0].mixer
    neg = build("deltanet", allow_neg_eigval=True).blocks[0].mixer
    x = torch.randn(1, 5, 64)
    assert_close(neg.beta(x), 2 * plain.beta(x), 1e-6, "beta")
    with pytest.raises(ConfigError, match="allow_neg_eigval is for the delta-rule mixers"):
        config("gla", allow_neg_eigval=True)


def test_sliding_window_attention_sees_only_the_window():
    model = build("gla", linear_to_full="0:1", n_layers=1, attention={"window": 8}).eval()
    ids = torch.randint(0, VOCAB, (1, 40))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    diff = (a - b).abs().amax(-1)[0]
    assert (diff[5:13] > 0).all() and (diff[13:] == 0).all() and (diff[:5] == 0).all()
    with torch.no_grad():  # and the cache path applies the same window
        out = model(ids[:, :30], use_cache=True)
        step = model(ids[:, 30:], cache=out.cache, use_cache=True)
    assert_close(torch.cat([out.logits, step.logits], 1), a, 1e-5, "windowed decode")


def test_qk_norm_adds_per_head_norms():
    model = build("gla", attention={"qk_norm": True})
    attn = model.blocks[3].mixer
    assert attn.q_norm.weight.shape == (attn.head_dim,)
    ids = torch.randint(0, VOCAB, (1, 20))
    lm_loss(model, model(ids), ids).backward()
    assert attn.q_norm.weight.grad is not None


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    """Applied from outside (``train.ac``): each block's forward runs again in the backward,
    the gradients and the parameter names are those of the plain model."""
    grads, calls, names = [], [], []
    for ckpt in (False, True):
        model = build("gated_deltanet")
        if ckpt:
            apply_activation_checkpointing(model)
        runs: list[int] = []
        for block in model.blocks:
            block.mixer.register_forward_hook(lambda *_, runs=runs: runs.append(1))
        ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(0))
        lm_loss(model, model(ids), ids.roll(-1, 1)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        calls.append(len(runs))
        names.append(list(model.state_dict()))
    assert calls == [4, 8]  # 4 blocks, each forward once more in the backward
    assert names[0] == names[1]
    assert_close(grads[1], grads[0], 1e-6, "gradients")


def test_bad_mixer_settings_are_refused_at_load_time():
    with pytest.raises(ConfigError, match="linear_v_heads"):
        config("gated_deltanet", linear_v_heads=3)
    with pytest.raises(ConfigError, match="feature_map"):
        config("linear_attention", feature_map="softmax")
    with pytest.raises(ConfigError, match=r"attention\.window"):
        config("gla", attention={"window": -1})
    with pytest.raises(ConfigError, match="must divide into"):
        config("gla", linear_v_heads=6)
    # One head of K = 384 and V = 768: over what the GPU kernels serve.
    with pytest.raises(ConfigError, match=r"gated_deltanet: head sizes K=384, V=768 are over"):
        config("gated_deltanet", d_model=512, n_heads=1)


def test_a_familys_served_head_size_bounds_its_mixers(monkeypatch):
    """The limit is the family's SPEC.max_head_size: GLA's heads here are K = 16, V = 32."""
    from hylas.kernels import gla

    config("gla")  # served
    monkeypatch.setattr(gla, "SPEC", dataclasses.replace(gla.SPEC, max_head_size=24))
    with pytest.raises(ConfigError, match=r"gla: head sizes K=16, V=32 are over the 24"):
        config("gla")


def test_flops_per_token_counts_matmuls_and_attention_by_hand():
    cfg = config("gla", linear_to_full="0:1", n_layers=2, n_kv_heads=2)
    model = HylasLM(cfg)
    T, d, ff, V = 128, 64, cfg.ffn_dim, cfg.padded_vocab_size
    per_layer = 4 * d * d + 3 * d * ff  # q, k, v, o and the SwiGLU
    attention = 4 * d * (T + 1) / 2  # q k^T and A v over the causal context, averaged
    expected = 3 * (2 * (2 * per_layer + V * d) + 2 * attention)
    assert model.flops_per_token(T) == pytest.approx(expected)


# Each linear mixer at d_model 64, 2 heads, conv width 4, counted by hand: (weights of its
# matmuls, the chunkwise kernel's forward FLOPs per token, the short convs' FLOPs per token).
# Widths: key = expand_k x 64 (K per head), value = expand_v x 64 (V per head).
# Kernel, per head and token, chunk C = 64: intra-chunk q k^T and A v, 2 C (K + V); the
# inter-chunk read q h and the state update k^T v, 4 K V; the delta rule adds k k^T and the
# solves for u and w (2 C (K + V)), delta = u - w h (2 K V) and the triangular inverse (C^2).
# Convs: 2 x 4 per channel of q, k and v.
HAND_COUNT = {
    # key 64 (K 32), value 64 (V 32): q k v g o 5 x 64 x 64; 2 x (2*64*64 + 4*32*32)
    "linear_attention": (5 * 64 * 64, 2 * (8192 + 4096), 0),
    "lightning": (5 * 64 * 64, 2 * (8192 + 4096), 0),
    # key 64 (K 32), value 128 (V 64): q k 2 x 64 x 64, v g 2 x 64 x 128, o 128 x 64
    "retnet": (2 * 4096 + 3 * 8192, 2 * (2 * 64 * 96 + 4 * 32 * 64), 0),
    # key 32 (K 16), value 64 (V 32), the low-rank gate 64 x 16 + 16 x 32
    "gla": (2 * 2048 + 3 * 4096 + 1024 + 512, 2 * (2 * 64 * 48 + 4 * 16 * 32), 0),
    "hgrn2": (2 * 2048 + 3 * 4096, 2 * (2 * 64 * 48 + 4 * 16 * 32), 0),
    # key 32 (K 16), value 128 (V 64), a_proj 64 x 2; convs over 32 + 32 + 128 channels
    "mamba2": (2 * 2048 + 3 * 8192 + 128, 2 * (2 * 64 * 80 + 4 * 16 * 64), 8 * 192),
    # key 64 (K 32), value 64 (V 32), b_proj 64 x 2; convs over 3 x 64 channels
    "deltanet": (
        5 * 4096 + 128,
        2 * (2 * 64 * 64 + 4 * 32 * 32 + 2 * 64 * 64 + 2 * 32 * 32 + 64 * 64),
        8 * 192,
    ),
    # key 48 (K 24), value 96 (V 48): q k 2 x 64 x 48, v g 2 x 64 x 96, o 96 x 64, a b 2 x 128
    "gated_deltanet": (
        2 * 3072 + 3 * 6144 + 256,
        2 * (2 * 64 * 72 + 4 * 24 * 48 + 2 * 64 * 72 + 2 * 24 * 48 + 64 * 64),
        8 * 192,
    ),
    # Gated DeltaNet's sizes, two Householder steps a token (num_householder = 2): k 64 x 96,
    # v 64 x 192 and b_proj 64 x 4 twice as wide; the kernel's work twice, convs over
    # 48 + 96 + 192 channels
    "gated_deltaproduct": (
        3072 + 6144 + 12288 + 6144 + 6144 + 128 + 256,
        2 * 2 * (2 * 64 * 72 + 4 * 24 * 48 + 2 * 64 * 72 + 2 * 24 * 48 + 64 * 64),
        8 * 336,
    ),
}


def test_hand_counts_cover_every_mixer():
    assert set(HAND_COUNT) == set(MIXERS)


@pytest.mark.parametrize("mixer", MIXERS)
def test_linear_mixer_flops_per_token_match_a_hand_count(mixer):
    cfg = config(mixer, linear_to_full="1:0", n_layers=2)
    projections, kernel, conv = HAND_COUNT[mixer]
    ffn = 3 * 64 * 192  # SwiGLU, d_ff = 8/3 x 64 rounded up to 192
    head = 320 * 64  # the vocabulary of 300 padded to 320
    forward = 2 * (2 * (projections + ffn) + head) + 2 * (kernel + conv)
    assert HylasLM(cfg).flops_per_token(128) == pytest.approx(3 * forward, rel=1e-12)


def test_initialisation_keeps_each_mixers_own_parameters():
    model = build("gated_deltanet")
    mixer = HylasLM(config("gated_deltanet")).blocks[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt > 0.9e-3) & (dt < 0.11)).all()  # Mamba's log-uniform dt in [1e-3, 0.1]
    assert mixer.q_conv.weight.std() > 0.1  # nn.Conv1d's init, not the 0.02 of projections
    assert model.blocks[0].mixer.q_proj.weight.std() < 0.05
