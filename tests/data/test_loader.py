"""PackedLoader and eval_batches against references rebuilt by hand from the spec in the
docstring of hylas.data.loader: packing, dp x sp sharding, resume, mixtures, errors and
held-out batches. All data are small in-memory splits whose tokens are distinct."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from hylas.data.dataset import Split
from hylas.data.loader import PackedLoader, eval_batches
from hylas.data.sources import DataError

PAD, JUNK, EOS, IGNORE = 0, 1, 2, -100
LENGTHS = [3, 17, 1, 40, 6, 16, 9, 70, 2, 12, 33, 5]  # EOS included; 214 tokens


def make_docs(lengths: list[int], first: int = 10) -> list[np.ndarray]:
    """Documents of the given lengths, each ending with EOS, their other tokens counting up
    from ``first``."""
    docs, v = [], first
    for n in lengths:
        docs.append(np.append(np.arange(v, v + n - 1), EOS))
        v += n - 1
    return docs


def lengths_ending(seq_len: int, residue: int) -> list[int]:
    """LENGTHS plus one document so that the stream has ``residue`` tokens mod seq_len."""
    last = (residue - sum(LENGTHS)) % seq_len
    return [*LENGTHS, last if last >= 2 else last + seq_len]


def make_split(docs: list[np.ndarray], n_shards: int = 1) -> Split:
    """The documents dealt round-robin over shards, a JUNK token before each."""
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    doc_shard, doc_start = [], []
    for d, doc in enumerate(docs):
        shard = shards[d % n_shards]
        shard.append(JUNK)
        doc_shard.append(d % n_shards)
        doc_start.append(len(shard))
        shard.extend(doc.tolist())
    return Split(
        "train",
        [np.array(s, np.uint32) for s in shards],
        np.array(doc_shard, np.int32),
        np.array(doc_start, np.int64),
        np.array([len(d) for d in docs], np.int64),
    )


def loader(splits, seq_len, batch_size, seed=0, **kw) -> PackedLoader:
    return PackedLoader(list(splits), seq_len, batch_size, seed, pad_id=PAD, **kw)


def window(stream: np.ndarray, doc_starts, j: int, T: int):
    """Sample j of a packed stream: inputs, labels and the sorted columns where a segment
    (sample start, document start, padding) begins."""
    a = j * T
    piece = stream[a : a + T + 1]
    w = np.full(T + 1, PAD, np.int64)
    w[: len(piece)] = piece
    labels = w[1:].copy()
    labels[len(piece) - 1 :] = IGNORE
    segs = {0} | {int(s) - a for s in doc_starts if a < s < a + T}
    if len(piece) < T:
        segs.add(len(piece))
    return w[:T], labels, sorted(segs)


class RefSource:
    """A source's samples per the spec: epoch e packs the documents in the order
    ``rng.permutation(D)`` and visits its samples in the order ``rng.permutation(S)`` drawn
    next from the same ``rng = default_rng((seed, index, e))``."""

    def __init__(self, docs, T, seed=0, index=0, shuffle=True):
        self.docs, self.T, self.seed, self.index, self.shuffle = docs, T, seed, index, shuffle
        self.tokens = sum(len(d) for d in docs)
        self.samples_per_epoch = -(-(self.tokens - 1) // T)  # every label once
        self._epochs: dict[int, tuple] = {}

    def epoch(self, e: int):
        """(stream, document starts in it, sample visiting order) of epoch e."""
        if e not in self._epochs:
            D, S = len(self.docs), self.samples_per_epoch
            rng = np.random.default_rng((self.seed, self.index, e))
            order = rng.permutation(D) if self.shuffle else np.arange(D)
            visit = rng.permutation(S) if self.shuffle else np.arange(S)
            stream = np.concatenate([self.docs[d] for d in order])
            starts = np.cumsum([0] + [len(self.docs[d]) for d in order])[:-1]
            self._epochs[e] = stream, starts, visit
        return self._epochs[e]

    def sample(self, k: int):
        e, r = divmod(k, self.samples_per_epoch)
        stream, starts, visit = self.epoch(e)
        return window(stream, starts, int(visit[r]), self.T)


def positions(segs: list[int], T: int) -> np.ndarray:
    cols = np.arange(T)
    return cols - np.asarray(segs)[np.searchsorted(segs, cols, side="right") - 1]


def cu_seqlens(segs: list[list[int]], T: int) -> torch.Tensor:
    flat = [b * T + s for b, ss in enumerate(segs) for s in ss]
    return torch.tensor([*flat, len(segs) * T], dtype=torch.int32)


def ref_batch(rows) -> dict[str, torch.Tensor]:
    """The sp = 1 batch of ``window`` rows."""
    inputs, labels, segs = zip(*rows, strict=True)
    T = len(inputs[0])
    batch = {
        "input_ids": torch.from_numpy(np.stack(inputs)),
        "labels": torch.from_numpy(np.stack(labels)),
    }
    if all(s == [0] for s in segs):
        return batch
    batch["position_ids"] = torch.from_numpy(np.stack([positions(s, T) for s in segs]))
    batch["cu_seqlens"] = cu_seqlens(list(segs), T)
    return batch


def assert_batch_equal(got: dict, want: dict, what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        assert got[key].dtype == value.dtype, f"{what} {key}: {got[key].dtype} != {value.dtype}"
        assert torch.equal(got[key], value), f"{what} {key}"


@pytest.mark.parametrize(
    "T, B, n_shards, residue, seed",
    [(16, 3, 1, 0, 0), (16, 1, 3, 1, 5), (8, 3, 2, 5, 1), (32, 2, 1, 31, 3)],
)
def test_batches_follow_the_packing_reference(T, B, n_shards, residue, seed):
    docs = make_docs(lengths_ending(T, residue))
    ref = RefSource(docs, T, seed)
    S = ref.samples_per_epoch
    assert B == 1 or S % B, "a batch should straddle the epoch boundary"
    data = loader([make_split(docs, n_shards)], T, B, seed)
    assert data.sources[0].samples_per_epoch == S
    steps = -(-3 * S // (2 * B))
    plain = 0
    for step in range(steps):
        want = ref_batch([ref.sample(k) for k in range(step * B, step * B + B)])
        assert_batch_equal(data.next_batch(), want, f"step {step}")
        plain += want.keys() == {"input_ids", "labels"}
    assert data.consumed == [steps * B]
    if B == 1:
        assert plain > 0


@pytest.mark.parametrize("dp, sp", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 4)])
def test_dp_sp_ranks_cover_an_epoch_exactly_once(dp, sp):
    T, B, seed = 24, 2, 7
    docs = make_docs(lengths_ending(T, 7))
    split = make_split(docs, n_shards=2)
    ref = RefSource(docs, T, seed)
    S = ref.samples_per_epoch
    visit = ref.epoch(0)[2]
    ranks = {
        (r, q): loader([split], T, B, seed, dp_rank=r, dp_size=dp, sp_rank=q, sp_size=sp)
        for r in range(dp)
        for q in range(sp)
    }
    whole = [loader([split], T, B, seed, dp_rank=r, dp_size=dp) for r in range(dp)]
    seen: Counter = Counter()
    for _ in range(-(-S // (dp * B)) + 1):
        plan = ranks[0, 0].plan()
        assert all(lo.plan() == plan for lo in ranks.values())
        for r in range(dp):
            segs = [ranks[r, q].next_batch() for q in range(sp)]
            full = whole[r].next_batch()
            check_segments(segs, full, B, T, sp)
            inputs = torch.cat([s["input_ids"] for s in segs], dim=1)
            for b, (_, k) in enumerate(plan[r * B : (r + 1) * B]):
                if k >= S:
                    continue
                row = inputs[b].numpy()
                seen.update(row.tolist())
                pad_from = len(ref.epoch(0)[0]) - (S - 1) * T if visit[k] == S - 1 else T
                assert (row[pad_from:] == PAD).all() and (row[:pad_from] != PAD).all()
    want = Counter(np.concatenate(docs).tolist())
    want[PAD] = S * T - sum(len(d) for d in docs)
    assert want[PAD] > 0 and want[EOS] == len(docs)
    assert seen == want


def check_segments(segs: list[dict], full: dict, B: int, T: int, sp: int) -> None:
    """The sp segments of one dp rank against that rank's sp = 1 batch."""
    if sp == 1:
        assert_batch_equal(segs[0], full)
        return
    L = T // sp
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([s[key] for s in segs], dim=1), full[key]), key
    pos = full.get("position_ids", torch.arange(T).expand(B, T))
    assert torch.equal(torch.cat([s["position_ids"] for s in segs], dim=1), pos)
    cu = full.get("cu_seqlens", torch.arange(0, B * T + 1, T, dtype=torch.int32))
    starts = [divmod(int(x), T) for x in cu[:-1]]
    for q, seg in enumerate(segs):
        lo = q * L
        local = {b * L + t - lo for b, t in starts if lo <= t < lo + L} | {b * L for b in range(B)}
        assert seg.keys() == {
            "input_ids",
            "labels",
            "position_ids",
            "cu_seqlens",
            "global_cu_seqlens",
            "segment_start",
        }
        assert_batch_equal(
            {k: seg[k] for k in ("cu_seqlens", "global_cu_seqlens", "segment_start")},
            {
                "cu_seqlens": torch.tensor([*sorted(local), B * L], dtype=torch.int32),
                "global_cu_seqlens": cu,
                "segment_start": torch.tensor(lo),
            },
            f"segment {q}",
        )


