"""``hylas sweep``: the linear-to-full ratio study as one command.

One proxy run per (mixer, ratio), all at the recipe's depth, on the user's data, with the
same measures (docs/architecture.md, "Ratio sweeps"):

    eval_loss        the held-out LM loss at the end of the run (the normal trainer)
    recall           multi-query associative recall (MQAR): the same architecture trained
                     from scratch on the synthetic task, accuracy at the query positions,
                     the mean over seeds (and their spread), and its final training loss
                     (recall_loss), which orders architectures before accuracy moves
    tokens_per_s     training throughput at the run's sequence length (metrics.jsonl)
    cache_mb         decoding memory per sequence at ``context`` tokens: the linear layers'
                     states and conv tails as measured, the softmax layers' KV computed
                     (bf16, as served)
    decode_ms        one decoding step with a cache holding ``context`` tokens, measured
    parameters, flops_per_token

Each run is a normal run directory inside ``out``; its measures go to ``result.json``
when complete, so a rerun skips finished runs and resumes unfinished ones. The all-softmax
ratio (0:1) does not depend on the linear mixer and runs once.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from hylas.configs.base import ConfigError
from hylas.model.config import ModelConfig, expand_ratio, ratio_pattern
from hylas.train.checkpoint import atomic_write_text
from hylas.train.config import load_config

log = logging.getLogger("hylas")

RESULT = "result.json"
MEASURE_TIMEOUT = timedelta(hours=12)


@dataclass
class SweepOptions:
    recipe: str
    ratios: list[str]
    mixers: list[str]
    out: Path
    placement: str = "end"
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    context: int = 32768
    recall_seeds: tuple[int, ...] = (0, 1)
    recall_steps: int | None = None  # None: the pinned budget of ``hylas.train.experiments.recall``
    recall_pairs: int | None = None  # None: MQARConfig's
    recall_seq_len: int | None = None  # None: MQARConfig's
    recall_vocab: int | None = None  # None: MQARConfig's
    recall_width: int | None = None  # None: the probe's own (hylas.train.experiments.recall.WIDTH)
    recall_tolerance: float = 0.05
    loss_tolerance: float = 0.02


def softmax_share(ratio: str) -> float:
    unit = expand_ratio(ratio)
    return unit.count("F") / len(unit)


def check_ratios(ratios: list[str], n_layers: int) -> None:
    """Refuse, in one sentence, ratios whose smallest group does not divide the depth."""
    bad = []
    for r in ratios:
        unit = expand_ratio(r)  # refuses a malformed ratio by itself
        if n_layers % len(unit):
            bad.append(r)
    if bad:
        fits = [r for r in ratios if r not in bad]
        rule = [f"{a}:{b}" for a, b in _fitting(n_layers)]
        raise ConfigError(
            f"the ratio{'s' if len(bad) > 1 else ''} {', '.join(bad)} do{'' if len(bad) > 1 else 'es'} "
            f"not fit {n_layers} layers (a + b in lowest terms must divide it); "
            f"of those asked, {', '.join(fits) or 'none'} fit{'s' if len(fits) == 1 else ''}; "
            f"ratios that fit: {', '.join(rule)}"
        )


def _fitting(n: int) -> list[tuple[int, int]]:
    """Every linear:full ratio in lowest terms whose group divides n, most linear first."""
    out = {(1, 0), (0, 1)}
    for group in range(2, n + 1):
        if n % group == 0:
            out |= {(a, group - a) for a in range(1, group) if math.gcd(a, group - a) == 1}
    return sorted(out, key=lambda ab: (-ab[0] / (ab[0] + ab[1]), ab[0] + ab[1]))


def recall_task(opts: SweepOptions):
    """The MQAR task of every run: MQARConfig's pinned defaults and the options' changes,
    refused before anything runs when they do not fit together."""
    from hylas.train.experiments.mqar import MQARConfig

    task = MQARConfig()
    for name in ("pairs", "seq_len", "vocab"):
        value = getattr(opts, f"recall_{name}")
        if value is not None:
            setattr(task, "vocab_size" if name == "vocab" else name, value)
    try:
        return task.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (--recall-pairs, --recall-seq-len, --recall-vocab)") from None


def base_config(opts: SweepOptions):
    """The recipe with the sweep's overrides: the depth and settings every run shares (its
    own layer pattern need not fit that depth; each run sets one)."""
    return load_config(opts.recipe, [*opts.overrides, "model.layer_pattern=F"])


def plan(opts: SweepOptions) -> list[dict]:
    """The runs: name, mixer, ratio, layer pattern and the config overrides of each."""
    n = base_config(opts).model.n_layers
    check_ratios(opts.ratios, n)
    recall_task(opts)
    runs, seen = [], set()
    for mixer in opts.mixers:
        for ratio in opts.ratios:
            pattern = ratio_pattern(ratio, n, opts.placement)
            key = pattern if "L" not in pattern else (mixer, pattern)
            if key in seen:
                continue
            seen.add(key)
            name = "softmax-only" if "L" not in pattern else f"{mixer}-{ratio.replace(':', 'to')}"
            if "L" in pattern and opts.placement != "end":
                name += f"-{opts.placement}"
            runs.append(
                {
                    "name": name,
                    "mixer": mixer if "L" in pattern else "none",
                    "ratio": ratio,
                    "placement": opts.placement,
                    "pattern": pattern,
                    "softmax_share": pattern.count("F") / n,
                }
            )
    return runs


def run_overrides(opts: SweepOptions, run: dict) -> list[str]:
    extra = [f"model.layer_pattern={run['pattern']}", f"train.out_dir={opts.out / run['name']}"]
    if run["mixer"] != "none":
        extra.append(f"model.linear_mixer={run['mixer']}")
    if opts.steps:
        extra.append(f"train.steps={opts.steps}")
    return [*opts.overrides, *extra]


def sweep(opts: SweepOptions) -> list[dict]:
    """Run (or resume) every run of the sweep; return one row per run (on rank 0; the
    other ranks of a torchrun job return an empty list).

    Under torchrun one process group serves every run: each run is data-parallel through
    the engine, and so is each recall probe of its measures.
    Rank 0 decides what is complete (from its view of ``out``) and writes every output.
    """
    import torch.distributed as dist

    from hylas.parallel.mesh import device_for, init_groups, layout_from_env, shutdown
    from hylas.train.trainer import train

    runs = plan(opts)
    base = base_config(opts)
    layout = layout_from_env(base.parallel.sp)
    device = device_for(layout)
    rank0 = layout.rank == 0
    if rank0:
        opts.out.mkdir(parents=True, exist_ok=True)
    group = None
    if layout.world > 1:
        init_groups(layout, device, base.parallel.timeout_s)
        # Measuring a run takes minutes on some ranks and none on others: the exchange of
        # its results waits on a group of its own, without the training collectives' timeout.
        group = dist.new_group(backend="gloo", timeout=MEASURE_TIMEOUT)
    spent: list[float] = []
    rows = []
    try:
        for i, run in enumerate(runs):
            run_dir = opts.out / run["name"]
            result_file = run_dir / RESULT
            complete, resume = _agree(
                group, result_file.is_file(), "auto" if (run_dir / "checkpoints").is_dir() else None
            )
            if complete:
                if rank0:
                    rows.append(json.loads(result_file.read_text()))
                log.info("run %d/%d %s: complete, skipped", i + 1, len(runs), run["name"])
                continue
            left = len(runs) - i
            eta = f", about {statistics.mean(spent) * left / 60:.0f} min left" if spent else ""
            log.info(
                "run %d/%d %s (layers %s)%s; %d to go",
                i + 1,
                len(runs),
                run["name"],
                run["pattern"],
                eta,
                left - 1,
            )
            t0 = time.perf_counter()
            cfg = load_config(opts.recipe, run_overrides(opts, run))
            result = train(cfg, resume=resume)
            if result.stopped_by:
                log.info("sweep stopped by %s; run it again to resume", result.stopped_by)
                return rows
            row = measure(cfg, result, opts, layout.rank, device)
            if rank0:
                row = {**run, **row, "seconds": round(time.perf_counter() - t0, 1)}
                atomic_write_text(result_file, json.dumps(row, indent=2) + "\n")
                rows.append(row)
            spent.append(time.perf_counter() - t0)
        if rank0:
            write_outputs(opts, rows)
    finally:
        if group is not None:
            shutdown()
    return rows


def _agree(group, *values):
    """Rank 0's ``values`` on every rank (each rank's own in a single process)."""
    if group is None:
        return values
    from hylas.parallel import comm

    return comm.broadcast_object(values, src=0, group=group)


def measure(cfg, result, opts: SweepOptions, rank=0, device="cpu") -> dict:
    """The measures of one finished run (see the module docstring), complete on rank 0.

    Every rank trains each recall seed's probe, one after another, as a data-parallel run
    of the trainer (its config and metrics in ``recall/seed<s>`` of the run directory);
    rank 0 also times decoding and reads the throughput the run logged."""

    from hylas.model.decoder import HylasLM
    from hylas.train.experiments.recall import mqar_recall

    task = recall_task(opts)
    budget = {"steps": opts.recall_steps} if opts.recall_steps else {}
    if opts.recall_width is not None:
        budget["width"] = opts.recall_width
    probes = [
        mqar_recall(
            cfg.model, task, seed=s, out_dir=result.run_dir / "recall" / f"seed{s}", **budget
        )
        for s in opts.recall_seeds
    ]
    row = {}
    if rank == 0:
        with torch.device("meta"):  # sizes only: no memory, whatever the recipe
            model = HylasLM(cfg.model, kernel_backend=cfg.kernels.backend)
        records = [
            json.loads(line)
            for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        speeds = speeds[1:] or speeds  # the first log interval includes warm-up
        cache_mb, decode_ms = decode_cost(cfg.model, opts.context, device=device)
        row = {
            "eval_loss": result.last_eval_loss,
            "tokens_per_s": statistics.mean(speeds) if speeds else None,
            "cache_mb": cache_mb,
            "decode_ms": decode_ms,
            "context": opts.context,
            "parameters": model.num_parameters(),
            "flops_per_token": model.flops_per_token(cfg.train.seq_len),
        }
    recalls = [p["recall"] for p in probes]
    row.update(
        recall=statistics.mean(recalls),
        recall_seeds=recalls,
        recall_spread=max(recalls) - min(recalls),
        recall_loss=statistics.mean(p["loss"] for p in probes),
    )
    return row


@torch.no_grad()
def decode_cost(
    cfg: ModelConfig, context: int, steps: int = 8, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(cache MB per sequence, ms per decoded token) with ``context`` tokens behind.

    The linear layers' cache is what a prefill leaves (constant in context) and is
    measured; each softmax layer holds keys and values of ``context`` tokens, counted at
    2 bytes (bf16) for the memory and filled with random values for the timing, which runs
    ``steps`` decoding steps from that cache on ``device``."""
    from hylas.model.decoder import HybridCache, HylasLM

    device = torch.device(device)
    model = HylasLM(cfg, kernel_backend="auto", seed=0).to(device).eval()
    out = model(torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=True)
    heads, head_dim = cfg.kv_heads, cfg.d_model // cfg.n_heads
    states, linear_bytes = [], 0
    for kind, state in zip(cfg.pattern, out.cache.states, strict=True):
        if kind == "F":
            kv = torch.randn(1, heads, context, head_dim, device=device)
            states.append((kv, kv.clone()))
        else:
            linear_bytes += sum(t.numel() * t.element_size() for t in _tensors(state))
            states.append(state)
    kv_bytes = cfg.pattern.count("F") * 2 * heads * head_dim * context * 2
    cache = HybridCache(states, context)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    model(token, cache=cache, use_cache=True)  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(token, cache=cache, use_cache=True)  # the cache stays at ``context``
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    return (linear_bytes + kv_bytes) / 2**20, ms


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


