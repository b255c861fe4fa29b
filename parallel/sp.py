"""Sequence parallelism: one sample's sequence cut into contiguous segments over the ranks
of an sp group, applied to a single-device model from outside (docs/architecture.md,
"Sequence parallelism").

The trainer builds one ``Segment`` per forward (where this rank's L = T / sp columns sit in
the samples, and where the samples' documents start). ``apply(model)`` swaps the class of
every layer that exchanges across the sequence for a sequence-parallel subclass, which
overrides the seam the layer declares, and lets the model's forward take ``segment=``: a
forward pre-hook takes it off the arguments and hands it to those layers, for this forward
and its backward (an activation-checkpointing recompute included). The model itself knows
nothing of segments. The seams:

* ``LinearMixer.kernel``: LASP-2 (``_Lasp2``), written once against the op families'
  protocol (``transition``, ``entering_state_grad``): ONE all-gather of each rank's
  (A, B) forward and ONE of its G backward, per linear layer, whatever T;
* ``SoftmaxAttention.core``: LASP-2H, the local queries against K and V all-gathered over
  the group (dK and dV reduce-scattered back), or with a sliding window that fits in one
  segment, against a halo of the window's reach from the previous rank;
* ``ShortConv.forward``: the previous rank's last W - 1 inputs as a point-to-point halo.

A forward without ``segment=`` is the single-device one. A new mixer on an existing family
gets all of this for free, and a new family through its module: ``transition`` and
``entering_state_grad``, ``local_transition`` (A from the local kernel), ``entering_read``
(the split-output form) and ``SPEC.split_output``. Nothing here knows which gate is a decay.

Legend: B samples, L tokens of this segment, T = L * sp, H heads, K / V head sizes, R the
sp group's size, r this rank in it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hylas.kernels.common import default_scale, resolve_backend
from hylas.model.attention import SoftmaxAttention, attend
from hylas.model.conv import ShortConv
from hylas.model.linear_mixers import LinearMixer
from hylas.parallel import comm


class Segment:
    """This rank's columns [start, start + L) of B samples of T tokens, for one forward.

    ``global_cu_seqlens`` (int32 [N + 1] over the flattened B * T tokens, every document
    and sample start) says where documents start in the whole samples. From it:
    ``continues`` [B] (the segment's first token continues the previous rank's document),
    ``restarts`` [B] (a document starts after the segment's first token), ``doc_pos``
    [B, L] (each token's offset in its document) and ``doc_id`` [B, T] (per-sample document
    ids, for attention). ``saved`` keeps what a layer gathered in its forward, so that an
    activation-checkpointing recompute does not gather it again: one segment per forward.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        global_cu_seqlens: torch.Tensor,
        start: int,
        batch: int,
        length: int,
        device: torch.device | str = "cpu",
    ):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.start, self.length, self.total = int(start), length, length * self.size
        if self.start != self.rank * length:
            raise ValueError(
                f"sp rank {self.rank} holds columns from {self.start}, expected "
                f"{self.rank * length} (segments of {length} tokens in rank order)"
            )
        B, T = batch, self.total
        cu = global_cu_seqlens.to("cpu", torch.long)
        if cu[0] != 0 or cu[-1] != B * T:
            raise ValueError(f"global cu_seqlens must run from 0 to B * T = {B * T}")
        starts = torch.zeros(B * T, dtype=torch.bool)
        starts[cu[:-1]] = True
        starts = starts.view(B, T)
        if not starts[:, 0].all():
            raise ValueError("global cu_seqlens must include every sample start")
        cols = torch.arange(T)
        last = torch.where(starts, cols, torch.zeros_like(cols)).cummax(1).values
        mine = slice(self.start, self.start + length)
        self.continues = ~starts[:, self.start].to(device)
        self.restarts = starts[:, mine][:, 1:].any(1).to(device)
        self.local_starts = starts[:, mine]
        self.doc_pos = (cols - last)[:, mine].to(device)
        self.doc_id = (starts.cumsum(1) - 1).to(device)
        self.saved: dict = {}

    def peer(self, offset: int) -> int:
        """The global rank of the group member ``offset`` places after this one."""
        return dist.get_global_rank(self.group, self.rank + offset)