SMALL = [5, 9, 3]  # 17 tokens: a few samples per epoch


def mixture(n: int) -> list[list[np.ndarray]]:
    """Document sets for n sources, the second one small, tokens distinct across sources."""
    sets = [LENGTHS, SMALL, [20, 11, 30, 4]]
    return [make_docs(sets[i], first=10 + 1000 * i) for i in range(n)]


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return json.loads(json.dumps(torch.load(buf)))


@pytest.mark.parametrize(
    "n_sources, weights, T, B, ranks, N, K",
    [
        (1, None, 16, 2, {}, 12, 5),
        (2, [3, 1], 8, 3, {}, 16, 7),
        (2, [1, 2], 16, 2, {"dp_rank": 1, "dp_size": 2, "sp_rank": 1, "sp_size": 2}, 10, 3),
    ],
)
def test_resume_from_state_dict_sees_the_same_batches(n_sources, weights, T, B, ranks, N, K):
    splits = [make_split(d) for d in mixture(n_sources)]

    def build():
        return loader(splits, T, B, seed=11, weights=weights, **ranks)

    first = build()
    batches = [first.next_batch() for _ in range(N)]
    second = build()
    for _ in range(K):
        second.next_batch()
    assert any(
        c % s.samples_per_epoch for c, s in zip(second.consumed, second.sources, strict=True)
    )
    third = build()
    third.load_state_dict(round_trip(second.state_dict()))
    assert third.consumed == second.consumed
    for step in range(K, N):
        assert_batch_equal(third.next_batch(), batches[step], f"step {step}")