# -- outputs ----------------------------------------------------------------------------------


def recommend(rows: list[dict], recall_tolerance: float, loss_tolerance: float) -> dict:
    """The most linear run whose recall is within ``recall_tolerance`` (absolute) of the
    best and whose loss is within ``loss_tolerance`` (relative) of the best, with the
    numbers that decided it."""
    done = [r for r in rows if r.get("eval_loss") is not None]
    best_recall = max(r["recall"] for r in done)
    best_loss = min(r["eval_loss"] for r in done)
    ok = [
        r
        for r in done
        if r["recall"] >= best_recall - recall_tolerance
        and r["eval_loss"] <= best_loss * (1 + loss_tolerance)
    ]
    pick = min(ok, key=lambda r: (r["softmax_share"], r["eval_loss"]))
    return {
        "run": pick["name"],
        "mixer": pick["mixer"],
        "ratio": pick["ratio"],
        "pattern": pick["pattern"],
        "recall": pick["recall"],
        "eval_loss": pick["eval_loss"],
        "best_recall": best_recall,
        "best_loss": best_loss,
        "recall_tolerance": recall_tolerance,
        "loss_tolerance": loss_tolerance,
        "text": (
            f"recommended: {pick['mixer']} at {pick['ratio']} ({pick['pattern']}): the most "
            f"linear run with recall {pick['recall']:.3f} within {recall_tolerance} of the best "
            f"{best_recall:.3f} and held-out loss {pick['eval_loss']:.4f} within "
            f"{loss_tolerance:.0%} of the best {best_loss:.4f}"
        ),
    }


