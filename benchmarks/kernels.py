"""Forward + backward time of the chunkwise ops against a plain per-token loop, one process.

    python benchmarks/kernels.py                       # all families, fp32 and bf16, T = 1K..32K
    python benchmarks/kernels.py --families gla --dtypes bf16 --lengths 2048 32768
    python benchmarks/kernels.py --markdown docs/bench-kernels.md   # also write the table

Shapes: B = 1, H = 4, K = V = 128 (per the kernels issue). The per-token loop is the fp32
recurrence (``<family>.naive``) under autograd; it stores every state, so it runs only up
to --loop-max (8K by default: it needs gigabytes beyond that). Columns: milliseconds for
one forward + backward, microseconds per token, the speed-up over the loop, and the time
per token relative to T = 2048 (1.0 = linear scaling). On CUDA the Triton backend is
timed next to torch.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe

from hylas.kernels.registry import families

FAMILIES = families()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H, K, V = 4, 128, 128


def make_inputs(family, T: int, dtype, device):
    """The family's own inputs (``SPEC.inputs``): q, k, v in ``dtype``, gates in fp32."""
    return family.SPEC.inputs(1, T, H, K, V, dtype=dtype, device=device)


def fwd_bwd(fn, inputs):
    o, _ = fn(*inputs)
    o.float().sum().backward()


def timed(fn, inputs, device, min_time: float = 0.5, min_runs: int = 3) -> float:
    """Seconds per call: one warm-up, then the fastest of at least ``min_runs`` calls made
    over at least ``min_time`` seconds (the minimum is the least disturbed by a busy
    machine). ``min_runs=1, min_time=0`` times a single call."""
    fwd_bwd(fn, inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        sync()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--loop-max", type=int, default=8192, help="longest T for the per-token loop")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    machine = describe(device)
    header = [
        "family",
        "dtype",
        "backend",
        "T",
        "chunk ms",
        "us/token",
        "loop ms",
        "speed-up",
        "per-token vs 2K",
    ]
    rows = []
    print(
        f"# kernels: forward + backward, B=1 H={H} K={K} V={V}, {machine}, torch {torch.__version__}",
        flush=True,
    )
    print(" | ".join(header), flush=True)
    for fname in args.families:
        family = FAMILIES[fname]
        for dname in args.dtypes:
            for backend in backends:
                base = None
                for T in args.lengths:
                    inputs = make_inputs(family, T, DTYPES[dname], device)
                    t = timed(
                        lambda *a, f=family, b=backend: f.chunk(*a, backend=b), inputs, device
                    )
                    loop = None
                    if args.loop_max >= T and backend == "torch":
                        loop = timed(family.naive, inputs, device, min_time=0.0, min_runs=1)
                    per_tok = t / T * 1e6
                    if T == 2048:
                        base = per_tok
                    row = [
                        fname,
                        dname,
                        backend,
                        str(T),
                        f"{t * 1e3:.1f}",
                        f"{per_tok:.2f}",
                        "-" if loop is None else f"{loop * 1e3:.0f}",
                        "-" if loop is None else f"{loop / t:.0f}x",
                        "-" if base is None else f"{per_tok / base:.2f}",
                    ]
                    rows.append(row)
                    print(" | ".join(row), flush=True)
    if args.markdown:
        lines = [
            f"Machine: {machine}; torch {torch.__version__}; B=1, H={H}, K=V={K}; forward + backward.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
