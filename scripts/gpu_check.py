"""One command for a fresh GPU machine: does Hylas work here, and how fast?

    python scripts/gpu_check.py [--only tests,train,kernels] [--wheels DIR] [--report FILE]

Parts, each in its own process under its own time limit, so one that fails or hangs does
not take the rest down:

* ``tests``: the gpu tier (``pytest -m gpu``: every kernel family compiled against its
  oracle in fp32 and bf16, ``hylas train`` / ``generate`` on CUDA, resume, SIGTERM, ZeRO);
* ``train``: a 30-step ``hybrid-340m`` run through ``hylas train`` (bf16, 8 x 2048 tokens a
  step), reporting tokens/s, MFU and peak memory from its ``metrics.jsonl``;
* ``kernels``: the GPU benchmarks' slot; today ``benchmarks/kernels.py``'s CUDA table.

It installs nothing that is already there: with ``--wheels DIR`` it installs, from that
directory alone, only the requirements that do not import. It writes one markdown report
(the machine, the versions, every figure, each part's status and time).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module -> distribution, for what Hylas imports at run time
NEEDED = {
    "deepspeed": "deepspeed",
    "zstandard": "zstandard",
    "filelock": "filelock",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "sentencepiece": "sentencepiece",
    "yaml": "pyyaml",
    "transformers": "transformers",
    "pytest": "pytest",
}


def install_missing(wheels: Path | None) -> list[str]:
    missing = []
    for module, dist in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing and wheels is not None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--find-links",
                str(wheels),
                *missing,
            ],
            check=True,
        )
    return missing


def run_part(cmd: list[str], limit: float, log: Path, env: dict) -> tuple[str, float]:
    """Run ``cmd`` in its own process group for at most ``limit`` seconds -> (status, s)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {limit:.0f} s", time.time() - start
    return ("passed" if rc == 0 else f"failed (exit {rc})"), time.time() - start


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def machine() -> list[str]:
    import torch
    import triton

    lines = [
        f"- Python {platform.python_version()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}"
    ]
    for module in ("deepspeed", "transformers"):
        try:
            lines.append(f"- {module} {importlib.import_module(module).__version__}")
        except ImportError:
            lines.append(f"- {module}: not installed")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(
            f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
            f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
        )
    return lines


def train_figures(run: Path) -> list[str]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    if not steps:
        return ["- no step was logged"]
    last = steps[-1]
    return [
        "| step | loss | tokens/s | MFU | peak memory (GB) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['step']} | {r['loss']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {max(r['peak_memory_gb']):.1f} |"
            for r in steps
        ),
        "",
        f"Last logged step: {last['tokens_per_s']:,.0f} tokens/s, MFU {100 * last['mfu']:.1f}%.",
    ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", default="tests,train,kernels", help="parts to run, comma-separated")
    p.add_argument("--wheels", type=Path, help="a directory of wheels for what is missing")
    p.add_argument("--report", type=Path, default=Path("gpu_check.md"))
    p.add_argument(
        "--limits",
        default="tests=300,train=240,kernels=180",
        help="seconds per part, e.g. tests=300,train=240",
    )
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    unknown = set(parts) - {"tests", "train", "kernels"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; the parts are tests, train, kernels")
    limits = {k: float(v) for k, v in (x.split("=") for x in args.limits.split(","))}
    missing = install_missing(args.wheels)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("WANDB_MODE", "offline")
    work = Path(tempfile.mkdtemp(prefix="hylas-gpu-check-"))
    report = [
        "# Hylas GPU check",
        "",
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "",
        *machine(),
        f"- installed from wheels: {', '.join(missing) or 'nothing'}",
        "",
    ]
    commands = {
        "tests": [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_gpu.py"),
        ],
        "train": [
            sys.executable,
            "-m",
            "hylas.train.cli",
            "train",
            "--config",
            "hybrid-340m",
            "--set",
            "train.steps=30",
            "train.warmup_steps=3",
            "train.log_every=5",
            "train.eval_batches=0",
            "train.save_every=0",
            f"train.out_dir={work / 'hybrid-340m'}",
        ],
        "kernels": [
            sys.executable,
            str(ROOT / "benchmarks" / "kernels.py"),
            "--dtypes",
            "bf16",
            "--lengths",
            "2048",
            "8192",
            "--loop-max",
            "0",
            "--markdown",
            str(work / "kernels.md"),
        ],
    }
    failed = False
    for part in parts:
        log = work / f"{part}.log"
        print(f"gpu_check: running {part} (at most {limits.get(part, 300):.0f} s) ...", flush=True)
        status, seconds = run_part(commands[part], limits.get(part, 300), log, env)
        print(f"gpu_check: {part} {status} in {seconds:.0f} s", flush=True)
        failed |= status != "passed"
        report += [
            f"## {part}: {status} ({seconds:.0f} s)",
            "",
            f"`{' '.join(commands[part][1:])}`",
            "",
        ]
        if part == "train" and (work / "hybrid-340m" / "metrics.jsonl").exists():
            report += [*train_figures(work / "hybrid-340m"), ""]
        if part == "kernels" and (work / "kernels.md").exists():
            report += [(work / "kernels.md").read_text(), ""]
        report += ["```", tail(log), "```", ""]
    tmp = args.report.with_suffix(".partial")
    tmp.write_text("\n".join(report) + "\n")
    tmp.replace(args.report)
    print(f"gpu_check: report in {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
