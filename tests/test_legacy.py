"""What users already hold keeps working: a checkpoint and its Hugging Face export, made
by Hylas before the kernels became one folder per op family, load and give the logits and
tokens they gave then.

``tests/fixtures/legacy`` was made once (and is never remade: remaking it with newer code
would prove nothing), from a scratch directory:

    hylas train --set model.d_model=32 model.d_ff=64 model.n_layers=2 model.n_heads=2 \
        model.linear_mixer=gated_deltanet model.linear_to_full=1:1 model.vocab_size=512 \
        train.steps=200 train.batch_size=8 train.seq_len=128 train.lr=1e-2 \
        train.eval_batches=1 train.warmup_steps=10 train.dtype=float32 train.out_dir=legacy
    hylas export --checkpoint legacy --out hf

``checkpoint/`` is its step 200 and ``hf/`` the export; ``expected.json`` holds a prompt's
ids and the 12 greedy tokens after it, ``expected_logits.safetensors`` the prompt's logits,
both computed by that Hylas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hylas.model.decoder import HylasLM
from hylas.model.generation import generate
from hylas.train.checkpoint import load_model_weights, open_checkpoint
from hylas.train.cli import main
from hylas.train.hf.importer import import_hf
from tests.helpers import assert_close

FIXTURE = Path(__file__).with_name("fixtures") / "legacy"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
LOGITS = safetensors.torch.load_file(FIXTURE / "expected_logits.safetensors")["logits"]
TOL = 1e-5  # fp32, the same math; summation order may differ


def model_of(checkpoint: Path) -> HylasLM:
    ckpt = open_checkpoint(checkpoint)  # every checksum verified
    model = HylasLM(ckpt.config.model, "torch")
    load_model_weights(ckpt, model)
    return model.eval()


def check_model(model: HylasLM, what: str) -> None:
    ids = EXPECTED["prompt_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert_close(logits, LOGITS, TOL, f"{what} logits")
    greedy = list(generate(model, ids, 12, 0.0, 0, stop_ids=()))
    assert greedy == EXPECTED["greedy_ids"], what


def test_an_old_checkpoint_loads_and_gives_its_logits_and_tokens():
    check_model(model_of(FIXTURE / "checkpoint"), "checkpoint")


def test_hylas_generate_reads_an_old_checkpoint(capsys):
    tok = open_checkpoint(FIXTURE / "checkpoint").tokenizer()
    argv = ["generate", "--checkpoint", str(FIXTURE / "checkpoint"), "--max-new-tokens", "12"]
    assert main([*argv, "--prompt", EXPECTED["prompt"]]) == 0
    want = tok.decode(EXPECTED["prompt_ids"] + EXPECTED["greedy_ids"])
    assert capsys.readouterr().out.strip() == want.strip()


def test_an_old_export_imports_back_to_the_same_model(tmp_path):
    import_hf(FIXTURE / "hf", tmp_path / "imported")
    check_model(model_of(tmp_path / "imported"), "imported export")


@pytest.mark.integration
def test_an_old_export_loads_in_transformers_and_generates_its_tokens(tmp_path):
    """In a fresh process (transformers reads its module cache's place at import), with
    the export's own bundled code."""
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = torch.tensor([json.loads(sys.argv[2])])\n"
        "out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)\n"
        "print(json.dumps(out[0, ids.shape[1]:].tolist()))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(FIXTURE / "hf"), json.dumps(EXPECTED["prompt_ids"])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == EXPECTED["greedy_ids"]
