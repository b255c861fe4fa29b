"""Sequence parallelism on gloo: what each layer communicates, what a rank holds, and how
long a sequence one step can take.

    python -m benchmarks.sp [--parts comm,memory,scale] [--png docs/sp.png]

* comm: per layer, forward + backward on one sample of T tokens over W = 2 and 4 ranks:
  a GLA and a Gated DeltaNet layer under LASP-2 (one all-gather of the segment states each
  way), the same layers under a ring (LASP-1 style, written here: W - 1 sequential
  point-to-point steps each way) and a softmax layer under LASP-2H (K and V all-gathered);
  bytes each rank sends (from the communication tracer) and milliseconds per step.
* memory: a pure-linear tiny model (4 GLA layers, d_model 256, activation checkpointing,
  chunked LM head) on one sample of fixed T at sp = 1, 2, 4: each rank's peak resident
  memory of a training step minus its resident memory after set-up.
* scale: ``hylas.train`` (torchrun, the same pure-linear model, evaluation off) takes one
  training step on one sequence of 2^19 tokens at sp = 4; sp = 1 is measured at 2^15 ...
  2^18 and extrapolated (a straight line through the last two), not probed for its limit.
  Every process's data is capped (``resource.setrlimit``, RLIMIT_DATA: 20 GiB at sp = 1,
  5.5 GiB per rank at sp = 4) so that a run out of memory fails alone.

All ranks share this machine's cores: compare the rows with each other. Prints markdown
tables for docs/benchmarks.md and saves a PNG of bytes and memory against T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
COMM_T = (4096, 16384)
MEMORY_T = 1 << 15
SCALE_SP1 = (15, 16, 17, 18)  # log2 T measured at sp = 1
SCALE_T = 1 << 19
SCALE_SP = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; each rank's return value."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_main,
            args=(world, free_port(), out, fn, args),
            nprocs=world,
            start_method="spawn",
        )
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def _rank_main(rank, world, port, out, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = fn(rank, world, *args)
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def model_config(mixer: str = "gla", **kw):
    from hylas.model.config import ModelConfig

    base = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, linear_mixer=mixer)
    return ModelConfig(**{**base, **kw}).validate()


def train_loss(model, inputs: dict) -> torch.Tensor:
    """The summed next-token loss of one sample's segment, the LM head in chunks."""
    from hylas.train.loss import cross_entropy_sum

    out = model(**inputs, logits=False)
    return cross_entropy_sum(model, out, inputs["input_ids"].roll(-1, 1))


def one_sample_segment(T: int, rank: int, world: int, device="cpu"):
    """One sample of T tokens, one document: this rank's (Packing, Segment)."""
    from hylas.model.decoder import Packing
    from hylas.parallel.sp import Segment

    L = T // world
    segment = Segment(dist.group.WORLD, torch.tensor([0, T]), rank * L, 1, L, device)
    return Packing.from_cu_seqlens(torch.tensor([0, L]), 1, L), segment


# -- comm: one layer under LASP-2, a ring and LASP-2H ------------------------------------


class _Ring(torch.autograd.Function):
    """LASP-1's ring for a linear layer: rank r waits for S_in from r - 1, passes
    S_out = A S_in + B to r + 1, and the backward passes dS_in = A^T dS_out + G the other
    way: W - 1 sequential point-to-point steps each way, one state each."""

    @staticmethod
    def forward(ctx, layer, q, k, v, *gates):
        from hylas.parallel.sp import times_state

        seg = layer.segment
        A, B = layer.protocol(layer.family.transition, q, k, v, gates)
        S_in = torch.zeros_like(B)
        if seg.rank > 0:
            dist.recv(S_in, seg.peer(-1), seg.group)
        if seg.rank < seg.size - 1:
            dist.send((times_state(A, S_in) + B).contiguous(), seg.peer(1), seg.group)
        o = layer.chunk(q, k, v, gates, entering=S_in)[0]
        ctx.layer, ctx.A = layer, A
        ctx.save_for_backward(q, k, v, *gates, S_in)
        return o

    @staticmethod
    def backward(ctx, do):
        from hylas.parallel.sp import times_state

        layer = ctx.layer
        seg = layer.segment
        q, k, v, *gates, S_in = ctx.saved_tensors
        G = layer.protocol(layer.family.entering_state_grad, q, k, v, gates, do)
        dS_out = torch.zeros_like(S_in)
        if seg.rank < seg.size - 1:
            dist.recv(dS_out, seg.peer(1), seg.group)
        if seg.rank > 0:
            dist.send((times_state(ctx.A, dS_out, transpose=True) + G).contiguous(), seg.peer(-1))
        needs = ctx.needs_input_grad[1:]
        local = layer.recompute([q, k, v, *gates], needs, S_in)
        return None, *layer.local_grads(local, needs, do, dS_out)


