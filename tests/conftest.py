"""Test-wide settings. TRITON_INTERPRET must be set before any @triton.jit is defined."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

# CI machines have two cores: keep torch's intra-op threads at two at most.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def hylas_cache(tmp_path_factory):
    """One prepared-corpus cache for the whole session, outside the user's home."""
    path = tmp_path_factory.mktemp("hylas-cache")
    old = os.environ.get("HYLAS_CACHE_DIR")
    os.environ["HYLAS_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HYLAS_CACHE_DIR", None)
    else:
        os.environ["HYLAS_CACHE_DIR"] = old
