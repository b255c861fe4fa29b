"""The GPU compile gate: every Triton kernel Hylas launches, compiled for real NVIDIA
targets on a machine without a GPU, and checked against each target's limits.

What it proves. Each case calls the public ``chunk`` (forward and backward, with and
without an initial and a final state) and ``recurrent`` of every op family on small CPU
tensors, through the same wrapper code a training step runs: the same block sizes, the
same constexpr variants, the same grids. A compile-only Triton driver stands in for CUDA:

- it reports a ``GPUTarget`` (sm_80, sm_89 or sm_90) with a distinct device id per target,
  because Triton caches compiled kernels per device;
- every kernel is lowered by Triton's own pipeline down to a cubin by the ``ptxas`` that
  ships in the Triton wheel, exactly as on the GPU;
- the launch is replaced by a no-op that records the kernel's metadata: the shared memory
  it asks for, its warps and stages, and (read from the cubin with the bundled
  ``cuobjdump``) its registers and local-memory spills;
- ``TRITON_CACHE_DIR`` points at a fresh temporary directory, so a warm cache can neither
  hide a failure nor the cost.

A kernel fails the gate when its shared memory is over the target's per-block limit, or
when its warps need more threads than its registers leave room for (64K registers a
block). Hylas's kernels have no ``autotune``: each launch has one configuration, chosen from
the device's limits (``hylas.kernels.gpu_limits``), and that configuration is what is
compiled here.

What it cannot prove: speed (nothing runs), numerics on hardware (the outputs are
meaningless here; ``TRITON_INTERPRET=1`` tests check the numbers), and launch errors
that come from the grid or the data (a grid over the hardware's limits, an illegal
address at a size the cases do not cover).

It runs in its own process, because ``TRITON_INTERPRET=1`` (set for every other test)
changes what ``@triton.jit`` makes at import time::

    python -m tests.gpu_compile_gate --matrix ci       # the CI cases, a table on stdout
    python -m tests.gpu_compile_gate --matrix full     # every K != V and dtype
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hylas.kernels.registry import FAMILIES  # every op family (imports no Triton)

# Real GPU targets: (compute capability, shared memory per block with opt-in, bytes).
TARGETS = {
    "sm_80": (80, 166_912),  # A100
    "sm_89": (89, 101_376),  # L40S, RTX 4090 (sm_86's RTX 3090 has the same limit)
    "sm_90": (90, 232_448),  # H100
}
HEAD_SIZES = (32, 48, 64, 96, 128, 192, 256)
REGISTERS_PER_BLOCK = 65_536


def _served(family: str) -> int:
    """The largest head size the family's kernels serve (its ``SPEC.max_head_size``)."""
    from hylas.kernels.registry import family as family_module

    return family_module(family).SPEC.max_head_size


def ci_cases() -> list[tuple[str, int, int, str]]:
    """(family, K, V, dtype): the worst cases, and the recipes' head shapes in bf16."""
    cases = []
    for f in FAMILIES:
        worst = _served(f)
        shapes = [(worst, worst, "float32"), (worst, worst, "bfloat16")]
        shapes += [(96, 192, "bfloat16"), (48, 96, "bfloat16")]
        cases += [(f, k, v, d) for (k, v, d) in shapes]
    return cases


def full_cases() -> list[tuple[str, int, int, str]]:
    return [
        (f, k, v, d)
        for f in FAMILIES
        for d in ("float32", "bfloat16", "float16")
        for k in HEAD_SIZES
        for v in HEAD_SIZES
        if max(k, v) <= _served(f)
    ]