@pytest.mark.parametrize("what", ["documents", "tokens", "seq_len", "seed", "weights"])
def test_resume_into_other_data_raises(what):
    docs = mixture(2)
    kw = {"seq_len": 16, "batch_size": 2, "seed": 11, "weights": [3, 1]}
    saved = loader([make_split(d) for d in docs], **kw)
    saved.next_batch()
    if what == "documents":
        docs[0] = docs[0][:-1]
    elif what == "tokens":
        docs[1][-1] = np.append(np.arange(5000, 5003), EOS)
    else:
        kw[what] = {"seq_len": 32, "seed": 12, "weights": [1, 1]}[what]
    other = loader([make_split(d) for d in docs], **kw)
    with pytest.raises(DataError, match=what):
        other.load_state_dict(round_trip(saved.state_dict()))


@pytest.mark.parametrize("weights", [[3, 1], [0.5, 0.3, 0.2], [1, 4, 2]])
def test_mixture_keeps_every_prefix_within_one_sample_of_its_share(weights):
    T, B, seed, steps = 8, 3, 4, 30
    docs = mixture(len(weights))
    data = loader([make_split(d) for d in docs], T, B, seed, weights=weights)
    refs = [RefSource(d, T, seed, index=i) for i, d in enumerate(docs)]
    share = [Fraction(w).limit_denominator(100) for w in weights]
    share = [w / sum(share) for w in share]
    counts = [0] * len(weights)
    for step in range(steps):
        assert data.consumed == counts
        plan = data.plan()
        assert_batch_equal(
            data.next_batch(), ref_batch([refs[i].sample(k) for i, k in plan]), f"step {step}"
        )
        for i, k in plan:
            n = sum(counts) + 1
            behind = [w * n - c for w, c in zip(share, counts, strict=True)]
            assert behind[i] == max(behind) and k == counts[i]
            counts[i] += 1
            assert all(abs(c - w * n) < 1 for c, w in zip(counts, share, strict=True)), (n, counts)
    small = refs[1].samples_per_epoch
    assert data.consumed[1] >= 3 * small


