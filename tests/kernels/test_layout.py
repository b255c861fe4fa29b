"""The batch's documents and chunk layout (read once, shared by both engines) and the one
autograd pattern of the chunkwise engines."""

import pytest
import torch

from hylas.kernels import layout, registry
from hylas.kernels.engines.gated.chunk_torch import from_chunks, to_chunks
from hylas.kernels.layout import ChunkLayout, Documents, chunk_layout
from hylas.model.config import ModelConfig
from hylas.model.decoder import HylasLM
from tests.helpers import assert_close

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("cu", "batch", "message"),
    [
        ([0, 5, 9], 2, "batch size must be 1"),
        ([1, 5, 10], 1, "must run from 0 to T=10"),
        ([0, 5, 9], 1, "must run from 0 to T=10"),
        ([0, 5, 5, 10], 1, "strictly increasing"),
        ([[0, 10]], 1, "must be 1-D"),
    ],
)
def test_bad_cu_seqlens_get_one_sentence(cu, batch, message):
    with pytest.raises(ValueError, match=message):
        Documents.of(torch.tensor(cu), batch, 10)


def test_documents_pass_through_once_read():
    docs = Documents.of(torch.tensor([0, 3, 10]), 1, 10)
    assert docs is not None and docs.offsets == [0, 3, 10] and len(docs) == 2
    assert Documents.of(docs, 1, 10) is docs
    with pytest.raises(ValueError, match="cover 10 tokens, the row has 12"):
        Documents.of(docs, 1, 12)
    assert docs.steps(3).offsets == [0, 9, 30] and docs.steps(3) is docs.steps(3)
    assert docs.layout(CPU) is docs.layout(CPU)  # one layout per batch and chunk length


def test_packed_layout_maps_worked_by_hand():
    # documents of 3, 67 and 5 tokens at C = 64: 1, 2 and 1 chunks
    lay = Documents([0, 3, 70, 75]).layout(CPU, 64)
    assert (lay.P, lay.N, lay.NT, lay.docs) == (1, 4, 4, 3)
    assert (lay.doc_first, lay.doc_last) == ([0, 1, 3], [0, 2, 3])
    assert lay.cu_seqlens.tolist() == [0, 3, 70, 75]
    assert lay.chunk_indices.tolist() == [[0, 0], [1, 0], [1, 1], [2, 0]]
    assert lay.chunk_offsets.tolist() == [0, 1, 3, 4]
    want = [*range(0, 3), *range(64, 131), *range(192, 197)]
    assert lay.slot.tolist() == want
    assert lay.index[want].tolist() == list(range(75)) and (lay.index >= 0).sum() == 75


def test_fixed_layout_maps_worked_by_hand():
    lay = chunk_layout(2, 70, None, CPU, 64)
    assert (lay.P, lay.N, lay.NT, lay.docs) == (2, 2, 4, 2)
    assert lay.cu_seqlens.tolist() == [0, 70, 140]
    assert lay.chunk_indices.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert lay.chunk_offsets.tolist() == [0, 2, 4]
    assert chunk_layout(2, 70, None, CPU, 64) is lay  # made once per shape


@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_chunks_round_trip_and_pad_with_zeros(packed):
    B, T = (1, 75) if packed else (2, 70)
    lay = ChunkLayout(B, T, 16, CPU, [0, 3, 70, 75] if packed else None)
    x = torch.randn(B * T, 2, 5)
    chunks = to_chunks(x, lay)
    assert chunks.shape == (lay.P, lay.N, 16, 2, 5)
    assert torch.equal(from_chunks(chunks, lay), x)
    assert chunks.abs().sum() == pytest.approx(x.abs().sum().item())  # padding holds zeros


# One family per engine; each on both backends (Triton under the interpreter).
ENGINES = [(f, b) for f in ("gla", "gated_delta_rule") for b in ("torch", "triton")]


@pytest.mark.parametrize(("name", "backend"), ENGINES, ids=[f"{f}-{b}" for f, b in ENGINES])
def test_a_loss_on_the_final_state_alone_gets_the_oracles_gradients(name, backend):
    """The output gets no gradient (the pattern materialises zeros for it)."""
    fam = registry.family(name)
    inputs = fam.SPEC.inputs(2, 40, 2, 16, 16)
    h0 = torch.randn(2, 2, 16, 16, requires_grad=True)
    leaves = [*inputs, h0]
    got = fam.chunk(*inputs, initial_state=h0, output_final_state=True, backend=backend)[1]
    want = fam.naive(*inputs, initial_state=h0, output_final_state=True)[1]
    assert_close(got, want, 1e-4, "final state")
    dht = torch.randn(want.shape)

    def grads(ht):  # q does not reach the final state: its gradient is zero
        out = torch.autograd.grad((ht * dht).sum(), leaves, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(out, leaves, strict=True)]

    names = ["q", "k", "v", *(gate.name for gate in fam.SPEC.gates), "h0"]
    for g_got, g_want, what in zip(grads(got), grads(want), names, strict=True):
        assert_close(g_got, g_want, 1e-4, what, atol=1e-6)


@pytest.mark.parametrize(("name", "backend"), ENGINES, ids=[f"{f}-{b}" for f, b in ENGINES])
def test_gradients_come_back_in_each_inputs_dtype(name, backend):
    fam = registry.family(name)
    q, k, v, *gates = fam.SPEC.inputs(1, 20, 2, 16, 16, requires_grad=False)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    gates = [g.requires_grad_() for g in gates]  # fp32
    h0 = torch.zeros(1, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    o, ht = fam.chunk(q, k, v, *gates, initial_state=h0, output_final_state=True, backend=backend)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum() + ht.sum(), [q, k, v, *gates, h0])
    assert [x.dtype for x in grads] == [x.dtype for x in (q, k, v, *gates, h0)]


def test_a_packed_forward_reads_cu_seqlens_once_for_every_layer(monkeypatch):
    """The model reads the loader's host cu_seqlens once and every linear layer's kernel
    call gets the same documents, so one chunk layout serves the whole forward."""
    cfg = ModelConfig(
        vocab_size=300, d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, layer_pattern="LLLF"
    )
    model = HylasLM(cfg, kernel_backend="torch")
    reads, layouts = [], []
    of, init = Documents.of.__func__, ChunkLayout.__init__

    def counting_of(cls, cu_seqlens, batch, total):
        if isinstance(cu_seqlens, torch.Tensor):
            reads.append(cu_seqlens)
        return of(cls, cu_seqlens, batch, total)

    def counting_init(self, *args, **kw):
        layouts.append(self)
        init(self, *args, **kw)

    monkeypatch.setattr(Documents, "of", classmethod(counting_of))
    monkeypatch.setattr(layout.ChunkLayout, "__init__", counting_init)
    ids = torch.randint(0, 300, (2, 80))
    cu = torch.tensor([0, 30, 80, 100, 160], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu)
    out.logits.float().square().mean().backward()
    assert len(reads) == 1, f"cu_seqlens read {len(reads)} times in one forward"
    assert len(layouts) == 1, f"{len(layouts)} chunk layouts built for one batch"
