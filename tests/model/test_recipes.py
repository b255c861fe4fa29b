"""The shipped recipes: each loads, builds on the meta device, and the cluster-sized ones
have parameter counts within 10% of their names."""

import re

import pytest
import torch

from hylas.model import HylasLM
from hylas.train.config import load_config, recipe_names


def named_size(name: str) -> float | None:
    """'hybrid-340m' -> 340e6, 'hybrid-1.3b' -> 1.3e9, None when the name holds no size."""
    m = re.search(r"(\d+(?:\.\d+)?)([mb])$", name)
    return None if m is None else float(m[1]) * (1e6 if m[2] == "m" else 1e9)


def test_the_recipes_include_tiny_cpu_ones_and_cluster_sizes():
    names = recipe_names()
    assert {"tiny", "tiny-gdn", "hybrid-340m", "hybrid-1.3b"} <= set(names)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds_on_the_meta_device_at_its_named_size(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = HylasLM(cfg.model)
    n = model.num_parameters()
    assert model.flops_per_token(cfg.train.seq_len) > 6 * model.num_parameters(True)
    size = named_size(name)
    if size is not None:
        assert abs(n / size - 1) <= 0.10, f"{name}: {n / 1e6:.1f}M parameters"