def ring(layer):
    """``layer`` (sequence-parallel already) with LASP-1's ring in place of LASP-2."""
    from hylas.parallel import sp

    class Ring(sp.SequenceParallelLinear):
        def exchange(self, layer, q, k, v, gates):
            return _Ring.apply(layer, q, k, v, *gates)

    sp.swap(layer, Ring)  # Ring[SequenceParallelLinear[GLA]]: Ring's exchange comes first
    return layer


def comm_rank(rank: int, world: int, repeats: int) -> list[dict]:
    from hylas.model.attention import SoftmaxAttention
    from hylas.model.registry import LINEAR_MIXERS, check_linear_mixer
    from hylas.parallel import sp
    from hylas.parallel.trace import trace_collectives

    check_linear_mixer("gla")
    torch.manual_seed(0)
    rows = []
    layers = {}
    for mixer in ("gla", "gated_deltanet"):
        cfg = model_config(mixer)
        layer = LINEAR_MIXERS[mixer](cfg, "torch")
        layer.init_weights(torch.Generator().manual_seed(0), 0.02, 0.01)
        layers[f"{mixer}, LASP-2"] = sp.apply(layer)
        twin = sp.apply(LINEAR_MIXERS[mixer](cfg, "torch"))  # the convs' halos as LASP-2's
        twin.load_state_dict(layer.state_dict())
        layers[f"{mixer}, ring"] = ring(twin)
    attention = SoftmaxAttention(model_config(n_kv_heads=1), "torch")
    attention.init_weights(torch.Generator().manual_seed(0), 0.02, 0.01)
    layers["softmax (GQA 4:1), LASP-2H"] = sp.apply(attention)
    for T in COMM_T:
        L = T // world
        x = torch.randn(1, L, 256, generator=torch.Generator().manual_seed(rank))
        x.requires_grad_(True)
        pos = torch.arange(rank * L, (rank + 1) * L).unsqueeze(0)
        for name, layer in layers.items():
            times = []
            for i in range(repeats + 1):
                seq, segment = one_sample_segment(T, rank, world)
                dist.barrier()
                t0 = time.perf_counter()
                with trace_collectives() as tracer:
                    out, _ = layer(x, pos, None, False, seq, segment=segment)
                    out.float().pow(2).mean().backward()
                dist.barrier()
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "layer": name,
                    "T": T,
                    "bytes": tracer.total_bytes(),
                    "ms": 1e3 * sorted(times)[len(times) // 2],
                }
            )
    return rows


# -- memory: a training step's resident memory per rank -----------------------------------


def resident_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_rank(rank: int, world: int, T: int) -> dict:
    import ctypes

    from hylas.model.decoder import HylasLM
    from hylas.parallel import sp
    from hylas.train.ac import apply_activation_checkpointing

    # Every allocation of 128 KiB or more is mapped and unmapped on its own (glibc's
    # threshold would otherwise grow and keep freed tensors in the heap), so the resident
    # peak follows the tensors alive, not what the allocator kept.
    m_mmap_threshold = -3
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)

    model = HylasLM(model_config(linear_to_full="1:0"), "torch", seed=0).train()
    apply_activation_checkpointing(model)
    if world > 1:
        sp.apply(model)

    def inputs(T: int) -> dict:
        L = T // world
        ids = torch.randint(0, 4096, (1, T), generator=torch.Generator().manual_seed(0))
        ids = ids[:, rank * L : (rank + 1) * L]
        seq, segment = one_sample_segment(T, rank, world)
        inputs = dict(
            input_ids=ids,
            cu_seqlens=seq.docs.cu_seqlens,
            position_ids=torch.arange(rank * L, (rank + 1) * L).unsqueeze(0),
        )
        return {**inputs, "segment": segment} if world > 1 else inputs

    # set-up ends with a short step: what the first step allocates once is not per token
    train_loss(model, inputs(256 * world)).backward()
    model.zero_grad()
    batch = inputs(T)
    base = resident_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    t0 = time.perf_counter()
    train_loss(model, batch).backward()
    return {
        "sp": world,
        "T": T,
        "step_s": time.perf_counter() - t0,
        "peak_minus_setup_gib": (resident_bytes("VmHWM") - base) / GIB,
    }


# -- scale: hylas.train on one long sequence ----------------------------------------------


def train_step(T: int, sp_size: int, cap_gib: float, out: Path) -> dict:
    """One training step through torchrun and hylas.train; its metrics and wall time."""
    overrides = [
        "model.linear_to_full=1:0",
        "model.activation_checkpointing=true",
        f"train.seq_len={T}",
        "train.batch_size=1",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.eval_batches=0",
        "train.log_every=1",
        "train.dtype=float32",
        "train.threads=1",
        f"parallel.sp={sp_size}",
        f"train.out_dir={out}",
        "parallel.timeout_s=3600",
    ]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc-per-node={sp_size}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "hylas.train",
        "--set",
        *overrides,
    ]
    cap = int(cap_gib * GIB)

    def limit():  # each process (torchrun and its workers) may hold at most cap of data
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=limit)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"T": T, "sp": sp_size, "error": proc.stderr.strip().splitlines()[-1:]}
    record = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {
        "T": T,
        "sp": sp_size,
        "wall_s": wall,
        "tokens_per_s": record["tokens_per_s"],
        "peak_gb": record["peak_memory_gb"],
        "loss": record["loss"],
    }


