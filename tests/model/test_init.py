"""Initialisation: a meta-device build, materialised and initialised, equals the eager build
bit for bit (parameters and buffers); the seed alone decides the values; the statistics
follow the scheme (Normal(0, init_std), residual outputs / sqrt(2 L), norms one)."""

import math

import pytest
import torch

from hylas.model.config import ModelConfig, MoEConfig
from hylas.model.decoder import HylasLM
from hylas.model.linear_mixers import _fixed_decay
from hylas.model.registry import LINEAR_MIXERS, check_linear_mixer

check_linear_mixer("gla")  # fills the registry
MIXERS = sorted(LINEAR_MIXERS)
CONFIGS = {m: {"linear_mixer": m} for m in MIXERS}
CONFIGS["moe"] = {
    "linear_mixer": "gated_deltanet",
    "tie_embeddings": False,
    "moe": MoEConfig(num_experts=4, shared_experts=1),
}


def config(name: str) -> ModelConfig:
    # vocab_size 260 is the smallest the config accepts (byte fallback).
    base = dict(d_model=64, n_heads=2, n_layers=2, linear_to_full="1:1", vocab_size=260)
    return ModelConfig(**{**base, **CONFIGS[name]}).validate()


def tensors(model: HylasLM) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not, by name."""
    return {**model.state_dict(), **dict(model.named_buffers())}


def meta_build(cfg: ModelConfig, seed: int) -> HylasLM:
    """Built on meta, materialised as NaN, then initialised: whatever init_weights
    misses stays NaN."""
    with torch.device("meta"):
        model = HylasLM(cfg, "torch", seed=seed)
    assert all(t.is_meta for t in tensors(model).values())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in tensors(model).values():
            t.fill_(math.nan)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_build_then_init_weights_equals_the_eager_build(name):
    cfg = config(name)
    eager = tensors(HylasLM(cfg, "torch", seed=7))
    model = meta_build(cfg, seed=7)
    meta = tensors(model)
    assert eager.keys() == meta.keys()
    for key, t in eager.items():
        assert torch.equal(t, meta[key]), key
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("name", ["gated_deltanet", "moe"])
def test_the_seed_alone_decides_the_weights(name):
    cfg = config(name)
    torch.manual_seed(1)
    a = HylasLM(cfg, "torch", seed=0)
    torch.manual_seed(2)
    b = HylasLM(cfg, "torch", seed=0)
    c = HylasLM(cfg, "torch", seed=1)
    for (key, ta), tb, tc in zip(
        tensors(a).items(), tensors(b).values(), tensors(c).values(), strict=True
    ):
        assert torch.equal(ta, tb), key
        if ta.dim() >= 2:  # the random ones; norms and buffers come from the config
            assert not torch.equal(ta, tc), key


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2", "gla", "retnet", "moe"])
def test_init_statistics_follow_the_scheme(name):
    cfg = config(name)
    model = HylasLM(cfg, "torch", seed=0)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.1)
    if not cfg.tie_embeddings:
        assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.1)
    for key, p in model.named_parameters():
        if "norm" in key:
            assert (p == 1).all(), key
        elif key.endswith("bias") and "dt_bias" not in key:
            assert (p == 0).all(), key
        elif key.endswith(("o_proj.weight", "down_proj.weight", "experts.w_down")):
            assert p.std().item() == pytest.approx(out_std, rel=0.1), key
        elif key.endswith(("q_proj.weight", "up_proj.weight", "experts.w_gate")):
            assert p.std().item() == pytest.approx(std, rel=0.1), key
    head = model.blocks[1].mixer.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head, 2).float() / head)
    assert torch.equal(model.blocks[1].mixer.rope.inv_freq, inv_freq)
    mixer = model.blocks[0].mixer
    if mixer.convs:
        bound = cfg.conv_size**-0.5  # nn.Conv1d's kaiming-uniform for a depthwise conv
        w = torch.cat([c.weight.flatten() for c in (mixer.q_conv, mixer.k_conv, mixer.v_conv)])
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    if hasattr(mixer, "A_log"):
        A = mixer.A_log.exp()
        assert ((A >= 1) & (A <= 16)).all()
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert ((dt > 0.9e-3) & (dt < 0.11)).all()  # Mamba's log-uniform dt in [1e-3, 0.1]
    if hasattr(mixer, "D"):
        assert (mixer.D == 1).all()
    if hasattr(mixer, "log_decay"):
        assert torch.equal(mixer.log_decay, _fixed_decay(name, mixer.n_v_heads, "cpu"))


@pytest.fixture
def poisoned_empty():
    """torch.empty filled with NaN (deterministic mode's fill_uninitialized_memory), so a
    module that leaves a tensor uninitialised shows it on every machine, every run."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    assert torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(before)


def built_alone(name: str) -> torch.nn.Module:
    """The mixer, attention or MoE layer of ``config(name)``, constructed by itself."""
    from hylas.model.attention import SoftmaxAttention
    from hylas.model.moe import MoE
    from hylas.model.registry import mixer_class

    cfg = config("gla" if name == "attention" else name)
    if name == "moe":
        return MoE(cfg.d_model, 32, 4, 2, 1, "softmax", 0.0)
    if name == "attention":
        return SoftmaxAttention(cfg, "torch")
    return mixer_class("L", name)(cfg, "torch")


@pytest.mark.parametrize("name", [*sorted(CONFIGS), "attention"])
def test_a_module_built_alone_is_usable(name, poisoned_empty):
    """Every parameter and buffer is set at construction (buffers to their config values,
    parameters drawn as torch's own layers draw them), without HylasLM.init_weights."""
    module = built_alone(name)
    for key, t in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items():
        assert torch.isfinite(t).all(), f"{name}: {key} is not set at construction"
    for sub in module.modules():  # buffers equal what init_buffers computes on the CPU
        if hasattr(sub, "init_buffers"):
            before = {k: b.clone() for k, b in sub.named_buffers(recurse=False)}
            sub.init_buffers()
            for k, b in sub.named_buffers(recurse=False):
                assert torch.equal(b, before[k]), f"{name}: buffer {k}"
