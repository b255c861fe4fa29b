"""How sequence parallelism meets the model: ``sp.apply`` swaps the class of each layer that
exchanges across the sequence for a subclass overriding the seam the layer declares, and
changes nothing else. (The equality with the single-process run, on real ranks, is
``test_sp.py``'s.)"""

from __future__ import annotations

import inspect

import pytest
import torch

from hylas.model.attention import SoftmaxAttention
from hylas.model.config import ModelConfig
from hylas.model.conv import ShortConv
from hylas.model.decoder import HylasLM
from hylas.model.linear_mixers import LinearMixer
from hylas.parallel import sp
from hylas.train.ac import apply_activation_checkpointing


def config() -> ModelConfig:
    return ModelConfig(
        vocab_size=300, d_model=32, n_layers=2, n_heads=2, linear_mixer="gated_deltanet",
        linear_to_full="1:1",
    ).validate()  # fmt: skip


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 40), generator=gen)
    return dict(input_ids=ids, cu_seqlens=torch.tensor([0, 17, 40, 80], dtype=torch.int32))


def test_apply_swaps_classes_and_keeps_names_values_and_methods():
    plain, model = HylasLM(config(), "torch", seed=0), sp.apply(HylasLM(config(), "torch", seed=0))
    assert list(plain.state_dict()) == list(model.state_dict())
    swapped = {
        LinearMixer: sp.SequenceParallelLinear,
        SoftmaxAttention: sp.SequenceParallelAttention,
        ShortConv: sp.SequenceParallelConv,
    }
    seen = set()
    for (name, before), after in zip(plain.named_modules(), model.modules(), strict=True):
        for base, layer in swapped.items():
            if isinstance(before, base):
                assert isinstance(after, layer) and isinstance(after, type(before)), name
                seen.add(base)
        # no method is rebound on an instance: the seams are the classes' own
        assert not [k for k, v in vars(after).items() if inspect.ismethod(v)], name
    assert seen == set(swapped)
    with pytest.raises(ValueError, match="already sequence-parallel"):
        sp.apply(model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_forward_without_a_segment_is_the_single_device_one(checkpointing):
    """Bit for bit, outputs and gradients, with and without activation checkpointing."""
    plain, model = HylasLM(config(), "torch", seed=0), sp.apply(HylasLM(config(), "torch", seed=0))
    if checkpointing:
        apply_activation_checkpointing(plain), apply_activation_checkpointing(model)
    results = []
    for m in (plain, model):
        out = m.train()(**batch()).logits
        out.float().square().mean().backward()
        results.append((out, [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_the_model_knows_nothing_of_segments():
    """The segment reaches the layers through ``sp.apply``'s hook, not the model's forward
    or its ``Packing``."""
    from hylas.model.decoder import Packing

    assert "segment" not in inspect.signature(HylasLM.forward).parameters
    assert "segment" not in Packing.__dataclass_fields__
    with pytest.raises(TypeError, match="segment"):
        HylasLM(config(), "torch", seed=0)(**batch(), segment=None)
