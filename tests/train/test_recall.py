"""The recall measure of ``hylas sweep``: MQAR generation and scoring
(``hylas.train.experiments.mqar``) and the probe (``hylas.train.experiments.recall``)."""

import pytest
import torch

from hylas.model.config import ConfigError, ModelConfig
from hylas.train.experiments.mqar import IGNORE_INDEX, MQARConfig, mqar_accuracy, mqar_batch
from hylas.train.experiments.recall import mqar_recall, probe_config


def batch(cfg: MQARConfig, seed: int = 0, size: int = 64):
    return mqar_batch(cfg, size, torch.Generator().manual_seed(seed))


def bound_values(input_ids: torch.Tensor, pairs: int) -> torch.Tensor:
    """[B, T]: at each position, the value the context binds to that position's token (or
    -1), read from the inputs alone: an independent oracle for the labels."""
    out = torch.full_like(input_ids, -1)
    for b in range(input_ids.shape[0]):
        binding = {int(input_ids[b, 2 * i]): int(input_ids[b, 2 * i + 1]) for i in range(pairs)}
        for t in range(2 * pairs, input_ids.shape[1]):
            out[b, t] = binding.get(int(input_ids[b, t]), -1)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        MQARConfig(),
        MQARConfig(vocab_size=300, seq_len=128, pairs=16, power_a=1.0),
        MQARConfig(vocab_size=64, seq_len=64, pairs=4, queries=20),
        MQARConfig(vocab_size=10, seq_len=16, pairs=4),  # every key and every slot taken
    ],
)
def test_mqar_layout(cfg):
    input_ids, labels = batch(cfg)
    B, T, P = 64, cfg.seq_len, cfg.pairs
    assert input_ids.shape == labels.shape == (B, T)
    assert input_ids.dtype == labels.dtype == torch.int64
    keys, values = input_ids[:, 0 : 2 * P : 2], input_ids[:, 1 : 2 * P : 2]
    (k_lo, k_hi), (v_lo, v_hi) = cfg.key_range, cfg.value_range
    assert k_lo == 1 and k_hi == v_lo and v_hi == cfg.vocab_size  # disjoint, 0 is filler
    assert ((keys >= k_lo) & (keys < k_hi)).all() and ((values >= v_lo) & (values < v_hi)).all()
    for row in keys:  # a key is bound once
        assert len(set(row.tolist())) == P
    # Queries: after the pairs, only keys of the row, each at least once; filler elsewhere.
    queries = input_ids[:, 2 * P :] != 0
    assert (queries.sum(1) == cfg.n_queries).all()
    for b in range(B):
        asked = input_ids[b, 2 * P :][queries[b]]
        assert set(asked.tolist()) == set(keys[b].tolist())
    # Labels: exactly at the queries, the value the context binds to the key.
    at = labels != IGNORE_INDEX
    assert not at[:, : 2 * P].any()
    assert torch.equal(at[:, 2 * P :], queries)
    assert torch.equal(labels[at], bound_values(input_ids, P)[at])


def test_mqar_is_seeded_by_its_generator():
    cfg = MQARConfig()
    a, b, c = batch(cfg, 0), batch(cfg, 0), batch(cfg, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(batch(cfg, 0)[0], a[0])
    g = torch.Generator().manual_seed(0)  # consecutive batches differ
    assert not torch.equal(mqar_batch(cfg, 8, g)[0], mqar_batch(cfg, 8, g)[0])


def test_power_law_puts_queries_early():
    def mean_query_position(power_a):
        cfg = MQARConfig(vocab_size=64, seq_len=128, pairs=4, power_a=power_a)
        _, labels = batch(cfg, size=512)
        return (labels != IGNORE_INDEX).nonzero()[:, 1].float().mean().item()

    # Uniform over 60 slots: about the middle (position ~68); Zoology's 0.01 well before it.
    assert mean_query_position(1.0) == pytest.approx(68, abs=4)
    assert mean_query_position(0.01) < 55


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(seq_len=64, pairs=17), "needs seq_len >= 4 x pairs = 68"),
        (dict(vocab_size=16, pairs=8), "needs vocab_size >= 18"),
        (dict(pairs=0), "at least one key-value pair"),
        (dict(pairs=4, queries=3), "between 4 and 28 queries"),
        (dict(pairs=4, queries=29), "between 4 and 28 queries"),
        (dict(power_a=0.0), "power_a must be positive"),
    ],
)
def test_mqar_refuses_impossible_settings(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        MQARConfig(**kwargs)


def test_mqar_batch_checks_a_config_changed_after_it_was_built():
    cfg = MQARConfig()
    cfg.pairs = 40
    with pytest.raises(ConfigError, match="seq_len >= 4 x pairs"):
        batch(cfg)


def one_hot_logits(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.clamp(min=0), vocab).float()


def test_mqar_accuracy_oracle_and_chance():
    cfg = MQARConfig(vocab_size=64, seq_len=64, pairs=4)

    def oracle(input_ids):
        return one_hot_logits(bound_values(input_ids, cfg.pairs), cfg.vocab_size)

    guesses = torch.Generator().manual_seed(7)

    def guesser(input_ids):  # a uniformly random value token everywhere
        lo, hi = cfg.value_range
        return one_hot_logits(torch.randint(lo, hi, input_ids.shape, generator=guesses), 64)

    def wrong(input_ids):  # the key itself: never a value
        return one_hot_logits(input_ids, cfg.vocab_size)

    def gen():  # the same held-out batches for each stand-in
        return torch.Generator().manual_seed(3)

    assert mqar_accuracy(oracle, cfg, 4, 32, gen()) == 1.0
    assert mqar_accuracy(wrong, cfg, 4, 32, gen()) == 0.0
    chance = 1 / (cfg.value_range[1] - cfg.value_range[0])  # 1/32; 4096 queries below
    assert mqar_accuracy(guesser, cfg, 32, 32, gen()) == pytest.approx(chance, abs=0.012)


def test_mqar_recall_end_to_end():
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, linear_mixer="gla", layer_pattern="LF")
    mqar = MQARConfig(vocab_size=16, seq_len=16, pairs=2)
    threads = torch.get_num_threads()
    kwargs = dict(steps=3, batch_size=4, lr=1e-3, seed=0, eval_batches=2, threads=1, width=0)
    first = mqar_recall(model, mqar, **kwargs)
    assert set(first) == {"recall", "loss", "seconds", "steps"}
    assert 0.0 <= first["recall"] <= 1.0 and first["steps"] == 3 and first["seconds"] > 0
    assert torch.isfinite(torch.tensor(first["loss"]))
    assert torch.get_num_threads() == threads  # restored
    again = mqar_recall(model, mqar, **kwargs)  # deterministic given the seed
    assert (again["recall"], again["loss"]) == (first["recall"], first["loss"])
    other = mqar_recall(model, mqar, **{**kwargs, "seed": 1})
    assert other["loss"] != first["loss"]
    assert model.vocab_size == 4096  # the caller's config is left as it was


