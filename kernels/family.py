"""What an op family declares about itself: its gates, which gate is its decay, its FLOPs,
the head sizes it serves and how to make inputs for it (docs/architecture.md, "Op families").

Every family module (``hylas.kernels.<family>``) holds a ``SPEC``; ``hylas.kernels.registry``
lists the families. The mixers, sequence parallelism, the compile gate, the benchmarks and
the tests read these instead of knowing each family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from hylas.kernels.common import CHUNK
from hylas.kernels.gpu_limits import MAX_HEAD_SIZE

# A gate's kind: a log decay per head ([B, T, H]), a log decay per key channel
# ([B, T, H, K]), or a write strength per head (beta, [B, T, H]).
GATE_KINDS = ("scalar", "channel", "beta")


@dataclasses.dataclass(frozen=True)
class Gate:
    name: str  # the keyword the family's calls name it by: g, gk, beta
    kind: str  # one of GATE_KINDS


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One op family's declaration.

    gates: the gate tensors its calls take after q, k, v, in order.
    split_output: for LASP-2, whether the output from an entering state S is the output
      from zero plus a read of S (``entering_read``), so a rank runs its whole local kernel
      while the states are gathered; otherwise the local kernel waits for S.
    delta: whether the chunk holds the delta rule's extra work (the WY solves).
    make_inputs: a family's own input maker where its layout is not q, k, v [B, T, H, *]
      with these gates (see ``standard_inputs``).
    max_head_size: the largest K and V its Triton kernels serve: mixers refuse bigger heads
      when the model is built, and the compile gate checks every kernel up to it.
    """

    name: str
    gates: tuple[Gate, ...]
    split_output: bool
    delta: bool = False
    make_inputs: Callable[..., list[torch.Tensor]] | None = None
    max_head_size: int = MAX_HEAD_SIZE

    @property
    def decay_index(self) -> int | None:
        """Which gate is the log decay (None: no decay)."""
        for i, gate in enumerate(self.gates):
            if gate.kind in ("scalar", "channel"):
                return i
        return None

    def decay(self, gates: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The log decay among a call's ``gates`` ([B, T, H] or [B, T, H, K]), or None."""
        i = self.decay_index
        return None if i is None else gates[i]

    def inputs(self, B: int, T: int, H: int, K: int, V: int, **kw) -> list[torch.Tensor]:
        """q, k, v and the gates for one call; see ``standard_inputs`` for the options."""
        make = self.make_inputs or standard_inputs
        return make(self, B, T, H, K, V, **kw)

    def flops_per_token(self, K: int, V: int, seq_len: int) -> float:
        """The chunkwise kernel's forward FLOPs per token and value head (chunk C =
        min(64, seq_len)): intra-chunk scores and their product with v over the C x C block,
        2 C (K + V); the inter-chunk read q h and the state update, 4 K V. The delta rule adds
        k k^T, the solves for u and w (2 C (K + V)), delta = u - w h (2 K V) and the
        triangular inverse (C^2)."""
        C = min(CHUNK, seq_len)
        flops = 2 * C * (K + V) + 4 * K * V
        if self.delta:
            flops += 2 * C * (K + V) + 2 * K * V + C * C
        return float(flops)


def standard_inputs(
    spec: FamilySpec,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    decay_scale: float = 1.0,
    strong: bool = False,
    beta_max: float = 1.0,
    requires_grad: bool = True,
) -> list[torch.Tensor]:
    """q, v ~ N(0, 1) and k ~ N(0, 1) (unit rows for the delta rule) in ``dtype``, then the
    gates in fp32, as the mixers hand them over: a write strength ``beta_max`` x U(0, 1)
    (2: negative eigenvalues), drawn first, then a log decay logsigmoid(2 N(0, 1)) x
    ``decay_scale`` (``strong``: -20 U(0, 1), most of the state gone in one token). Drawn on
    the CPU from ``seed``, so every device gets the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if spec.delta:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    drawn: dict[str, torch.Tensor] = {}
    for gate in sorted(spec.gates, key=lambda g: g.kind != "beta"):
        shape = (B, T, H, K) if gate.kind == "channel" else (B, T, H)
        if gate.kind == "beta":
            drawn[gate.name] = beta_max * torch.rand(shape, generator=gen)
        elif strong:
            drawn[gate.name] = -20 * torch.rand(shape, generator=gen)
        else:
            drawn[gate.name] = F.logsigmoid(2 * torch.randn(shape, generator=gen)) * decay_scale
    tensors = [x.to(dtype) for x in (q, k, v)] + [drawn[g.name] for g in spec.gates]
    return [x.to(device).requires_grad_(requires_grad) for x in tensors]
