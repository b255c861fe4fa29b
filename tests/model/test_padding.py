"""Left-padded batches: with an attention mask, each row gives what it gives alone, in the
prefill and in cached decoding, for every mixer (pads change no linear state or conv tail
and are never attended to); and the linear layers' head sizes as config keys."""

import pytest
import torch

from hylas.model.config import ConfigError, MoEConfig
from hylas.model.decoder import HylasLM
from tests.helpers import assert_close
from tests.model.test_mixers import MIXERS, VOCAB, build, config

TOL = 1e-5  # fp32: relative RMS error of a row against the same row run alone


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return ids, mask


def check_rows_equal_alone(model: HylasLM, lengths=(5, 19, 2), steps=(1, 1, 18)) -> None:
    """Prefill left-padded prompts (one longer than the recurrent-decoding limit), then
    decode steps of the given sizes (1: the per-token recurrence; 18: the chunkwise path from
    the cached state), comparing every row's logits with its run alone."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    ids, mask = left_pad(prompts)
    model.eval()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=True)
        alone = [model(p[None], use_cache=True) for p in prompts]
        for i, (p, a) in enumerate(zip(prompts, alone, strict=True)):
            assert_close(batch.logits[i, -len(p) :], a.logits[0], TOL, f"prefill row {i}")
        for n in steps:
            new = torch.randint(0, VOCAB, (len(prompts), n), generator=gen)
            mask = torch.cat((mask, torch.ones_like(new)), 1)
            batch = model(new, cache=batch.cache, attention_mask=mask, use_cache=True)
            for i in range(len(prompts)):
                alone[i] = model(new[i : i + 1], cache=alone[i].cache, use_cache=True)
                assert_close(batch.logits[i], alone[i].logits[0], TOL, f"{n}-token step row {i}")


@pytest.mark.parametrize("mixer", MIXERS)
def test_left_padded_rows_equal_their_runs_alone(mixer):
    check_rows_equal_alone(build(mixer, seed=1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(linear_to_full="0:1", attention=dict(window=4)),
        dict(linear_to_full="0:1", attention=dict(qk_norm=True)),
        dict(moe=MoEConfig(num_experts=4, top_k=2, shared_experts=1, router="sigmoid")),
    ],
    ids=["window", "qk-norm", "moe"],
)
def test_left_padding_with_windows_qk_norm_and_moe(kw):
    check_rows_equal_alone(build("gated_deltanet", seed=2, **kw))


def test_an_all_ones_mask_is_the_unpadded_batch():
    model = build("mamba2").eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(plain, masked)


def test_a_mask_of_the_wrong_shape_is_refused():
    model = build("gla")
    ids = torch.randint(0, VOCAB, (2, 7))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, cached \+ new"):
        model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2", "gla"])
def test_linear_head_sizes_are_config_keys(mixer):
    """A Llama's attention shapes (q d x d, k and v d x d here) taken exactly."""
    model = HylasLM(config(mixer, linear_head_k=16, linear_head_v=32), kernel_backend="torch")
    layer = model.blocks[0].mixer
    assert (layer.head_k, layer.head_v) == (16, 32)
    assert layer.q_proj.weight.shape == (2 * 16, 64)
    assert layer.v_proj.weight.shape == (2 * 32, 64)
    assert layer.o_proj.weight.shape == (64, 2 * 32)
    check_rows_equal_alone(model, lengths=(3, 6), steps=(1,))
    with pytest.raises(ConfigError, match=r"model\.linear_head_k must be positive"):
        config(mixer, linear_head_k=0)
