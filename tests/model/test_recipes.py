"""The shipped recipes: each loads, builds on the meta device, and the cluster-sized ones
have parameter counts within 10% of their names."""

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


def test_the_recipes_include_tiny_cpu_ones_and_cluster_sizes():
    names = recipe_names()
    assert {"tiny", "tiny-gdn", "hybrid-340m", "hybrid-1.3b"} <= set(names)
    assert {"moe-a0.3b-2b", "moe-a1b-7b"} <= set(names)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds_on_the_meta_device_at_its_named_size(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = HylasLM(cfg.model)
    n = model.num_parameters()
    active_body = model.num_active_parameters() - model.embed.weight.numel()
    assert model.flops_per_token(cfg.train.seq_len) > 6 * active_body
    total, active = named_size(name)
    if total is not None:
        assert abs(n / total - 1) <= 0.10, f"{name}: {n / 1e6:.1f}M parameters"
    if active is not None:
        a = model.num_active_parameters()
        assert abs(a / active - 1) <= 0.10, f"{name}: {a / 1e6:.1f}M active parameters"
    else:
        assert model.num_active_parameters() == n
