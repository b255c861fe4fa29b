"""``hylas eval recall``: a zero-shot in-context retrieval probe for a trained checkpoint.

Each sample is one prompt of exactly ``context`` tokens of the model's tokenizer: held-out
text of the data the model trained on (filler), with ``pairs`` key-value sentences spread
through it, one in each equal stretch of the filler, then a question for one of the keys::

    ...filler... \\nThe number of Alice is 4821.\\n ...filler... \\nThe number of Omar is 1307.\\n
    ...filler... \\nThe number of Alice is

The model decodes greedily a few tokens past the question (as many as the number takes,
plus one); the answer counts when the continuation starts with exactly that number (a
space before it allowed, no more digits after it). The accuracy is the fraction of samples
answered. Keys are distinct names and values distinct 4-digit numbers, so a guess is right
about once in 9000, and copying another pair's number scores nothing.

Everything is drawn from ``seed``: sample i has the same keys, values and question at
every context, only the filler around them grows. The measure needs a model that has
learned to look things up in its context, which comes with scale: models of the tiny
recipe's size read near 0 at every length, so a 0 there says nothing about the
architecture (``hylas sweep``'s MQAR recall, trained for the task, is the small-scale
measure).

The pieces are kept apart so they can be tested with stand-in models:
:func:`build_samples` (prompts and answers), :func:`probe_accuracy` (scoring any
``answer_fn``), :func:`held_out_filler` (the filler tokens), :func:`checkpoint_recall` (all of
it for a checkpoint).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock

from hylas.data.dataset import PreparedData
from hylas.data.prepare import cache_root, prepare_embedded_corpus
from hylas.data.tokenizer import Tokenizer
from hylas.train.checkpoint import atomic_write_text, load_model_weights, open_checkpoint

if TYPE_CHECKING:
    from hylas.model.decoder import HylasLM

log = logging.getLogger("hylas")

NAMES = (
    "Alice", "Omar", "Priya", "Hiroshi", "Fatima", "Lucas", "Ingrid", "Kwame", "Sofia",
    "Dmitri", "Mei", "Carlos", "Amara", "Henrik", "Leila", "Tomas", "Yuki", "Rafael",
    "Noor", "Elena", "Jamal", "Astrid", "Ravi", "Chloe", "Bruno", "Zainab", "Felix",
    "Greta", "Mateo", "Anika", "Oscar", "Nadia", "Victor", "Lina", "Samuel", "Ines",
    "Kenji", "Olga", "Pedro", "Hana", "Marcus", "Tara", "Emil", "Rosa", "Idris", "Vera",
)  # fmt: skip
QUESTION = "The number of {key} is"
PAIR = "\n" + QUESTION + " {value}.\n"  # each pair on a line of its own inside the filler
ASK = "\n" + QUESTION
ANSWER = re.compile(r"[ \t]*(\d+)")
CHANCE = 1 / 9000  # a uniform guess among the 4-digit numbers
DEFAULT_PAIRS = 4
# Enough held-out text that windows of the longest context rarely overlap, without reading
# a large held-out split whole.
FILLER_TOKENS = 1 << 20

AnswerFn = Callable[[list[int], int], list[int]]


@dataclass(frozen=True)
class Sample:
    """One probe: ``prompt_ids`` (exactly the context, ending with the question for
    ``key``), the number to give and how many tokens it takes after the question."""

    prompt_ids: list[int]
    key: str
    answer: str  # the 4 digits
    answer_tokens: int
    pairs: tuple[tuple[str, str], ...]  # (key, value) in the order they appear


def answer_ids(tokenizer: Tokenizer, key: str, value: str) -> tuple[list[int], int]:
    """(the question's ids, how many tokens its number adds after it). Refused if the
    tokenizer merges the question's last token with the number, as no question could be
    asked then without giving away part of the answer."""
    asked = tokenizer.encode(ASK.format(key=key))
    answered = tokenizer.encode(ASK.format(key=key) + f" {value}")
    if answered[: len(asked)] != asked:
        raise ValueError(
            f"the tokenizer joins {QUESTION.format(key=key)!r} with the number after it, "
            "so the question cannot be cut off before its answer"
        )
    return asked, len(answered) - len(asked)


def build_samples(
    tokenizer: Tokenizer,
    filler_ids: Sequence[int] | np.ndarray,
    context: int,
    n_pairs: int,
    count: int,
    seed: int,
) -> list[Sample]:
    """``count`` prompts of exactly ``context`` tokens: a window of ``filler_ids`` with
    ``n_pairs`` key-value sentences, pair k at a random point of the k-th equal stretch
    of the filler, then the question for one of them (chosen at random)."""
    if not 1 <= n_pairs <= len(NAMES):
        raise ValueError(f"the number of pairs must be from 1 to {len(NAMES)}, got {n_pairs}")
    filler = np.asarray(filler_ids, dtype=np.int64)
    samples = []
    for i in range(count):
        # One generator per sample, drawing the pairs first: sample i holds the same keys,
        # values and question at every context, so contexts differ only in the filler.
        rng = random.Random(f"hylas-recall/{seed}/{i}")
        keys = rng.sample(NAMES, n_pairs)
        values = [str(v) for v in rng.sample(range(1000, 10000), n_pairs)]
        asked = rng.randrange(n_pairs)
        pair_ids = [
            tokenizer.encode(PAIR.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)
        ]
        question, answer_tokens = answer_ids(tokenizer, keys[asked], values[asked])
        fixed = sum(map(len, pair_ids)) + len(question)
        if fixed > context:
            raise ValueError(
                f"a context of {context} tokens is too short for {n_pairs} key-value pairs "
                f"and the question, which take {fixed} tokens"
            )
        n_filler = context - fixed
        if n_filler > len(filler):
            raise ValueError(
                f"the held-out text holds {len(filler)} tokens, fewer than the {n_filler} "
                f"of filler a context of {context} tokens needs"
            )
        start = rng.randrange(len(filler) - n_filler + 1)
        window = filler[start : start + n_filler].tolist()
        bounds = [round(k * n_filler / n_pairs) for k in range(n_pairs + 1)]
        cuts = [rng.randint(bounds[k], bounds[k + 1]) for k in range(n_pairs)]
        prompt, at = [], 0
        for cut, ids in zip(cuts, pair_ids, strict=True):
            prompt += window[at:cut] + ids
            at = cut
        prompt += window[at:] + question
        assert len(prompt) == context
        samples.append(
            Sample(
                prompt,
                keys[asked],
                values[asked],
                answer_tokens,
                tuple(zip(keys, values, strict=True)),
            )
        )
    return samples


def is_exact(continuation: str, answer: str) -> bool:
    """The continuation gives ``answer`` and no other number: '4821.', ' 4821' count;
    '48210', '482', '\\n4821' do not."""
    found = ANSWER.match(continuation)
    return found is not None and found.group(1) == answer


def probe_accuracy(
    answer_fn: AnswerFn, samples: Sequence[Sample], decode: Callable[[list[int]], str]
) -> float:
    """The fraction of ``samples`` that ``answer_fn(prompt_ids, max_new_tokens) -> new ids``
    answers exactly. It is asked for one token more than the number takes, so a longer
    number shows."""
    if not samples:
        raise ValueError("the probe needs at least one sample")
    hits = 0
    for s in samples:
        continuation = answer_fn(s.prompt_ids, s.answer_tokens + 1)
        hits += is_exact(decode(continuation), s.answer)
    return hits / len(samples)


def model_answer_fn(model: HylasLM) -> AnswerFn:
    """Greedy decoding with the hybrid cache: one prefill, then a token a step."""
    from hylas.model.generation import generate

    def answer(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return list(itertools.islice(generate(model, prompt_ids, max_new_tokens), max_new_tokens))

    return answer


def safe_decode(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """Decode up to the first id outside the tokenizer (the embedding's padding rows,
    which an untrained model may pick): such a token ends the answer."""

    def decode(ids: list[int]) -> str:
        ids = list(itertools.takewhile(lambda i: 0 <= i < tokenizer.vocab_size, ids))
        return tokenizer.decode(ids)

    return decode


def held_out_filler(cfg, tokenizer: Tokenizer, data: str | Path | None = None) -> np.ndarray:
    """Token ids of the held-out split (documents in order, their EOS dropped, at most
    ``FILLER_TOKENS``) of ``data`` or else the prepared data ``cfg.data`` trained on, in
    ``tokenizer``'s ids. Data prepared with another tokenizer is decoded and re-encoded."""
    if data is not None:
        paths = [Path(data)]
    elif cfg.data.sources:
        paths = [Path(s.path) for s in cfg.data.sources]
    else:
        cache_root().mkdir(parents=True, exist_ok=True)
        with FileLock(cache_root() / ".prepare.lock"):  # as training does: one preparer
            paths = [prepare_embedded_corpus(cfg.model.vocab_size)[1]]
    parts, total = [], 0
    for path in paths:
        if not path.is_dir():
            raise ValueError(
                f"the prepared data {path} is missing, so there is no held-out text for filler "
                "(give another prepared directory with --data)"
            )
        # Not verified: the checksums would read the whole training split, and a damaged
        # shard makes worse filler, not a wrong model.
        prepared = PreparedData(path, verify=False)
        split = prepared.splits.get("val")
        if split is None or split.num_documents == 0:
            continue
        same = (prepared.tokenizer_info["sha256"], prepared.eos_id) == (
            tokenizer.sha256,
            tokenizer.eos_id,
        )
        theirs = None if same else Tokenizer.load(prepared.tokenizer_dir)
        for d in range(split.num_documents):
            doc = split.document(d)[:-1]  # its EOS: filler reads as one document
            ids = doc if theirs is None else tokenizer.encode(theirs.decode(doc.tolist()))
            parts.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if total >= FILLER_TOKENS:
                return np.concatenate(parts)[:FILLER_TOKENS]
    if not parts:
        raise ValueError(
            f"{', '.join(map(str, paths))} has no held-out split to draw filler from "
            "(prepared with --val-fraction 0?; give one that has with --data)"
        )
    return np.concatenate(parts)


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(c) for c in text.split(",")]
    except ValueError:
        contexts = []
    if not contexts or any(c <= 0 for c in contexts):
        raise ValueError(f"--contexts must be positive integers separated by commas, got {text!r}")
    return contexts