def write_outputs(opts: SweepOptions, rows: list[dict]) -> dict:
    """sweep.jsonl, sweep.md (the table and the recommendation) and sweep.png."""
    rows = sorted(rows, key=lambda r: (r["mixer"], r["softmax_share"]))
    atomic_write_text(opts.out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rec = recommend(rows, opts.recall_tolerance, opts.loss_tolerance)
    lines = [
        f"# Ratio sweep: {opts.recipe}, {len(rows)} runs",
        "",
        f"Placement `{opts.placement}`; decoding measured at {opts.context:,} tokens of context.",
        "",
        "| run | layers | softmax share | held-out loss | recall (seeds) | MQAR loss | "
        "tokens/s | cache MB/seq | decode ms/token | parameters | MFLOP/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{x:.3f}" for x in r["recall_seeds"])
        lines.append(
            f"| {r['name']} | `{r['pattern']}` | {r['softmax_share']:.3f} | "
            f"{r['eval_loss']:.4f} | {r['recall']:.3f} ({seeds}) | {r['recall_loss']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{r['cache_mb']:.3g} | {r['decode_ms']:.2f} | {r['parameters']:,} | "
            f"{r['flops_per_token'] / 1e6:.1f} |"
        )
    lines += ["", rec["text"], ""]
    atomic_write_text(opts.out / "sweep.md", "\n".join(lines))
    atomic_write_text(opts.out / "recommendation.json", json.dumps(rec, indent=2) + "\n")
    plot(rows, opts.out / "sweep.png")
    print("\n".join(lines))
    return rec


def plot(rows: list[dict], path: Path) -> None:
    """Loss, recall and throughput against the softmax share, one line per mixer (the
    all-softmax run ends every line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = [r for r in rows if r["mixer"] == "none"]
    mixers = sorted({r["mixer"] for r in rows} - {"none"}) or ["none"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mixer in mixers:
        mine = sorted(
            [r for r in rows if r["mixer"] == mixer] + shared, key=lambda r: r["softmax_share"]
        )
        x = [r["softmax_share"] for r in mine]
        for ax, key in zip(axes, ("eval_loss", "recall", "tokens_per_s"), strict=True):
            ax.plot(x, [r[key] for r in mine], marker="o", label=mixer)
    for ax, title in zip(axes, ("held-out loss", "MQAR recall", "training tokens/s"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("softmax share of layers")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