def test_mixture_is_deterministic_by_seed():
    splits = [make_split(d) for d in mixture(2)]

    def run(seed):
        data = loader(splits, 8, 2, seed, weights=[3, 1])
        return [(data.plan(), data.next_batch()) for _ in range(20)]

    a, again, other = run(3), run(3), run(4)
    for (plan_a, batch_a), (plan_b, batch_b) in zip(a, again, strict=True):
        assert plan_a == plan_b
        assert_batch_equal(batch_a, batch_b)
    assert [p for p, _ in other] == [p for p, _ in a]
    assert any(
        not torch.equal(x["input_ids"], y["input_ids"])
        for (_, x), (_, y) in zip(a, other, strict=True)
    )
    first_docs = [RefSource(mixture(1)[0], 8, seed).epoch(0)[0][:40] for seed in (3, 4)]
    assert not np.array_equal(*first_docs)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"seq_len": 10, "sp_size": 4}, "seq_len"),
        ({"seq_len": 12, "sp_size": 8}, "seq_len"),
        ({"weights": [1, 0]}, "weights"),
        ({"weights": [1, -2]}, "weights"),
        ({"weights": [1, float("nan")]}, "weights"),
        ({"weights": [1]}, "weights"),
        ({"weights": [1, 1, 1]}, "weights"),
        ({"dp_rank": 2, "dp_size": 2}, "outside"),
        ({"dp_rank": -1, "dp_size": 2}, "outside"),
        ({"sp_rank": 4, "sp_size": 4}, "outside"),
        ({"sp_rank": -1, "sp_size": 2}, "outside"),
    ],
)
def test_bad_arguments_raise(kw, match):
    kw = {"seq_len": 16, **kw}
    with pytest.raises(DataError, match=match):
        loader([make_split(d) for d in mixture(2)], kw.pop("seq_len"), 2, **kw)


def test_empty_data_raise():
    with pytest.raises(DataError, match="no data sources"):
        loader([], 16, 2)
    empty = Split(
        "train", [np.zeros(0, np.uint32)], *(np.zeros(0, t) for t in (np.int32, np.int64, np.int64))
    )
    with pytest.raises(DataError, match="no tokens"):
        loader([empty], 16, 2)


EVAL_DOCS = [make_docs(LENGTHS), make_docs([30, 41, 8, 25], first=5000)]  # 14 and 7 samples


@pytest.mark.parametrize(
    "weights, max_batches, want_batches",
    [(None, 4, [2, 2]), ([3, 1], 8, [6, 2]), ([1, 9], 5, [1, 4])],
)
def test_eval_batches_spread_over_the_held_out_stream(weights, max_batches, want_batches):
    T, B = 16, 2
    splits = [make_split(d) for d in EVAL_DOCS]
    items = eval_batches(splits, T, B, max_batches, pad_id=PAD, weights=weights)
    again = eval_batches(splits, T, B, max_batches, pad_id=PAD, weights=weights)
    assert len(again) == len(items)
    for (i, x), (j, y) in zip(items, again, strict=True):
        assert i == j
        assert_batch_equal(x, y)
    assert [sum(i == s for i, _ in items) for s in range(2)] == want_batches
    for s, docs in enumerate(EVAL_DOCS):
        ref = RefSource(docs, T, shuffle=False)
        stream, starts, _ = ref.epoch(0)
        S = ref.samples_per_epoch
        samples = [window(stream, starts, j, T) for j in range(S)]
        picks = []
        for batch in (batch for i, batch in items if i == s):
            rows = [find_sample(samples, batch, b) for b in range(len(batch["input_ids"]))]
            assert 1 <= len(rows) <= B
            assert_batch_equal(batch, ref_batch([samples[j] for j in rows]))
            past_end = torch.arange(T) + torch.tensor(rows)[:, None] * T + 1 >= len(stream)
            assert torch.equal(batch["labels"] == IGNORE, past_end)
            picks += rows
        gaps = np.diff(picks)
        assert picks[0] == 0 and picks[-1] == S - 1
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
        if want_batches[s] * B >= S:
            assert picks == list(range(S))


def find_sample(samples, batch: dict, row: int) -> int:
    """Which sample of the stream the batch's row is."""
    x, y = batch["input_ids"][row].numpy(), batch["labels"][row].numpy()
    hits = [j for j, (i, lab, _) in enumerate(samples) if (i == x).all() and (lab == y).all()]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("residue", [0, 1, 2, 5])
def test_every_label_once_and_no_sample_without_one(residue):
    T = 8
    docs = make_docs(lengths_ending(T, residue))
    stream = np.concatenate(docs)
    data = loader([make_split(docs)], T, 1, seed=3)
    S = data.sources[0].samples_per_epoch
    assert math.ceil((len(stream) - 1) / T) == S
    labels = Counter()
    for _ in range(S):
        batch = data.next_batch()
        row = batch["labels"][0]
        assert (row != IGNORE).any(), "a sample with nothing to predict"
        labels.update(row[row != IGNORE].tolist())
    missing = Counter(stream.tolist()) - labels
    assert sum(missing.values()) == 1 and not labels - Counter(stream.tolist())
    assert next(iter(missing)) in {int(d[0]) for d in docs}  # only the epoch's first token
