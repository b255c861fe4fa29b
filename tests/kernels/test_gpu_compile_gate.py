"""The GPU compile gate in CI: every Triton kernel Hylas launches, compiled for sm_80, sm_89
and sm_90 at the worst head sizes (256, fp32 and bf16) and at the recipes' (96 / 192 and
48 / 96, bf16), must fit each target's shared memory per block and threads.

The machinery and what it proves are in ``tests/gpu_compile_gate.py``. Each target compiles
in its own process (the gate needs Triton without its interpreter, and a fresh cache), all
three at once. The full matrix of head sizes and dtypes is ``slow``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu_compile_gate import FAMILIES, HEAD_SIZES, TARGETS

pytestmark = pytest.mark.integration  # compiler subprocesses

ROOT = Path(__file__).resolve().parents[2]


def launched_kernels() -> set[str]:
    """Every ``@triton.jit`` kernel (a function named ``*_kernel``) in any module of
    ``kernels/``."""
    names = set()
    for path in (ROOT / "kernels").rglob("*.py"):
        names |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", path.read_text()))
    return names


def run_targets(tmp: Path, matrix: str, probe: bool) -> dict:
    """Run one gate process per target at once; target -> (log, records or None)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for target in TARGETS:
        out = tmp / f"{target}.json"
        cmd = [sys.executable, "-m", "tests.gpu_compile_gate", "--matrix", matrix]
        cmd += ["--targets", target, "--json", str(out)] + (["--probe"] if probe else [])
        env_t = dict(env, TRITON_CACHE_DIR=str(tmp / f"cache-{target}"))
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env_t, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs[target] = (proc, out)
    results = {}
    for target, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=3600)
        results[target] = (log, json.loads(out.read_text()) if out.exists() else None)
    return results


def check_target(results: dict, target: str, probe: bool) -> list[dict]:
    log, records = results[target]
    assert records is not None, f"the gate did not finish for {target}:\n{log[-4000:]}"
    kernels = [r for r in records if "probe" not in r["cases"]]
    bad = [
        f"{r['kernel']} on {target} ({r['config']}): {'; '.join(r['problems'])}"
        for r in kernels
        if r["problems"]
    ]
    assert not bad, "kernels over the target's limits:\n" + "\n".join(bad)
    missing = launched_kernels() - {r["kernel"] for r in kernels}
    assert not missing, f"never compiled for {target}: {sorted(missing)}"
    if probe:  # the gate can fail: the oversized probe is refused, by name and size
        (rec,) = [r for r in records if "probe" in r["cases"]]
        limit = TARGETS[target][1]
        assert rec["kernel"] == "oversized_probe_kernel"
        assert rec["shared"] > limit
        assert rec["problems"] == [f"shared memory {rec['shared']:,} B > {limit:,} B"]
    return kernels


@pytest.fixture(scope="module")
def ci_gate(tmp_path_factory):
    return run_targets(tmp_path_factory.mktemp("gate"), "ci", probe=True)


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_kernel_fits_the_target(ci_gate, target):
    kernels = check_target(ci_gate, target, probe=True)
    cases = {tuple(c) for r in kernels for c in r["cases"]}
    worst = max(HEAD_SIZES)
    for family in FAMILIES:  # every case ran to its end, the last one included
        for k, v, dtype in [(worst, worst, "float32"), (48, 96, "bfloat16")]:
            assert (family, k, v, dtype) in cases


@pytest.mark.slow
def test_full_matrix(tmp_path):
    """K, V in HEAD_SIZES (K != V too), fp32, bf16 and fp16, both state variants."""
    results = run_targets(tmp_path, "full", probe=False)
    for target in TARGETS:
        check_target(results, target, probe=False)
