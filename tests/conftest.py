"""Test-wide settings. TRITON_INTERPRET must be set before any @triton.jit is defined."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch


def pytest_configure(config):
    """Every tier but ``-m gpu`` runs Triton in its interpreter on CPU tensors, on two
    threads (CI machines have two cores). The gpu tier runs the kernels compiled, and its
    subprocesses must not inherit the interpreter. Nothing has defined a Triton kernel yet
    here: test modules are imported after this hook."""
    if config.getoption("markexpr", "").strip() == "gpu":
        os.environ.pop("TRITON_INTERPRET", None)
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
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
