"""Blockwise softmax attention: ``attend`` against a dense-mask reference (outputs and
gradients) for causal, grouped-query, windowed, packed, offset and fully masked queries;
the layer's packed and cached paths against per-document and full runs; no [T, T] mask."""

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from hylas.model import attention
from hylas.model.attention import BLOCK, SoftmaxAttention, attend
from hylas.model.config import AttentionConfig, ModelConfig
from hylas.model.decoder import Packing
from tests.helpers import assert_close


def reference(q, k, v, q_index, k_index, q_doc=None, k_doc=None, window=0):
    """Dense softmax attention in fp64: the full [Tq, Tk] mask, kv heads repeated."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    rows, cols = q_index[:, None], k_index[None, :]
    mask = (cols <= rows)[None]
    if window:
        mask = mask & (cols > rows - window)
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    mask = mask[:, None]  # [B or 1, 1, Tq, Tk]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    p = torch.where(mask.any(-1, keepdim=True), p, 0)  # no visible key: o = 0
    return p @ v


def inputs(B=2, Hq=2, Hkv=2, Tq=75, Tk=None, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, Hq, Tq, D, generator=gen)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=gen) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def check(q, k, v, q_index, k_index, q_doc=None, k_doc=None, window=0, block=16, atol=0.0):
    """attend's output and q, k, v gradients within 1e-5 (relative RMS) of the reference."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (functools.partial(attend, block=block), reference):
        o = fn(q, k, v, q_index, k_index, q_doc, k_doc, window)
        results.append((o, *torch.autograd.grad((o * do).sum(), (q, k, v))))
    for name, a, e in zip(("o", "dq", "dk", "dv"), *results, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, e, 1e-5, name, atol)
    return results[0][0]


def docs(lengths_per_sample, T):
    """Global, ascending document ids [B, T] of samples cut into the given lengths."""
    ids = torch.cat(
        [torch.arange(len(ls)).repeat_interleave(torch.tensor(ls)) for ls in lengths_per_sample]
    )
    starts = torch.tensor([0] + [len(ls) for ls in lengths_per_sample[:-1]]).cumsum(0)
    return ids.view(len(lengths_per_sample), T) + starts[:, None]


@pytest.mark.parametrize("block", [16, BLOCK])
def test_causal_matches_the_dense_reference(block):
    q, k, v = inputs(Tq=75)  # 75: not a multiple of the block
    t = torch.arange(75)
    check(q, k, v, t, t, block=block)


def test_grouped_query_heads():
    q, k, v = inputs(Hq=4, Hkv=2, Tq=75)
    t = torch.arange(75)
    check(q, k, v, t, t)


@pytest.mark.parametrize("window", [1, 10, 16, 200])
def test_sliding_window(window):
    q, k, v = inputs(Hq=4, Hkv=2, Tq=75)
    t = torch.arange(75)
    check(q, k, v, t, t, window=window, atol=1e-6)  # window 1: dq = 0 (each query sees itself)


PACKED = [[5, 30, 3, 37], [9, 40, 26]]  # a document shorter than a block, one across edges


@pytest.mark.parametrize("window", [0, 12])
def test_packed_documents(window):
    q, k, v = inputs(Hq=4, Hkv=2, Tq=75)
    t, doc = torch.arange(75), docs(PACKED, 75)
    check(q, k, v, t, t, doc, doc, window)


def test_document_ids_out_of_order_are_still_kept_apart():
    q, k, v = inputs(Tq=75)
    t = torch.arange(75)
    doc = torch.tensor([3, 1, 2, 0, 3]).repeat_interleave(15).expand(2, 75)  # not ascending
    check(q, k, v, t, t, doc, doc)


@pytest.mark.parametrize(("offset", "Tq"), [(0, 20), (30, 20), (60, 20), (79, 1), (40, 40)])
@pytest.mark.parametrize("packed", [False, True])
def test_local_queries_against_gathered_keys(offset, Tq, packed):
    """A sequence-parallel rank's queries (positions offset..) over all 80 keys, or a decode step."""
    q, k, v = inputs(Hq=4, Hkv=2, Tq=Tq, Tk=80)
    k_index = torch.arange(80)
    q_index = k_index[offset : offset + Tq]
    doc = docs([[5, 30, 3, 42], [9, 40, 31]], 80) if packed else None
    q_doc = doc[:, offset : offset + Tq] if packed else None
    check(q, k, v, q_index, k_index, q_doc, doc, window=12 if packed else 0)


def nan_rows_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """SDPA as some GPU kernels have it: NaN for a fully masked row."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.fixture(params=["torch", "nan rows"])
def any_sdpa(request, monkeypatch):
    """Torch's SDPA, then one that gives NaN for fully masked rows."""
    if request.param == "nan rows":
        monkeypatch.setattr(F, "scaled_dot_product_attention", nan_rows_sdpa)