def test_the_probe_keeps_the_pattern_and_head_size_at_its_own_width():
    model = ModelConfig(
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        d_ff=1536,
        linear_mixer="gated_deltanet",
        layer_pattern="LLLF",
    )
    probe = probe_config(model, vocab_size=16, width=128)
    assert (probe.d_model, probe.n_heads, probe.kv_heads, probe.d_ff) == (128, 2, 2, 384)
    assert (probe.pattern, probe.linear_mixer, probe.n_layers) == (
        model.pattern,
        "gated_deltanet",
        8,
    )
    assert probe.vocab_size == 260  # the floor ModelConfig accepts; rows past 16 go unused
    narrow = probe_config(model, vocab_size=16, width=64)  # one head, GQA group of 4 too wide
    assert (narrow.d_model, narrow.n_heads, narrow.kv_heads) == (64, 1, 1)
    assert probe_config(model, 16, width=0).d_model == 512  # 0: the run's own width
    with pytest.raises(ConfigError, match="probe's width must be positive"):
        probe_config(model, 16, width=-64)


def test_the_mqar_source_shares_one_global_batch_over_the_ranks_and_resumes():
    """dp ranks take consecutive rows of the batch one rank would draw alone, in
    micro-batches; a source restored from a state goes on with the same batches."""
    from hylas.train.experiments.mqar import MQARSource

    task = MQARConfig()
    whole = MQARSource(task, 8, torch.Generator().manual_seed(5)).next_micro_batches(1)[0]
    for world in (2, 4):
        parts = [
            MQARSource(task, 8, torch.Generator().manual_seed(5), r, world).next_micro_batches(2)
            for r in range(world)
        ]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([m[key] for p in parts for m in p]), whole[key])
    source = MQARSource(task, 8, torch.Generator().manual_seed(5))
    source.next_micro_batches(1)
    state = source.state_dict()
    later = source.next_micro_batches(1)[0]
    resumed = MQARSource(task, 8, torch.Generator().manual_seed(99))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_micro_batches(1)[0]["input_ids"], later["input_ids"])


def test_the_probe_trains_as_a_plain_torch_loop_would():
    """The reference: the same model, batches and optimizer settings, stepped by hand with
    torch's AdamW and the trainer's schedule (fp32, one process). The trainer's run of the
    probe matches it (the last loss to 1e-6, relative; on this CPU bit for bit)."""
    from hylas.model.decoder import HylasLM
    from hylas.train.experiments import recall
    from hylas.train.loss import lm_loss
    from hylas.train.optim import lr_at, param_groups

    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, linear_mixer="gla", layer_pattern="LF")
    task, steps, seed = MQARConfig(vocab_size=16, seq_len=16, pairs=2), 6, 3
    got = mqar_recall(model, task, steps=steps, batch_size=4, seed=seed, width=0, eval_batches=2)

    run = recall.probe_run(model, task, steps, 4, recall.LR, seed, 0, None, "unused")
    net = HylasLM(run.model, "auto", seed=seed).train()
    opt = torch.optim.AdamW(param_groups(net, recall.WEIGHT_DECAY), lr=recall.LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(2 * seed)
    for step in range(steps):
        input_ids, labels = mqar_batch(task, 4, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, run.train)
        loss = lm_loss(net, net(input_ids), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), recall.GRAD_CLIP)
        opt.step()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
