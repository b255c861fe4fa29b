"""``hylas eval recall``: prompts of exactly the context with every pair once, scoring that
an oracle passes and guessing fails, and the command end to end on a tiny checkpoint."""

import json
import random
import re
import shutil

import pytest

from hylas.data.prepare import prepare_embedded_corpus, write_prepared
from hylas.data.tokenizer import Tokenizer, train_tokenizer
from hylas.train.cli import main
from hylas.train.config import load_config
from hylas.train.experiments.eval_recall import (
    ASK,
    PAIR,
    build_samples,
    held_out_filler,
    is_exact,
    probe_accuracy,
)
from hylas.train.trainer import train


@pytest.fixture(scope="module")
def corpus():
    """The tiny recipe's tokenizer and held-out filler (the embedded corpus)."""
    tokenizer = Tokenizer.load(prepare_embedded_corpus(4096)[0])
    return tokenizer, held_out_filler(load_config("tiny"), tokenizer)


def occurrences(haystack: list[int], needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if haystack[i : i + n] == needle]


def test_filler_is_held_out_text_without_document_ends(corpus):
    tokenizer, filler = corpus
    assert len(filler) > 50_000
    assert tokenizer.eos_id not in set(filler.tolist())


@pytest.mark.parametrize("context", [128, 300, 1024])
def test_every_prompt_fills_the_context_and_holds_each_pair_once(corpus, context):
    tokenizer, filler = corpus
    samples = build_samples(tokenizer, filler, context, 4, 12, seed=1)
    assert len(samples) == 12
    for s in samples:
        assert len(s.prompt_ids) == context
        keys = [k for k, _ in s.pairs]
        values = [v for _, v in s.pairs]
        assert len(set(keys)) == 4 and len(set(values)) == 4
        assert all(re.fullmatch(r"[1-9]\d{3}", v) for v in values)
        assert (s.key, s.answer) in s.pairs
        question = tokenizer.encode(ASK.format(key=s.key))
        assert s.prompt_ids[-len(question) :] == question
        before = s.prompt_ids[: -len(question)]
        starts = []
        for k, v in s.pairs:
            found = occurrences(before, tokenizer.encode(PAIR.format(key=k, value=v)))
            assert len(found) == 1, (k, v)
            starts.append(found[0])
        assert starts == sorted(starts)  # in the order recorded
        # spread: the filler before pair j is within the j-th quarter of the filler
        pair_len = [len(tokenizer.encode(PAIR.format(key=k, value=v))) for k, v in s.pairs]
        n_filler = context - sum(pair_len) - len(question)
        for j, start in enumerate(starts):
            filler_before = start - sum(pair_len[:j])
            assert j * n_filler / 4 - 1 <= filler_before <= (j + 1) * n_filler / 4 + 1
        # read back as text: the asked key appears in its pair and in the question only
        text = tokenizer.decode(s.prompt_ids)
        assert text.endswith(f"\nThe number of {s.key} is")
        assert text.count(f"The number of {s.key} is {s.answer}.\n") == 1
        assert text.count(f"The number of {s.key} is") == 2
        number = tokenizer.encode(ASK.format(key=s.key) + f" {s.answer}")[len(question) :]
        assert len(number) == s.answer_tokens and tokenizer.decode(number) == f" {s.answer}"


def test_samples_are_drawn_from_the_seed_alone(corpus):
    tokenizer, filler = corpus
    a = build_samples(tokenizer, filler, 256, 4, 8, seed=3)
    assert a == build_samples(tokenizer, filler, 256, 4, 8, seed=3)
    other = build_samples(tokenizer, filler, 256, 4, 8, seed=4)
    assert [s.pairs for s in a] != [s.pairs for s in other]
    longer = build_samples(tokenizer, filler, 1024, 4, 8, seed=3)
    assert [(s.pairs, s.key) for s in a] == [(s.pairs, s.key) for s in longer]
    assert len({s.key for s in a}) > 1 and len({s.pairs[0] for s in a}) > 1


def test_contexts_too_short_and_filler_too_small_are_refused(corpus):
    tokenizer, filler = corpus
    with pytest.raises(ValueError, match="too short for 4 key-value pairs and the question"):
        build_samples(tokenizer, filler, 40, 4, 2, seed=0)
    with pytest.raises(ValueError, match="held-out text holds 50 tokens"):
        build_samples(tokenizer, filler[:50], 1024, 4, 2, seed=0)
    with pytest.raises(ValueError, match="number of pairs"):
        build_samples(tokenizer, filler, 1024, 0, 2, seed=0)