def checkpoint_recall(
    checkpoint: str | Path,
    contexts: Sequence[int],
    samples: int = 100,
    seed: int = 0,
    pairs: int = DEFAULT_PAIRS,
    data: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """Run the probe on a checkpoint (or a run directory's newest) at every context and
    return (and with ``out``, write atomically as JSON) the results."""
    from hylas.model.decoder import HylasLM

    if samples <= 0:
        raise ValueError(f"--samples must be positive, got {samples}")
    if out is not None and not Path(out).parent.is_dir():
        raise ValueError(f"cannot write {out}: the directory {Path(out).parent} does not exist")
    ckpt = open_checkpoint(checkpoint)
    if data is None and "imported" in ckpt.manifest:
        raise ValueError(
            f"{ckpt.path} was imported, not trained, so it names no held-out data; give a "
            "prepared directory with a held-out split with --data"
        )
    tokenizer = ckpt.tokenizer()
    filler = held_out_filler(ckpt.config, tokenizer, data)
    # Every prompt is built before the model runs: a context too short is refused at once.
    probes = {c: build_samples(tokenizer, filler, c, pairs, samples, seed) for c in contexts}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = HylasLM(ckpt.config.model, ckpt.config.kernels.backend)
    load_model_weights(ckpt, model)
    model.to(device).eval()
    answer_fn, decode = model_answer_fn(model), safe_decode(tokenizer)
    results = []
    for context, batch in probes.items():
        t0 = time.perf_counter()
        accuracy = probe_accuracy(answer_fn, batch, decode)
        log.info(
            "context %d: %d of %d answered (%.1fs)",
            context,
            round(accuracy * len(batch)),
            len(batch),
            time.perf_counter() - t0,
        )
        results.append({"context": context, "samples": len(batch), "accuracy": accuracy})
    report = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "pairs": pairs,
        "seed": seed,
        "chance": CHANCE,
        "results": results,
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [
        f"in-context recall of {report['checkpoint']} (step {report['step']}): "
        f"{report['pairs']} key-value pairs in held-out text, greedy, exact 4-digit answer",
        f"{'context':>8}  {'samples':>7}  {'accuracy':>8}",
    ]
    lines += [
        f"{r['context']:>8}  {r['samples']:>7}  {r['accuracy']:>8.3f}" for r in report["results"]
    ]
    lines.append(
        f"chance is {report['chance']:.4f}; models of the tiny recipe's size read near 0 "
        "here (in-context recall appears with scale)"
    )
    return "\n".join(lines)