# -- the report ----------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{os.cpu_count()} cores of {cpu}, {mem:.0f} GiB, torch {torch.__version__}, gloo"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="comm,memory,scale")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--png", default="docs/sp.png")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    print(f"machine: {machine()}\n")
    plot = {}

    if "comm" in parts:
        print("## Per layer: forward + backward on one sample, each rank's bytes sent\n")
        print("| W | layer | T | bytes per rank | ms per step |")
        print("|---|---|---|---|---|")
        for world in (2, 4):
            rows = spawn(comm_rank, world, args.repeats)[0]
            for r in rows:  # rank 0's view; rank W-1 sends as much under LASP-2
                print(f"| {world} | {r['layer']} | {r['T']} | {r['bytes']:,} | {r['ms']:.0f} |")
                plot.setdefault("comm", []).append({**r, "W": world})
        print()

    if "memory" in parts:
        print(f"## Memory of a training step at T = {MEMORY_T} (pure-linear tiny model)\n")
        print("| sp | peak - set-up per rank (GiB) | x of sp=1 | step s |")
        print("|---|---|---|---|")
        first = None
        for world in (1, 2, 4):
            ranks = spawn(memory_rank, world, MEMORY_T)
            worst = max(r["peak_minus_setup_gib"] for r in ranks)
            first = first or worst
            step = max(r["step_s"] for r in ranks)
            print(f"| {world} | {worst:.3f} | {worst / first:.2f} | {step:.1f} |")
            plot.setdefault("memory", []).append({"sp": world, "gib": worst})
        print()

    if "scale" in parts:
        print("## One training step on one long sequence (hylas.train, pure-linear tiny)\n")
        print("| sp | T | peak per rank (GB) | wall s (with start-up) | tokens/s |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            sp1 = []
            for e in SCALE_SP1:
                r = train_step(1 << e, 1, 20, Path(tmp, f"sp1-{e}"))
                sp1.append(r)
                _scale_row(r)
            big = train_step(SCALE_T, SCALE_SP, 5.5, Path(tmp, "sp4"))
            _scale_row(big)
        done = [r for r in sp1 if "peak_gb" in r]
        if len(done) >= 2:
            (t0, m0), (t1, m1) = [(r["T"], r["peak_gb"][0]) for r in done[-2:]]
            slope = (m1 - m0) / (t1 - t0)
            print(
                f"\nsp=1 extrapolated to T = {SCALE_T}: about {m1 + slope * (SCALE_T - t1):.1f} GB "
                f"in one process ({slope * 1e6:.2f} GB per million tokens)"
            )
        plot["scale"] = {"sp1": done, "big": big}

    if args.png:
        save_plot(plot, Path(args.png))
    return 0


def _scale_row(r: dict) -> None:
    if "error" in r:
        print(f"| {r['sp']} | {r['T']} | failed: {r['error']} | | |")
        return
    peaks = ", ".join(f"{g:.2f}" for g in r["peak_gb"])
    print(f"| {r['sp']} | {r['T']} | {peaks} | {r['wall_s']:.0f} | {r['tokens_per_s']:.0f} |")


def save_plot(plot: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n(no PNG: install matplotlib, a Hylas dependency, to get {path})")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for (layer, W), pts in _series(plot.get("comm", [])).items():
        ax.plot([t for t, _ in pts], [b / 1e6 for _, b in pts], "o-", label=f"{layer}, W={W}")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="T (tokens)", ylabel="MB sent per rank per step")
    ax.set_title("Communication per layer")
    ax.legend(fontsize=6)
    ax = axes[1]
    scale = plot.get("scale", {})
    sp1 = scale.get("sp1", [])
    if sp1:
        ax.plot([r["T"] for r in sp1], [r["peak_gb"][0] for r in sp1], "o-", label="sp=1")
    if len(sp1) >= 2:  # the straight line through the last two, out to the long sequence
        (t0, m0), (t1, m1) = [(r["T"], r["peak_gb"][0]) for r in sp1[-2:]]
        m = m1 + (m1 - m0) / (t1 - t0) * (SCALE_T - t1)
        ax.plot([t1, SCALE_T], [m1, m], "--", color="C0", label="sp=1, extrapolated")
    big = scale.get("big", {})
    if "peak_gb" in big:
        ax.plot([big["T"]], [max(big["peak_gb"])], "s", label=f"sp={big['sp']}, per rank")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="T (tokens)", ylabel="peak resident GB per rank")
    ax.set_title("One training step, pure-linear tiny model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nsaved {path}")


def _series(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["layer"], r["W"]), []).append((r["T"], r["bytes"]))
    return out


if __name__ == "__main__":
    sys.exit(main())