def look_up(tokenizer, offset: int = 0, extra: str = ""):
    """A stand-in model reading the prompt as text: the value of the asked key (or, with
    ``offset``, of the pair that many places after it), then ``extra``."""

    def answer(prompt_ids, max_new_tokens):
        text = tokenizer.decode(prompt_ids)
        key = text.rsplit("\n", 1)[1].removeprefix("The number of ").removesuffix(" is")
        pairs = re.findall(r"The number of (\w+) is (\d{4})\.", text)
        at = [k for k, _ in pairs].index(key)
        value = pairs[(at + offset) % len(pairs)][1]
        return tokenizer.encode(f" {value}{extra}.")[:max_new_tokens]

    return answer


def test_the_probe_scores_exact_answers_only(corpus):
    tokenizer, filler = corpus
    samples = build_samples(tokenizer, filler, 256, 4, 40, seed=0)
    decode = tokenizer.decode
    assert probe_accuracy(look_up(tokenizer), samples, decode) == 1.0
    assert probe_accuracy(look_up(tokenizer, offset=1), samples, decode) == 0.0
    assert probe_accuracy(look_up(tokenizer, extra="7"), samples, decode) == 0.0

    rng = random.Random(0)
    guess = lambda ids, n: tokenizer.encode(f" {rng.randrange(1000, 10000)}.")[:n]  # noqa: E731
    many = build_samples(tokenizer, filler, 128, 4, 300, seed=0)
    assert probe_accuracy(guess, many, decode) <= 0.01  # chance is 1/9000

    assert is_exact("4821.", "4821") and is_exact(" 4821\n", "4821")
    for wrong in ("48210", "482", "\n4821", "x4821", " 1234"):
        assert not is_exact(wrong, "4821")


def test_filler_from_data_prepared_with_another_tokenizer_is_reencoded(corpus, tmp_path):
    tokenizer, filler = corpus
    text = tokenizer.decode(filler[:20_000].tolist())
    other = train_tokenizer([text], 512, tmp_path / "tok")
    documents = [(text[:5000], True), (text[5000:9000], True), (text[9000:], False)]
    write_prepared(documents, other, tmp_path / "data", progress=False)
    got = held_out_filler(load_config("tiny"), tokenizer, tmp_path / "data")
    assert tokenizer.decode(got.tolist()) == tokenizer.decode(
        tokenizer.encode(text[:5000]) + tokenizer.encode(text[5000:9000])
    )
    write_prepared([(text, False)], other, tmp_path / "no_val", progress=False)
    with pytest.raises(ValueError, match="has no held-out split"):
        held_out_filler(load_config("tiny"), tokenizer, tmp_path / "no_val")


def test_command_line_probes_a_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    # the tiny recipe, narrower (its decoding takes about a second a prompt on 2 cores)
    fast = ["model.d_model=64", "model.n_heads=2", "train.steps=2", "train.warmup_steps=1"]
    fast += ["train.batch_size=4", "train.seq_len=128", "train.eval_batches=0"]
    fast += [f"train.out_dir={tmp_path / 'run'}"]
    run = train(load_config("tiny", fast)).run_dir
    out = tmp_path / "recall.json"
    probe = ["eval", "recall", "--checkpoint", str(run), "--samples", "2"]
    assert main([*probe, "--contexts", "96,128", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "near 0" in printed and re.search(r"\n\s+128\s+2\s+\d\.\d{3}\n", printed)
    report = json.loads(out.read_text())
    assert report["step"] == 2 and report["pairs"] == 4
    assert [(r["context"], r["samples"]) for r in report["results"]] == [(96, 2), (128, 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["results"])
    assert not list(tmp_path.glob(".recall.json-*"))  # the temporary file was renamed

    imported = tmp_path / "imported"
    shutil.copytree(run / "checkpoints" / "step_000002", imported)
    manifest = json.loads((imported / "manifest.json").read_text())
    (imported / "manifest.json").write_text(json.dumps({**manifest, "imported": {}}))

    refusals = [
        (["--contexts", "128,abc"], "--contexts must be positive integers"),
        (["--contexts", "0"], "--contexts must be positive integers"),
        (["--contexts", "32"], "a context of 32 tokens is too short"),
        (["--samples", "0"], "--samples must be positive"),
        (["--out", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["--data", str(tmp_path / "nothing")], "is missing"),
        (["--checkpoint", str(tmp_path / "nothing")], "does not exist"),
        (["--checkpoint", str(imported)], "was imported, not trained"),
    ]
    for extra, message in refusals:
        assert main([*probe, "--contexts", "128", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("hylas: error: ") and message in err, (extra, err)
        assert err.count("\n") == 1
