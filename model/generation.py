"""Autoregressive decoding with the hybrid cache: prefill once, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hylas.model.decoder import HylasLM


@torch.no_grad()
def generate(
    model: HylasLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. temperature 0 is greedy; top_k 0 keeps all tokens."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model(ids, use_cache=True)
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # drawn on the CPU from ``generator``: the same tokens whatever the model's device
            token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        yield token
        if token in stop_ids:
            return
        out = model(torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