def test_queries_that_see_no_key_give_zero(any_sdpa):
    q, k, v = inputs(Tq=40, Tk=30)
    q_index, k_index = torch.arange(40), torch.arange(10, 40)  # queries 0..9 precede every key
    q_doc = torch.zeros(2, 40, dtype=torch.long)
    q_doc[1, 20:25] = 7  # a document no key belongs to
    k_doc = torch.zeros(2, 30, dtype=torch.long)
    o = check(q, k, v, q_index, k_index, q_doc, k_doc, block=4)  # blocks 0-1: no key at all
    assert (o[:, :, :10] == 0).all() and (o[1, :, 20:25] == 0).all()
    assert (o[0, :, 10:].abs().sum(-1) > 0).all()


def test_queries_after_every_key_see_only_their_window(any_sdpa):
    """Keys of an earlier chunk only: all causally visible, some blocks' rows beyond the window."""
    q, k, v = inputs(Hq=4, Hkv=2, Tq=20, Tk=40)
    o = check(q, k, v, torch.arange(50, 70), torch.arange(40), window=15)
    assert (o[:, :, 4:] == 0).all()  # position 54 on: key 39 is out of the window


def test_no_mask_or_score_matrix_spans_the_sequence(monkeypatch):
    """Packed short documents: every SDPA call sees one block of queries and only keys of
    their documents, so each mask is [B, 1, <= BLOCK, <= BLOCK + a document], never [T, T]."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        mask = None if attn_mask is None else tuple(attn_mask.shape)
        calls.append((q.shape[-2], k.shape[-2], mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    T, doc_len = 4096, 100  # documents across block edges
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    t = torch.arange(T)
    doc = (t // doc_len)[None]
    attend(q, k, v, t, t, doc, doc)
    assert len(calls) == -(-T // BLOCK)
    for rows, span, mask in calls:
        assert rows <= BLOCK and span < BLOCK + doc_len < T
        assert mask == (1, 1, rows, span)


def layer(window=0, qk_norm=False) -> SoftmaxAttention:
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        linear_mixer="gla",
        linear_to_full="0:1",
        attention=AttentionConfig(window=window, qk_norm=qk_norm),
    ).validate()
    torch.manual_seed(0)
    return SoftmaxAttention(cfg).eval()


@pytest.fixture
def small_blocks(monkeypatch):
    """The layer's attention in blocks of 16 rows, so short inputs cross block edges."""
    monkeypatch.setattr(attention, "attend", functools.partial(attend, block=16))


@pytest.mark.parametrize("window", [0, 12])
def test_layer_packed_equals_each_document_alone(small_blocks, window):
    mixer = layer(window, qk_norm=True)
    B, T = len(PACKED), 75
    x = torch.randn(B, T, 64)
    cuts = [b * T + c for b, ls in enumerate(PACKED) for c in itertools.accumulate([0, *ls[:-1]])]
    seq = Packing.from_cu_seqlens(torch.tensor([*cuts, B * T]), B, T)
    with torch.no_grad():
        packed, _ = mixer(x, seq.seg_pos, seq=seq)
        for b, ls in enumerate(PACKED):
            for s, e in itertools.pairwise(itertools.accumulate([0, *ls])):
                alone, _ = mixer(x[b : b + 1, s:e], torch.arange(e - s)[None])
                assert_close(packed[b, s:e], alone[0], 1e-5, f"sample {b} document [{s}, {e})")


@pytest.mark.parametrize("window", [0, 12])
def test_layer_cached_decoding_equals_the_full_forward(small_blocks, window):
    mixer = layer(window)
    x = torch.randn(2, 60, 64)
    pos = torch.arange(60).expand(2, 60)
    with torch.no_grad():
        full, _ = mixer(x, pos)
        out, cache = mixer(x[:, :40], pos[:, :40], use_cache=True)  # a prefill of 3 blocks
        parts = [out]
        for t in range(40, 45):  # one token at a time
            out, cache = mixer(x[:, t : t + 1], pos[:, t : t + 1], cache, use_cache=True)
            parts.append(out)
        out, cache = mixer(x[:, 45:], pos[:, 45:], cache, use_cache=True)  # several, with a past
        parts.append(out)
    assert cache[0].shape[2] == 60
    assert_close(torch.cat(parts, 1), full, 1e-5, "decoded outputs")
    if window:  # the last token sees the last ``window`` tokens only
        with torch.no_grad():
            recent, _ = mixer(x[:, -window:], pos[:, -window:])
        assert_close(full[:, -1], recent[:, -1], 1e-5, "windowed last token")
