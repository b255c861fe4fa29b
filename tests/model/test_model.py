"""The hybrid decoder: pattern, registry, cache-consistent decoding, generation."""

import pytest
import torch

from hylas.model.attention import SoftmaxAttention
from hylas.model.config import ConfigError, ModelConfig
from hylas.model.decoder import HylasLM
from hylas.model.generation import generate
from hylas.model.linear_mixers import GLA
from hylas.train.loss import lm_loss
from tests.helpers import assert_close


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, d_model=64, n_layers=4, n_heads=2, n_kv_heads=1)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("ratio", "n_layers", "pattern"),
    [
        ("3:1", 8, "LLLFLLLF"),
        ("6:2", 4, "LLLF"),
        ("1:0", 3, "LLL"),
        ("0:1", 2, "FF"),
        ("1:1", 2, "LF"),
    ],
)
def test_linear_to_full_expands_to_the_layer_pattern(ratio, n_layers, pattern):
    cfg = small_config(linear_to_full=ratio, n_layers=n_layers).validate()
    assert cfg.pattern == pattern
    model = HylasLM(cfg)
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [GLA if c == "L" else SoftmaxAttention for c in pattern]


def test_layer_pattern_takes_precedence_and_is_checked():
    assert small_config(layer_pattern="LF", linear_to_full="3:1").validate().pattern == "LFLF"
    with pytest.raises(ConfigError, match="multiple of the layer pattern"):
        small_config(layer_pattern="LLF").validate()
    with pytest.raises(ConfigError, match="only L"):
        small_config(layer_pattern="LX").validate()


def test_mixer_registry_errors_name_the_choices():
    with pytest.raises(
        ConfigError, match=r"not a known linear mixer; available: deltanet, gated_deltanet, "
    ):
        small_config(linear_mixer="gla2").validate()


def test_vocab_is_padded_for_the_embedding_only():
    model = HylasLM(small_config(vocab_size=300))
    assert model.embed.weight.shape[0] == 320
    logits = model(torch.randint(0, 300, (1, 5))).logits
    assert logits.shape == (1, 5, 300)


def test_loss_is_mean_cross_entropy_over_labelled_tokens():
    torch.manual_seed(0)
    model = HylasLM(small_config())
    ids = torch.randint(0, 300, (2, 9))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids)
    logp = out.logits.log_softmax(-1)[:, :-1]
    expected = -logp.gather(-1, labels[:, :-1, None]).mean()
    torch.testing.assert_close(lm_loss(model, out, labels), expected, rtol=1e-5, atol=1e-5)


def test_the_chunked_loss_equals_the_loss_of_the_whole_logits(monkeypatch):
    """Without logits the LM head runs chunk by chunk (recomputed in the backward): the
    same summed loss and gradients as the head over all tokens at once."""
    from hylas.train import loss

    torch.manual_seed(0)
    model = HylasLM(small_config(vocab_size=300))
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.roll(-1, dims=1)
    labels[:, ::3] = -100
    whole = loss.cross_entropy_sum(model, model(ids), labels)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(loss, "LOSS_CHUNK", 7)  # 52 targets: 8 chunks, the last short
    out = model(ids, logits=False)
    assert out.logits is None and loss.count_targets(labels) == 52
    chunked = loss.cross_entropy_sum(model, out, labels)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    chunked.backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, expected[n], 1e-5, n)


def test_cached_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = HylasLM(small_config()).eval()
    ids = torch.randint(0, 300, (2, 45))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :20], use_cache=True)  # prefill (chunked path)
        parts, cache = [out.logits], out.cache
        for t in range(20, 30):  # one token at a time (recurrent path)
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.cache
        out = model(ids[:, 30:], cache=cache, use_cache=True)  # a multi-token step with a past
        parts.append(out.logits)
    assert out.cache.length == 45
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    torch.manual_seed(0)
    model = HylasLM(small_config()).eval()
    prompt = [5, 17, 42]
    tokens = list(generate(model, prompt, max_new_tokens=8))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tokens == ids[len(prompt) :]


def test_sampling_is_seeded():
    model = HylasLM(small_config()).eval()
    draw = lambda seed: list(  # noqa: E731
        generate(
            model,
            [1, 2],
            10,
            temperature=1.0,
            top_k=20,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
