"""The checkout's folders never shadow an installed package (docs/architecture.md,
"Packaging: one namespace, no shadowing").

The code folders (``kernels/``, ``model/``, ...) install as ``hylas.*``. When the checkout
root is on ``sys.path`` (pytest, ``python -m hylas.*`` or torchrun started from the root, a
Python session opened there), a root folder that is a regular package (one with an
``__init__.py``) wins over any installed package of the same name: transformers 5.25
imports the Hub's ``kernels`` package and got Hylas's folder instead. A folder without
``__init__.py`` is a namespace portion (PEP 420), which an installed regular package
always beats. Every test here runs fresh processes from the checkout root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hylas.model.decoder import HylasLM
from hylas.train.checkpoint import load_model_weights, open_checkpoint
from hylas.train.cli import main
from tests.helpers import rel_rms_error

ROOT = Path(__file__).resolve().parents[1]
# The folders that install as hylas.<name>.
CODE_FOLDERS = ("configs", "data", "kernels", "model", "parallel", "train")
LOGIT_TOL = 1e-5  # fp32, relative RMS error between Hylas and its export


def run_in_root(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``args`` in a fresh Python process whose working directory is the checkout root."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args} failed from the checkout root:\n{done.stderr[-3000:]}"
    return done


def test_no_code_folder_is_a_regular_package():
    regular = [f for f in CODE_FOLDERS if (ROOT / f / "__init__.py").exists()]
    assert not regular, (
        f"{regular} hold an __init__.py: from the checkout root they would shadow an "
        "installed package of that name"
    )


@pytest.mark.integration
def test_an_installed_package_wins_over_every_root_folder(tmp_path):
    """A dependency that ships a top-level ``model``, ``data``, ``kernels``... gets its own
    package, even with the checkout root first on sys.path (as ``python -c`` and pytest
    put it)."""
    site = tmp_path / "site"
    for name in CODE_FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = (
        "import importlib, sys;"
        f"assert sys.path[0] == '', sys.path[:2];"
        f"print([importlib.import_module(n).WHO for n in {CODE_FOLDERS!r}])"
    )
    done = run_in_root(["-c", code], PYTHONPATH=str(site))
    assert done.stdout.strip() == str([f"installed {n}" for n in CODE_FOLDERS])


@pytest.mark.integration
def test_transformers_imports_from_the_checkout_root():
    run_in_root(["-c", "from transformers import LlamaForCausalLM, MixtralForCausalLM"])


@pytest.mark.integration
def test_export_from_the_checkout_root_loads_in_transformers(tmp_path, monkeypatch):
    """``python -m hylas.train.cli export`` run from the root, then the export loaded by
    transformers in a process started in the root, giving Hylas's own logits."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    main(
        [
            "train",
            "--set",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.layer_pattern=LF",
            "train.steps=2",
            "train.warmup_steps=1",
            "train.seq_len=32",
            "train.batch_size=2",
            "train.eval_batches=0",
            "train.dtype=float32",
            f"train.out_dir={run}",
        ]
    )
    hf = tmp_path / "hf"
    run_in_root(["-m", "hylas.train.cli", "export", "--checkpoint", str(run), "--out", str(hf)])

    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    load = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "hf, ids, out = sys.argv[1:]\n"
        "m = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(ids)).logits, out)\n"
    )
    out = tmp_path / "logits.pt"
    run_in_root(
        ["-c", load, str(hf), str(tmp_path / "ids.pt"), str(out)],
        HF_HOME=str(tmp_path / "hf_home"),
    )

    ckpt = open_checkpoint(run)
    model = HylasLM(ckpt.config.model, "torch")
    load_model_weights(ckpt, model)
    with torch.no_grad():
        expected = model.eval()(ids).logits
    err = rel_rms_error(torch.load(out)[..., : expected.shape[-1]], expected)
    assert err < LOGIT_TOL, f"export logits off by {err:.2e} (relative RMS)"


@pytest.mark.integration
@pytest.mark.parametrize("entry", ["hylas.train", "hylas.train.cli"])
def test_module_entry_points_run_from_the_checkout_root(entry):
    done = run_in_root(["-m", entry, "--help"])
    assert "usage" in done.stdout.lower()
