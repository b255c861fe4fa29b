"""Multi-query associative recall (MQAR), the recall task of Zoology (Arora et al. 2023,
arXiv:2312.04927), generated on the fly from a ``torch.Generator``.

A sample of ``seq_len`` tokens starts with ``pairs`` key-value pairs, then a query region
in which every key comes back (once by default), in a random order, at even offsets
drawn from a power law that favours short gaps (as in real text, where a repeated bigram
is most likely soon after its first mention). Keys and values come from disjoint halves
of the vocabulary; token 0 fills the rest. With vocab_size 12, 2 pairs, seq_len 16::

    input_ids:  2    8    4    7    0    0    4    0    0    0    0    0    2    0    0    0
    labels:   -100 -100 -100 -100 -100 -100   7  -100 -100 -100 -100 -100   8  -100 -100 -100

The label at position t is the token that should follow input t (the next-token
convention of ``HylasLM``): at a query it is the value bound to that key, elsewhere -100.

Legend: B batch, T tokens, P pairs, Q queries, S query slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hylas.configs.base import IGNORE_INDEX, ConfigError

FILL_TOKEN = 0  # never a key or a value


@dataclass
class MQARConfig:
    """One MQAR task. The defaults are the ones ``hylas sweep`` measures recall with, sized
    for about a minute a run on 2 CPU cores (``hylas.train.experiments.recall`` says what they show)."""

    vocab_size: int = 16  # keys are [1, vocab/2), values [vocab/2, vocab)
    seq_len: int = 64
    pairs: int = 4  # key-value pairs per sample
    # Queries per sample; None = one per pair, every key once (Zoology). More than pairs:
    # every key once, the rest drawn uniformly from the keys (denser supervision per token).
    queries: int | None = None
    # Gap g (in query slots, 1-based) has probability ~ g ** (power_a - 1): 0.01 (Zoology's
    # default) puts most queries early; 1.0 is uniform over the query region.
    power_a: float = 0.01

    def __post_init__(self):
        self.validate()

    @property
    def key_range(self) -> tuple[int, int]:
        """[low, high) of the key tokens."""
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        """[low, high) of the value tokens."""
        return self.vocab_size // 2, self.vocab_size

    @property
    def n_queries(self) -> int:
        return self.pairs if self.queries is None else self.queries

    @property
    def query_slots(self) -> int:
        """Places a query can take: every other position after the pairs."""
        return (self.seq_len - 2 * self.pairs) // 2

    def validate(self) -> MQARConfig:
        if self.pairs < 1:
            raise ConfigError(f"MQAR needs at least one key-value pair, got pairs={self.pairs}")
        if self.seq_len < 4 * self.pairs:
            raise ConfigError(
                f"MQAR with {self.pairs} pairs needs seq_len >= 4 x pairs = {4 * self.pairs} "
                f"(the pairs, then a query slot and a gap per key), got seq_len={self.seq_len}"
            )
        n_keys = self.key_range[1] - self.key_range[0]
        if self.pairs > n_keys:
            raise ConfigError(
                f"MQAR with {self.pairs} distinct keys needs vocab_size >= {2 * self.pairs + 2} "
                f"(keys and values each take half, token 0 is filler), got {self.vocab_size}"
            )
        if self.queries is not None and not self.pairs <= self.queries <= self.query_slots:
            raise ConfigError(
                f"MQAR with {self.pairs} pairs in {self.seq_len} tokens takes between {self.pairs} "
                f"and {self.query_slots} queries (every key once, one per free pair of "
                f"positions), got queries={self.queries}"
            )
        if not self.power_a > 0:
            raise ConfigError(f"MQAR power_a must be positive, got {self.power_a}")
        return self


def mqar_batch(
    cfg: MQARConfig, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` fresh samples: (input_ids [B, T] int64, labels [B, T] int64), on the
    CPU, drawn from ``generator`` alone (the same generator state gives the same batch)."""
    cfg.validate()
    B, T, P, Q, S = batch_size, cfg.seq_len, cfg.pairs, cfg.n_queries, cfg.query_slots
    g = generator

    def distinct(low: int, high: int) -> torch.Tensor:
        """[B, P]: P different tokens of [low, high) per sample."""
        return torch.rand(B, high - low, generator=g).argsort(dim=1)[:, :P] + low

    keys_BP, values_BP = distinct(*cfg.key_range), distinct(*cfg.value_range)
    input_ids = torch.full((B, T), FILL_TOKEN, dtype=torch.int64)
    input_ids[:, 0 : 2 * P : 2] = keys_BP
    input_ids[:, 1 : 2 * P : 2] = values_BP

    # Which pair each query asks for: every pair once, then any pair; shuffled, since the
    # slots below come out of multinomial roughly in gap order.
    pair_BQ = torch.cat(
        [torch.arange(P).expand(B, P), torch.randint(P, (B, Q - P), generator=g)], 1
    )
    pair_BQ = pair_BQ.gather(1, torch.rand(B, Q, generator=g).argsort(dim=1))
    # Query slots without replacement under the power law.
    gap_S = torch.arange(1, S + 1, dtype=torch.float64)
    p_S = cfg.power_a * gap_S ** (cfg.power_a - 1)
    slot_BQ = torch.multinomial(p_S.expand(B, S), Q, replacement=False, generator=g)
    pos_BQ = 2 * P + 2 * slot_BQ
    input_ids.scatter_(1, pos_BQ, keys_BP.gather(1, pair_BQ))
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    labels.scatter_(1, pos_BQ, values_BP.gather(1, pair_BQ))
    return input_ids, labels


def mqar_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    mqar: MQARConfig,
    batches: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """The fraction of query positions where ``predict(input_ids [B, T]) -> logits [B, T, V]``
    puts its argmax on the bound value, over ``batches`` fresh batches from ``generator``."""
    hits = total = 0
    with torch.no_grad():
        for _ in range(batches):
            input_ids, labels = mqar_batch(mqar, batch_size, generator)
            guess = predict(input_ids).argmax(dim=-1).to(labels.device)
            at = labels != IGNORE_INDEX
            hits += int((guess[at] == labels[at]).sum())
            total += int(at.sum())
    return hits / total


class MQARSource:
    """MQAR as the trainer's batch source: each step a global batch of ``batch_size``
    fresh samples from ``generator``, of which dp rank r takes rows [r b, (r + 1) b) for
    b = batch_size / dp_size, so every layout trains on the same samples. Its state is the
    generator's, so a run resumes exactly."""

    def __init__(
        self,
        task: MQARConfig,
        batch_size: int,
        generator: torch.Generator,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if batch_size % dp_size:
            raise ConfigError(f"{batch_size} MQAR samples do not split over {dp_size} ranks")
        self.task, self.batch_size, self.generator = task.validate(), batch_size, generator
        self.per_rank, self.dp_rank = batch_size // dp_size, dp_rank

    def next_micro_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the next step, as ``n`` micro-batches of equal size."""
        if self.per_rank % n:
            raise ConfigError(f"{self.per_rank} samples do not split into {n} micro-batches")
        input_ids, labels = mqar_batch(self.task, self.batch_size, self.generator)
        mine = slice(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        size = self.per_rank // n
        return [
            {"input_ids": input_ids[mine][i : i + size], "labels": labels[mine][i : i + size]}
            for i in range(0, self.per_rank, size)
        ]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
