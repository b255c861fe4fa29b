"""Training throughput and decoding cost of Hylas hybrids next to a Llama of the same size.

    python benchmarks/model.py                                  # T = 1K, 4K, 16K; decode up to 16K
    python benchmarks/model.py --lengths 1024 --decode-lengths 512 --markdown OUT.md

Three models of the tiny recipe's width and depth (d_model 256, 4 layers, 4 heads, 4096
vocabulary, SwiGLU of the same size): the 3:1 hybrid (``LLLF``), an all-linear stack
(``LLLL``) and Hugging Face ``LlamaForCausalLM`` (SDPA attention). Training: forward +
backward tokens/s at each T (the fastest of ``--steps`` steps after a warm-up),
``--tokens`` tokens per step (batch = tokens / T), under bf16 autocast by default, and
the ratio to Llama. Decoding: after a prefill of L tokens,
the mean latency of one greedy step and the size of the cache (the linear layers' part
of it separately), for each L. Everything runs in one process, one model at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from machine import describe

from hylas.model.config import ModelConfig
from hylas.model.decoder import HylasLM
from hylas.train.loss import lm_loss


def hylas_model(pattern: str, mixer: str) -> HylasLM:
    cfg = ModelConfig(
        d_model=256,
        n_layers=4,
        n_heads=4,
        vocab_size=4096,
        linear_mixer=mixer,
        layer_pattern=pattern,
    )
    return HylasLM(cfg)


def moe_twins() -> dict:
    """The tiny 3:1 hybrid with 8 experts (top-2, each half the dense FFN) in every layer,
    and its dense twin: the same model with one FFN of the same active size."""
    from hylas.model.config import MoEConfig

    base = dict(d_model=256, n_layers=4, n_heads=4, vocab_size=4096, layer_pattern="LLLF")
    dense = ModelConfig(**base)
    half = dense.ffn_dim // 2
    moe = ModelConfig(**base, moe=MoEConfig(num_experts=8, top_k=2, d_expert=half))
    return {"moe 8x top-2": lambda: HylasLM(moe), "dense twin": lambda: HylasLM(dense)}


def masked_expert_loop(moe, x_ND):
    """The MoE layer the plain way: for each expert, gather its tokens with a mask."""
    weights, experts, _ = moe.router(x_ND)
    y = torch.zeros_like(x_ND)
    ex = moe.experts
    for e in range(moe.n_experts):
        token, slot = (experts == e).nonzero(as_tuple=True)
        if token.numel():
            xe = x_ND[token]
            h = torch.nn.functional.silu(xe @ ex.w_gate[e]) * (xe @ ex.w_up[e])
            y.index_add_(0, token, (h @ ex.w_down[e]) * weights[token, slot, None])
    return y


def moe_layer_tokens_per_s(fn, x, steps: int) -> float:
    def step():
        x.grad = None
        fn(x).sum().backward()

    step()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def llama_model(max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = ModelConfig(d_model=256, n_layers=4, n_heads=4, vocab_size=4096)
    cfg = LlamaConfig(
        hidden_size=ref.d_model,
        intermediate_size=ref.ffn_dim,
        num_hidden_layers=ref.n_layers,
        num_attention_heads=ref.n_heads,
        num_key_value_heads=ref.n_heads,
        vocab_size=ref.padded_vocab_size,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_tokens_per_s(model, T: int, tokens: int, steps: int, dtype: str) -> float:
    B = max(1, tokens // T)
    ids = torch.randint(0, 4096, (B, T))
    model.train()

    def step():
        with autocast(dtype):
            if isinstance(model, HylasLM):  # the loss is Hylas's trainer's
                loss = lm_loss(model, model(ids), ids.roll(-1, 1))
            else:  # transformers shifts the labels itself
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    best = float("inf")
    for _ in range(steps):  # the fastest step: the least disturbed by a busy machine
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return B * T / best


def _bytes(tree) -> int:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def cache_bytes(model, cache) -> tuple[int, int]:
    """(all bytes, the linear layers' bytes) of a Hylas HybridCache or a transformers cache."""
    if isinstance(model, HylasLM):
        sizes = [
            (kind, _bytes(state))
            for kind, state in zip(model.cfg.pattern, cache.states, strict=True)
        ]
        return sum(n for _, n in sizes), sum(n for kind, n in sizes if kind == "L")
    # transformers' DynamicCache keeps its tensors on its layers
    return sum(_bytes((layer.keys, layer.values)) for layer in cache.layers), 0


@torch.no_grad()
def decode_cost(model, context: int, steps: int, is_hylas: bool) -> tuple[float, int, int]:
    model.eval()
    ids = torch.randint(0, 4096, (1, context))
    if is_hylas:
        out = model(ids, use_cache=True)
        cache = out.cache
    else:
        out = model(input_ids=ids, use_cache=True)
        cache = out["cache"]
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        if is_hylas:
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
        else:
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache = out["cache"]
        token = out.logits[:, -1:].argmax(-1)
    latency = (time.perf_counter() - t0) / steps
    return (latency, *cache_bytes(model, cache))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mixer", default="gla", help="the linear mixer of the Hylas models")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per training step")
    p.add_argument(
        "--steps", type=int, default=3, help="timed steps per point (the fastest counts)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--decode-lengths", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["train", "decode", "moe"],
        choices=["train", "decode", "moe"],
    )
    args = p.parse_args()
    torch.manual_seed(0)

    machine = describe(torch.device("cpu"))
    models = {
        "hybrid 3:1": lambda: hylas_model("LLLF", args.mixer),
        "all linear": lambda: hylas_model("L", args.mixer),
        "llama": lambda: llama_model(max(args.lengths + args.decode_lengths) + 64),
    }
    lines = [
        f"Machine: {machine}; torch {torch.__version__}; linear mixer {args.mixer}; "
        f"{args.dtype}; {args.tokens} tokens per step.",
        "",
        "| model | T | train tokens/s | vs llama |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for T in args.lengths if "train" in args.sections else []:
        speed = {}
        for name, make in models.items():
            speed[name] = train_tokens_per_s(make(), T, args.tokens, args.steps, args.dtype)
        for name in models:
            row = f"| {name} | {T} | {speed[name]:,.0f} | {speed[name] / speed['llama']:.2f}x |"
            lines.append(row)
            print(row, flush=True)

    head = [
        "",
        "| model | context | decode ms/token | cache MB | linear-layer cache MB |",
        "|---|---|---|---|---|",
    ]
    lines += head
    print("\n".join(head), flush=True)
    for L in args.decode_lengths if "decode" in args.sections else []:
        for name, make in models.items():
            latency, total, linear = decode_cost(make(), L, args.decode_steps, name != "llama")
            row = (
                f"| {name} | {L} | {latency * 1e3:.2f} | {total / 2**20:.2f} | "
                f"{linear / 2**20:.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    if "moe" in args.sections:
        from hylas.model.moe import MoE

        torch.manual_seed(0)
        layer = MoE(256, 512, 8, 2)
        x = torch.randn(16384, 256, requires_grad=True)
        head = [
            "",
            "| MoE layer (16,384 tokens, d 256, 8 experts of 512, top-2), fp32 | tokens/s |",
            "|---|---|",
        ]
        rows = [
            f"| sorted by expert, one matmul per slice (Hylas) | "
            f"{moe_layer_tokens_per_s(layer, x, args.steps):,.0f} |",
            f"| masked loop over experts | "
            f"{moe_layer_tokens_per_s(lambda t: masked_expert_loop(layer, t), x, args.steps):,.0f} |",
        ]
        twins = {
            n: train_tokens_per_s(m(), 1024, args.tokens, args.steps, args.dtype)
            for n, m in moe_twins().items()
        }
        head2 = ["", f"| tiny 3:1 hybrid, T 1024, {args.dtype} | train tokens/s |", "|---|---|"]
        rows2 = [f"| {n} | {v:,.0f} |" for n, v in twins.items()]
        lines += head + rows + head2 + rows2
        print("\n".join(head + rows + head2 + rows2), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