class SegmentSlot:
    """The segment of the forward in flight, shared by the sequence-parallel layers of one
    model. It stays set until the next forward, so that an activation-checkpointing
    recompute in the backward (which may run on another thread) reads the same one."""

    def __init__(self):
        self.segment: Segment | None = None


def apply(model: nn.Module, states_from_kernel: bool | None = None) -> nn.Module:
    """Make ``model`` sequence-parallel, in place: its linear mixers, softmax attentions and
    short convolutions take the sequence-parallel path in a forward given ``segment=``
    (this rank's ``Segment``; the batch must then be packed, with its local ``cu_seqlens``).
    Parameter names and values are unchanged.

    states_from_kernel: where LASP-2 takes each segment's (A, B) and G (see ``_Lasp2``):
    the local kernel (its final states from a zero start, its initial-state gradient) or
    the families' protocol passes; None: the kernel where it is Triton (CUDA), else the
    protocol."""
    if any(isinstance(m, _SequenceParallel) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already sequence-parallel")
    slot = SegmentSlot()
    for module in model.modules():
        for base, layer in (
            (LinearMixer, SequenceParallelLinear),
            (SoftmaxAttention, SequenceParallelAttention),
            (ShortConv, SequenceParallelConv),
        ):
            if isinstance(module, base):
                swap(module, layer)
                assert isinstance(module, _SequenceParallel)
                module.sp_slot = slot
                module.states_from_kernel = states_from_kernel
                break

    def take_segment(module, args, kwargs):
        slot.segment = kwargs.pop("segment", None)
        return args, kwargs

    model.register_forward_pre_hook(take_segment, with_kwargs=True)
    return model


def swap(module: nn.Module, layer: type) -> None:
    """Give ``module`` the class ``layer`` + its own class (``layer`` first in the MRO, so its
    seam overrides the layer's and reaches the original through ``super()``): ``layer``
    itself where the module's class is its base, else a subclass of both (``GLA`` becomes
    ``SequenceParallelLinear[GLA]``)."""
    cls = type(module)
    if issubclass(layer, cls):
        module.__class__ = layer
        return
    key = (layer, cls)
    if key not in _COMBINED:  # one class per pair, so that every GLA layer shares one
        _COMBINED[key] = type(f"{layer.__name__}[{cls.__name__}]", (layer, cls), {})
    module.__class__ = _COMBINED[key]


_COMBINED: dict[tuple[type, type], type] = {}


class _SequenceParallel:
    """What the sequence-parallel layers share: the slot ``apply`` gives them."""

    sp_slot: SegmentSlot
    states_from_kernel: bool | None

    def segment(self, seq) -> Segment | None:
        """This forward's segment, or None for a single-device forward."""
        segment = self.sp_slot.segment
        if segment is not None and (seq is None or seq.docs is None):
            raise ValueError("a sequence-parallel segment needs its cu_seqlens")
        return segment


# -- LASP-2 for the linear mixers ----------------------------------------------------------


class SequenceParallelLinear(_SequenceParallel, LinearMixer):
    """A linear mixer whose ``kernel`` exchanges the segments' states by LASP-2."""

    def kernel(self, q, k, v, gates, state, use_cache, seq):
        segment = self.segment(seq)
        if segment is None:
            return super().kernel(q, k, v, gates, state, use_cache, seq)
        if state is not None or use_cache:
            raise ValueError("decoding caches are for single-device forwards, not sp segments")
        from_kernel = self.states_from_kernel
        if from_kernel is None:
            from_kernel = resolve_backend(self.kernel_backend, q) == "triton"
        scale = default_scale(self.scale, q.shape[-1])
        layer = LinearSegment(self, seq, segment, scale, from_kernel)
        return self.exchange(layer, q, k, v, gates), None

    def exchange(self, layer: LinearSegment, q, k, v, gates) -> torch.Tensor:
        """The output of this rank's segment, exact for the whole sequence."""
        return _Lasp2.apply(layer, q, k, v, *gates)


class LinearSegment:
    """One linear mixer call on a segment: what the LASP-2 protocol needs of it besides its
    tensors (the family, the packing, the segment, the scale)."""

    def __init__(self, mixer, seq, segment: Segment, scale: float, states_from_kernel: bool):
        self.family, self.backend = mixer.family, mixer.kernel_backend
        self.states_from_kernel = states_from_kernel
        self.key = ("lasp2", id(mixer))
        self.seq, self.segment, self.scale = seq, segment, scale
        self.first_doc, self.last_doc = seq.seg_id[:, 0], seq.seg_id[:, -1]

    def chunk(self, q, k, v, gates, entering=None, final=False):
        """The local kernel over the packed row of the B segments (documents restart at
        the local ``cu_seqlens``), each sample's first document entering with
        ``entering[b]`` (zeros when None)."""
        B, L = q.shape[:2]
        flat = [x.reshape(1, B * L, *x.shape[2:]) for x in (q, k, v, *gates)]
        h0 = None
        if entering is not None:
            n_docs = len(self.seq.docs)
            h0 = entering.new_zeros(n_docs, *entering.shape[1:])
            h0 = h0.index_copy(0, self.first_doc.long(), entering)
        o, finals = self.family.chunk(
            *flat,
            scale=self.scale,
            initial_state=h0,
            output_final_state=final,
            cu_seqlens=self.seq.docs,
            backend=self.backend,
        )
        return o.view(B, L, *o.shape[2:]), finals

    def protocol(self, fn, q, k, v, gates, *extra):
        """``fn`` (the family's ``transition`` or ``entering_state_grad``) of each sample's
        segment as one chain, with the protocol's zeros where a segment starts a document."""
        args = (q, k, v, *gates, *extra)
        seg = self.segment
        if not seg.restarts.any():  # no document starts inside: all samples in one call
            out = fn(*args, scale=self.scale)
        else:
            parts = []
            for b in range(q.shape[0]):
                starts = [0, *seg.local_starts[b, 1:].nonzero().flatten().add(1).tolist()]
                cu = torch.tensor([*starts, q.shape[1]], dtype=torch.int32, device=q.device)
                cu_seqlens = cu if len(starts) > 1 else None
                parts.append(
                    fn(*(x[b : b + 1] for x in args), scale=self.scale, cu_seqlens=cu_seqlens)
                )
            out = (
                [torch.cat(p) for p in zip(*parts, strict=True)]
                if isinstance(parts[0], tuple)
                else torch.cat(parts)
            )
        first = out[0] if isinstance(out, (tuple, list)) else out
        keep = seg.continues.view(-1, *[1] * (first.dim() - 1)).to(first.dtype)
        if isinstance(out, (tuple, list)):
            return out[0] * keep, out[1]  # A: the state a segment receives is ignored
        return out * keep  # G: nothing flows into a state the segment ignores

    def kernel_transition(self, q, k, v, gates, finals: torch.Tensor):
        """(A, B) from the local kernel: B the final states of its zero-start run
        (``finals``), A the family's ``local_transition`` (closed form for the gated
        families; for the delta rule, a run from the identity with zero values); zero where
        the protocol has it zero."""
        B_state = finals.index_select(0, self.last_doc.long()).float()
        A = self.family.local_transition(q, k, v, *gates, scale=self.scale, backend=self.backend)
        seg = self.segment
        keep = (seg.continues & ~seg.restarts).to(torch.float32)
        return A.float() * keep.view(-1, *[1] * (A.dim() - 1)), B_state

    def recompute(self, inputs: list, needs: tuple, entering: torch.Tensor):
        """The local forward from ``entering`` with autograd on: (leaves, o, final states,
        the entering states as a leaf)."""
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(n) for x, n in zip(inputs, needs, strict=True)]
            entering = entering.detach().requires_grad_(self.states_from_kernel)
            q, k, v, *gates = leaves
            o, finals = self.chunk(q, k, v, gates, entering=entering, final=True)
        return leaves, o, finals, entering

    def local_grads(self, local, needs: tuple, do: torch.Tensor, dS_out: torch.Tensor):
        """The gradients of the inputs (None where not needed) from the outputs' ``do`` and
        the gradient ``dS_out`` of each sample's leaving state (its last document's)."""
        leaves, o, finals, _ = local
        d_finals = torch.zeros_like(finals).index_copy(0, self.last_doc.long(), dS_out)
        wanted = [x for x, n in zip(leaves, needs, strict=True) if n]
        grads = iter(torch.autograd.grad((o, finals), wanted, (do, d_finals)))
        return [next(grads) if n else None for n in needs]

    def kernel_entering_grad(self, local, needs: tuple, do: torch.Tensor):
        """G from the local kernel's backward (its initial-state gradient, with no
        gradient on the leaving state), and the inputs' gradients from ``do`` alone."""
        leaves, o, _, entering = local
        wanted = [x for x, n in zip(leaves, needs, strict=True) if n]
        *grads, G = torch.autograd.grad(o, [*wanted, entering], do, retain_graph=True)
        left = iter(grads)
        keep = self.segment.continues.view(-1, 1, 1, 1).to(G.dtype)
        return G * keep, [next(left) if n else None for n in needs]

    def kernel_leaving_grads(self, local, needs: tuple, dS_out: torch.Tensor, grads: list):
        """Add the inputs' gradients from the leaving states' ``dS_out`` to ``grads``."""
        leaves, _, finals, _ = local
        if not dS_out.any():
            return grads
        d_finals = torch.zeros_like(finals).index_copy(0, self.last_doc.long(), dS_out)
        wanted = [x for x, n in zip(leaves, needs, strict=True) if n]
        more = iter(torch.autograd.grad(finals, wanted, d_finals))
        return [g + next(more) if n else None for g, n in zip(grads, needs, strict=True)]

    def gather(self, payload: torch.Tensor):
        """Start the all-gather of this rank's [B, n] fp32 payload; (work, [R, B, n])."""
        seg = self.segment
        out = payload.new_empty(seg.size * payload.shape[0], *payload.shape[1:])
        work = comm.all_gather_single(out, payload.contiguous(), seg.group, async_op=True)
        return work, out.view(seg.size, *payload.shape)