@dataclasses.dataclass
class Compiled:
    """One compiled kernel on one target."""

    target: str
    kernel: str
    config: str
    shared: int
    warps: int
    stages: int
    registers: int = -1
    stack_bytes: int = -1  # stack and local memory a thread: register spills
    compile_s: float = 0.0
    cases: list = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        limit = TARGETS[self.target][1]
        out = []
        if self.shared > limit:
            out.append(f"shared memory {self.shared:,} B > {limit:,} B")
        if self.registers > 0:
            per_warp = -(-self.registers * 32 // 256) * 256  # allocated per warp, in 256s
            max_warps = REGISTERS_PER_BLOCK // per_warp
            if self.warps > max_warps:
                out.append(
                    f"{self.warps} warps need {self.warps * per_warp:,} registers "
                    f"> {REGISTERS_PER_BLOCK:,} ({self.registers} a thread)"
                )
        return out


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, stack and local bytes a thread: where spills go) from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = {key: int(n) for key, n in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    return usage.get("REG", -1), usage.get("STACK", 0) + usage.get("LOCAL", 0)


class CompileOnlyDriver:
    """A Triton driver that compiles for ``target`` and launches nothing.

    ``accepts_cpu_tensors`` tells Hylas's backend rule (``hylas.kernels.common``) that
    Triton may take CPU tensors while this driver is active."""

    accepts_cpu_tensors = True

    def __init__(self):
        self.target_name = None
        self.records: dict[tuple, Compiled] = {}
        self.case = None
        self._last = None
        self._compile_s = 0.0
        self.utils = self  # Triton reaches device properties and binaries through .utils

    # -- what Triton's JIT and CompiledKernel ask of a driver ------------------------------
    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", TARGETS[self.target_name][0], 32)

    def get_current_device(self):
        return list(TARGETS).index(self.target_name)

    def set_current_device(self, device):
        self.target_name = list(TARGETS)[device]

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("the compile gate builds no launcher")

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # compiles (and records) the candidate config
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def get_device_properties(self, device):
        # The real limit: Hylas sizes its launches from it, and Triton refuses a kernel
        # over it with OutOfResources, as it would on the GPU.
        return {"max_shared_mem": TARGETS[list(TARGETS)[device]][1]}

    def launcher_cls(self, src, metadata):
        names = list(src.fn.arg_names)
        consts = {}
        for path, value in src.constants.items():
            name = names[path[0]] if isinstance(path, tuple) else str(path)
            if name.isupper() and name != "DOT_PREC" and value is not None:
                consts[name] = int(value) if isinstance(value, bool) else value
        first = next(iter(src.signature.values()))  # the first tensor's dtype, e.g. *bf16
        config = " ".join([first.lstrip("*")] + [f"{k}={v}" for k, v in sorted(consts.items())])
        config += f" warps={metadata.num_warps} stages={metadata.num_stages}"
        key = (self.target_name, metadata.name, config, metadata.shared)
        rec = self.records.get(key)
        if rec is None:
            rec = Compiled(
                self.target_name,
                metadata.name,
                config,
                metadata.shared,
                metadata.num_warps,
                metadata.num_stages,
                compile_s=self._compile_s,
            )
            self.records[key] = rec
        if self.case not in rec.cases:
            rec.cases.append(self.case)
        self._last = rec
        return lambda *args, **kwargs: None  # the launch: nothing runs

    def load_binary(self, name, cubin, shared, device):
        if self._last is not None and self._last.registers < 0:
            self._last.registers, self._last.stack_bytes = _resource_usage(cubin)
        return None, None, 0, 0, 1024


ALL_STATES = ("none", "both", "final")


def _run_case(family: str, K: int, V: int, dtype_name: str, states=ALL_STATES) -> None:
    """Forward and backward of ``chunk`` and ``recurrent``. ``states``: without an initial
    and a final state (``none``: a training step), with both (``both``: decoding prefill,
    LASP-2's local kernel from the entering state, whose backward also gives G) and with
    a final state from zero (``final``: LASP-2's B from the kernel); they compile to
    separate kernels of nearly equal resources."""
    import torch

    from hylas.kernels.registry import family as family_module

    mod = family_module(family)
    dtype = getattr(torch, dtype_name)
    # H = 2: Triton specialises an integer argument equal to 1, and no model has one head.
    B, T, H = 1, 64, 2
    seeds = iter(range(100))

    def inputs():  # q, k, v in dtype, the gates in fp32, as the mixers hand them over
        q, k, v, *gates = mod.SPEC.inputs(B, T, H, K, V, dtype=dtype, seed=next(seeds))
        return q, k, v, gates

    for variant in states:
        q, k, v, gates = inputs()
        h0 = torch.zeros(B, H, K, V, requires_grad=True) if variant == "both" else None
        o, ht = mod.chunk(
            q, k, v, *gates, initial_state=h0, output_final_state=variant != "none",
            backend="triton",
        )  # fmt: skip
        loss = o.float().sum() + (ht.sum() if ht is not None else 0)
        loss.backward()
    q, k, v, gates = inputs()
    with torch.no_grad():
        mod.recurrent(
            q[:, :1], k[:, :1], v[:, :1], *[g[:, :1] for g in gates],
            initial_state=torch.zeros(B, H, K, V), backend="triton",
        )  # fmt: skip


@functools.cache
def _oversized_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def oversized_probe_kernel(x, y, BM: tl.constexpr, BK: tl.constexpr):
        """[BM, BK] x [BK, BM] in bf16: both dot operands are staged in shared memory."""
        o_m, o_k = tl.arange(0, BM), tl.arange(0, BK)
        b_a = tl.load(x + o_m[:, None] * BK + o_k[None, :])
        b_b = tl.load(x + o_k[:, None] * BM + o_m[None, :])
        tl.store(y + o_m[:, None] * BM + o_m[None, :], tl.dot(b_a, b_b))

    return oversized_probe_kernel


def _run_probe() -> None:
    """A deliberately oversized kernel (bf16 operands of 128 x 512 and 512 x 128, 256 KB):
    the gate must refuse it on every target."""
    import torch

    x = torch.zeros(128 * 512, dtype=torch.bfloat16)
    _oversized_kernel()[(1,)](x, torch.zeros(128 * 128), BM=128, BK=512)


def run_gate(cases, targets=tuple(TARGETS), log=None, probe=False, states=ALL_STATES):
    """Compile ``cases`` for ``targets`` in this process; return every compiled kernel
    (a list of ``Compiled``). ``probe`` adds the oversized probe kernel, which must fail."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "the compile gate needs TRITON_INTERPRET unset (run it in its own process)"
        )
    import triton.compiler
    from triton.runtime import driver as triton_driver
    from triton.runtime.errors import OutOfResources

    drv = CompileOnlyDriver()
    compile_ = triton.compiler.compile

    def timed_compile(*args, **kwargs):
        start = time.perf_counter()
        out = compile_(*args, **kwargs)
        drv._compile_s = time.perf_counter() - start
        return out

    triton.compiler.compile = timed_compile  # JIT functions look it up at their first call
    triton_driver.set_active(drv)
    try:
        for target in targets:
            drv.set_current_device(list(TARGETS).index(target))
            for case in [*cases, "probe"] if probe else cases:
                drv.case = case
                start = time.perf_counter()
                try:
                    if case == "probe":
                        _run_probe()
                    else:
                        _run_case(*case, states=states)
                except OutOfResources:
                    # Triton refused the kernel just recorded, as the GPU would: the record
                    # names it and its shared memory; the rest of the case is skipped.
                    pass
                if log:
                    name = case if case == "probe" else "/".join(map(str, case))
                    log(f"{target} {name}: {time.perf_counter() - start:.1f} s")
    finally:
        triton_driver._active = None  # reset_active() would look for a real GPU driver
        triton.compiler.compile = compile_
    return list(drv.records.values())


def table(records: list[Compiled]) -> str:
    rows = ["| target | kernel | config | shared B | regs | stack B | compile s | status |"]
    rows.append("|" + "---|" * 8)
    for r in sorted(records, key=lambda r: (r.target, r.kernel, -r.shared)):
        status = "; ".join(r.problems()) or "ok"
        rows.append(
            f"| {r.target} | {r.kernel} | {r.config} | {r.shared:,} | {r.registers} | "
            f"{r.stack_bytes} | {r.compile_s:.1f} | {status} |"
        )
    return "\n".join(rows)


def summary(records) -> str:
    """Per target and kernel: how many configs compiled, the most shared memory one asks
    for against the limit, the most registers and stack bytes a thread."""
    worst = {}
    for r in records:
        r = r if isinstance(r, dict) else dataclasses.asdict(r)
        key = (r["target"], r["kernel"])
        w = worst.setdefault(key, {"n": 0, "shared": 0, "regs": 0, "stack": 0})
        w["n"] += 1
        w["shared"] = max(w["shared"], r["shared"])
        w["regs"] = max(w["regs"], r["registers"])
        w["stack"] = max(w["stack"], r["stack_bytes"])
    rows = ["| target | kernel | configs | most shared memory, B (limit) | regs | stack B |"]
    rows.append("|" + "---|" * 6)
    for (target, kernel), w in sorted(worst.items()):
        rows.append(
            f"| {target} | {kernel} | {w['n']} | {w['shared']:,} ({TARGETS[target][1]:,}) | "
            f"{w['regs']} | {w['stack']} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", choices=("ci", "full"), default="ci")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--json", help="also write the records to this file")
    p.add_argument("--probe", action="store_true", help="also compile the oversized probe")
    p.add_argument("--summary", action="store_true", help="one row per kernel and target")
    args = p.parse_args(argv)
    if "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hylas-gate-cache-")
    cases = ci_cases() if args.matrix == "ci" else full_cases()
    families = args.families.split(",")
    cases = [c for c in cases if c[0] in families and c[3] in args.dtypes.split(",")]
    start = time.perf_counter()
    # The CI matrix compiles the variant with initial and final states only: the others
    # differ by a load before and a store after the scan loop.
    states = ("both",) if args.matrix == "ci" else ALL_STATES
    records = run_gate(
        cases, args.targets.split(","), log=lambda m: print(m, flush=True),
        probe=args.probe, states=states,
    )  # fmt: skip
    print(summary(records) if args.summary else table(records))
    bad = [r for r in records if r.problems() and "probe" not in r.cases]
    print(
        f"{len(records)} kernels compiled for {args.targets} in "
        f"{time.perf_counter() - start:.0f} s; {len(bad)} over a limit"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps([dict(dataclasses.asdict(r), problems=r.problems()) for r in records])
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