def times_state(A: torch.Tensor, S: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A S for a scalar [B, H], diagonal [B, H, K] or dense [B, H, K, K] transition."""
    if A.dim() == 2:
        return A[..., None, None] * S
    if A.dim() == 3:
        return A[..., None] * S
    return (A.transpose(-1, -2) if transpose else A) @ S


def _split(gathered: torch.Tensor, a_shape: torch.Size, b_shape: torch.Size):
    n = a_shape[1:].numel()
    R = gathered.shape[0]
    return gathered[..., :n].reshape(R, *a_shape), gathered[..., n:].reshape(R, *b_shape)


class _Lasp2(torch.autograd.Function):
    """The output of one linear layer on this rank's segment, exact for the whole sequence.

    Forward: (A, B) of each sample's segment (``transition``), ONE all-gather of [A | B]
    (fp32), the prefix fold S_in(r) = A_{r-1} S_in(r-1) + B_{r-1}, and the local output
    from S_in. Split-output families (``SPEC.split_output``) run their whole local kernel from a zero
    state while the gather is in flight and add scale (q * exp(cumsum g)) S_in to the
    first document's tokens after it; the delta-rule families run the kernel from S_in.

    Backward: G (``entering_state_grad``), ONE all-gather of G, the suffix fold
    dS_out(r) = A_{r+1}^T dS_out(r+1) + G_{r+1}, and the local backward with the entering
    state S_in and the leaving-state gradient dS_out; the local forward it differentiates
    is recomputed while G is in flight.

    (A layer's recompute costs one local forward: the price of not keeping the local
    kernel's graph from the forward, which ran without autograd.)

    With ``states_from_kernel`` (the default where the kernel is Triton) the local kernel
    gives the states instead of the protocol's torch passes: B is the final state of its
    zero-start run (for the gated families the same run that gives the output), A comes
    in closed form from the gates or, for the delta rule, from a run of the kernel from the
    identity; G is the recomputed kernel's initial-state gradient under dO alone, and the
    gradients from dS_out take a second backward through its final states.
    """

    @staticmethod
    def forward(ctx, layer: LinearSegment, q, k, v, *gates):
        seg, family = layer.segment, layer.family
        saved = seg.saved.get(layer.key)
        o = None
        if saved is None:
            if layer.states_from_kernel:
                o, finals = layer.chunk(q, k, v, gates, final=True)
                A, B_state = layer.kernel_transition(q, k, v, gates, finals)
            else:
                A, B_state = layer.protocol(family.transition, q, k, v, gates)
            payload = torch.cat([A.flatten(1), B_state.flatten(1)], 1).float()
            work, gathered = layer.gather(payload)
        else:  # an activation-checkpointing recompute: the states are already here
            work, (A, B_state, gathered) = None, saved
        if family.SPEC.split_output and o is None:
            o = layer.chunk(q, k, v, gates)[0]  # from zero, while the states travel
        if work is not None:
            work.wait()
            seg.saved[layer.key] = (A, B_state, gathered)
        A_all, B_all = _split(gathered, A.shape, B_state.shape)
        S_in = torch.zeros_like(B_state)
        for j in range(seg.rank):
            S_in = times_state(A_all[j], S_in) + B_all[j]
        S_in = S_in * seg.continues.view(-1, 1, 1, 1).to(S_in.dtype)
        if family.SPEC.split_output:
            assert o is not None  # the local output from zero, computed above
            o = o + _entering_read(layer, q, gates, S_in).to(o.dtype)
        else:
            o = layer.chunk(q, k, v, gates, entering=S_in)[0]
        ctx.layer, ctx.A_all = layer, A_all
        ctx.save_for_backward(q, k, v, *gates, S_in)
        return o

    @staticmethod
    def backward(ctx, do):
        layer, seg = ctx.layer, ctx.layer.segment
        q, k, v, *gates, S_in = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if layer.states_from_kernel:
            local = layer.recompute([q, k, v, *gates], needs, S_in)
            G, grads = layer.kernel_entering_grad(local, needs, do)
            work, G_all = layer.gather(G.flatten(1).float())
        else:
            G = layer.protocol(layer.family.entering_state_grad, q, k, v, gates, do)
            work, G_all = layer.gather(G.flatten(1).float())
            local = layer.recompute([q, k, v, *gates], needs, S_in)  # while G is in flight
        work.wait()
        G_all = G_all.view(seg.size, *G.shape)
        dS_out = torch.zeros_like(S_in)
        for j in range(seg.size - 1, seg.rank, -1):
            dS_out = times_state(ctx.A_all[j], dS_out, transpose=True) + G_all[j]
        if layer.states_from_kernel:
            return None, *layer.kernel_leaving_grads(local, needs, dS_out, grads)
        return None, *layer.local_grads(local, needs, do, dS_out)


def _entering_read(layer: LinearSegment, q, gates, S_in) -> torch.Tensor:
    """What the entering state adds to a split-output family's output (the family's
    ``entering_read``), for the tokens of each sample's first document (zero elsewhere)."""
    seq = layer.seq
    first = (seq.seg_id == seq.seg_id[:, :1]).to(torch.float32)  # [B, L]
    read = layer.family.entering_read(q, *gates, state=S_in, scale=layer.scale)
    return read * first[:, :, None, None]


# -- halos: the previous rank's last rows ------------------------------------------------


class _Halo(torch.autograd.Function):
    """The previous rank's last ``n`` rows of x [B, L, C] (zeros on the first rank), by
    point-to-point; the backward returns the halo's gradient to its owner."""

    @staticmethod
    def forward(ctx, x, n: int, seg: Segment, key):
        """key: where ``seg.saved`` keeps the halo for a recompute (None: not kept)."""
        ctx.n, ctx.seg = n, seg
        if key is not None and key in seg.saved:  # a recompute: received in the first forward
            return seg.saved[key]
        halo = x.new_zeros(x.shape[0], n, *x.shape[2:])
        _exchange(seg, send=x[:, -n:].contiguous(), to=+1, recv=halo)
        if key is not None:
            seg.saved[key] = halo
        return halo

    @staticmethod
    def backward(ctx, d_halo):
        seg, n = ctx.seg, ctx.n
        d_tail = d_halo.new_zeros(d_halo.shape)
        _exchange(seg, send=d_halo.contiguous(), to=-1, recv=d_tail)
        dx = d_tail.new_zeros(d_tail.shape[0], seg.length, *d_tail.shape[2:])
        dx[:, -n:] = d_tail
        return dx, None, None, None


def _exchange(seg: Segment, send: torch.Tensor, to: int, recv: torch.Tensor) -> None:
    """Send ``send`` to the rank ``to`` places along (if there is one) and fill ``recv``
    from the rank as far the other way (if there is one)."""
    sends = [(send, seg.peer(to))] if 0 <= seg.rank + to < seg.size else []
    recvs = [(recv, seg.peer(-to))] if 0 <= seg.rank - to < seg.size else []
    comm.exchange(sends, recvs, seg.group)


class SequenceParallelConv(_SequenceParallel, ShortConv):
    """A short convolution that reads the previous rank's last W - 1 inputs as a halo."""

    def forward(self, x_BTC, seq=None, tail=None):
        segment = self.segment(seq)
        if segment is None:
            return super().forward(x_BTC, seq, tail)
        n = self.width - 1
        if segment.length < n:
            raise ValueError(
                f"sp segments of {segment.length} tokens are shorter than the short "
                f"convolution's reach ({n}); use a longer train.seq_len or a smaller parallel.sp"
            )
        halo = _Halo.apply(x_BTC, n, segment, ("conv", id(self)))
        y, _ = self.mix(x_BTC, segment.doc_pos, halo)
        return y, None


# -- LASP-2H for softmax attention ---------------------------------------------------------


class _GatherSequence(torch.autograd.Function):
    """x [B, C, L, D] of every rank, concatenated along L: [B, C, T, D]; the backward
    reduce-scatters the gradient back to its owners."""

    @staticmethod
    def forward(ctx, x, seg: Segment):
        ctx.seg = seg
        out = x.new_empty(seg.size * x.shape[0], *x.shape[1:])
        comm.all_gather_single(out, x.contiguous(), seg.group)
        out = out.view(seg.size, *x.shape).permute(1, 2, 0, 3, 4)
        return out.reshape(x.shape[0], x.shape[1], seg.total, x.shape[3])

    @staticmethod
    def backward(ctx, grad):
        seg = ctx.seg
        B, C, _, D = grad.shape
        parts = grad.reshape(B, C, seg.size, seg.length, D).permute(2, 0, 1, 3, 4).contiguous()
        out = grad.new_empty(B, C, seg.length, D)
        comm.reduce_scatter_single(out, parts.view(-1, C, seg.length, D), group=seg.group)
        return out, None


class SequenceParallelAttention(_SequenceParallel, SoftmaxAttention):
    """Softmax attention whose ``core`` attends over the keys and values of the whole
    samples (LASP-2H)."""

    def core(self, q, k, v, seq, past):
        segment = self.segment(seq)
        if segment is None:
            return super().core(q, k, v, seq, past)

        start, L, Hkv = segment.start, segment.length, k.shape[1]
        kv = torch.cat([k, v], dim=1)  # [B, 2 Hkv, L, D]: one collective for both
        reach = self.window - 1 if self.window else None
        doc_id = segment.doc_id
        if reach is not None and reach <= L:  # a sliding window: a halo from the previous rank
            lo = start - reach
            if reach:  # on the first rank it is zeros, kept apart by their document id -1
                halo = _Halo.apply(kv.transpose(1, 2), reach, segment, None).transpose(1, 2)
                kv = torch.cat([halo, kv], dim=2)
                doc_id = torch.cat([doc_id.new_full((len(doc_id), reach), -1), doc_id], 1)
                doc_id = doc_id[:, start : start + reach + L]
            else:
                doc_id = doc_id[:, start : start + L]
        else:
            lo = 0
            kv = _GatherSequence.apply(kv, segment)[:, :, : start + L]
            doc_id = doc_id[:, : start + L]
        keys, values = kv[:, :Hkv], kv[:, Hkv:]
        device = q.device
        return attend(
            q,
            keys,
            values,
            torch.arange(start, start + L, device=device),
            torch.arange(lo, start + L, device=device),
            segment.doc_id[:, start : start + L],
            doc_id,
            window=self.window or 0,
        )
