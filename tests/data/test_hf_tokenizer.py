"""A Hugging Face tokenizer directory (a byte-level BPE trained here with the ``tokenizers``
library, laid out as Llama-3 ships one) everywhere Hylas takes a tokenizer: encoding,
``hylas data prepare``, the training checks, checkpoints, ``hylas generate`` and the files
an export writes; ``transformers.AutoTokenizer`` is the reference throughout."""

import itertools
import json
import shutil

import numpy as np
import pytest

from hylas.data.corpus import load_corpus, split_corpus
from hylas.data.dataset import PreparedData
from hylas.data.prepare import prepare, text_hash
from hylas.data.sources import DataError, open_sources
from hylas.data.tokenizer import Tokenizer, file_sha256
from hylas.train.cli import main

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# Llama-3's pre-tokenizer split, before the byte-level mapping
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
    "  two leading spaces,\ttabs,\n\n\nblank lines and trailing space  ",
    "Unicode: wörld, naïve café, 東京, emoji 🙂, control \x01 char, \r\n line ends",
    "digits 1234567890 and CAPS; I'll say <s> and " + EOS + " typed as text",
    "",
]
HF_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 500-id byte-level BPE with Llama-3's split, BOS added by its post-processor, no pad
    token, written as tokenizer.json + tokenizer_config.json + special_tokens_map.json beside
    a model's other files (which Hylas must not copy)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([w.text[:40_000] for w in load_corpus()[:4]], trainer)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, hf.token_to_id(BOS))]
    )
    root = tmp_path_factory.mktemp("hf") / "model"
    root.mkdir()
    hf.save(str(root / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (root / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"weights, not a tokenizer file")
    return root


def with_config(src, dst, **changes):
    """A copy of the tokenizer files of ``src`` with ``changes`` made to its special tokens
    (None removes one), in tokenizer_config.json and special_tokens_map.json alike, as a
    model's own variants differ."""
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = {**json.loads((src / name).read_text()), **changes}
        (dst / name).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


def reference(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)  # HF_HUB_OFFLINE=1 in the conftest


def held_out_text() -> str:
    return split_corpus(load_corpus())[1][0].text[:20_000]


def test_encodes_and_decodes_as_auto_tokenizer(hf_dir, tmp_path):
    tok, ref = Tokenizer.load(hf_dir), reference(hf_dir)
    assert tok.kind == "huggingface" and tok.sha256 == file_sha256(hf_dir / "tokenizer.json")
    assert tok.vocab_size == len(ref) == 500
    assert tok.eos_id == ref.convert_tokens_to_ids(EOS) == ref.eos_token_id
    assert tok.bos_id == ref.convert_tokens_to_ids(BOS) == ref.bos_token_id
    assert ref.pad_token_id is None and tok.pad_id == tok.eos_id  # no pad token: eos pads
    texts = [*TEXTS, held_out_text()]
    for text in texts:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids, text[:40]
        assert ref(text)["input_ids"] == [tok.bos_id, *ids]  # what encode must not add
        assert tok.decode(ids) == ref.decode(ids)
    assert EOS in TEXTS[3] and tok.eos_id in tok.encode(TEXTS[3])  # as AutoTokenizer reads it
    assert tok.decode(tok.encode(texts[-1])) == texts[-1]
    assert tok.encode_batch(texts) == tok.encode_batch(texts, num_threads=1)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]

    padded = Tokenizer.load(with_config(hf_dir, tmp_path / "padded", pad_token=PAD))
    pad_id = ref.convert_tokens_to_ids(PAD)
    assert padded.pad_id == reference(tmp_path / "padded").pad_token_id == pad_id != tok.eos_id
    assert padded.describe() == {**tok.describe(), "pad_id": pad_id}


def test_the_directory_decides_the_kind_and_unusable_ones_are_refused(hf_dir, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {tmp_path}: it holds neither"):
        Tokenizer.load(tmp_path)
    no_eos = with_config(hf_dir, tmp_path / "no-eos", eos_token=None)
    with pytest.raises(ValueError, match=f"tokenizer in {no_eos} has no eos token"):
        Tokenizer.load(no_eos)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(ValueError, match=f"{broken} does not hold a readable Hugging Face"):
        Tokenizer.load(broken)
    # tokenizer.model beside tokenizer.json without Hylas's record: a Hugging Face directory,
    # as Llama-2 and Mistral ship theirs
    both = with_config(hf_dir, tmp_path / "both")
    shutil.copyfile(tokenizer.file, both / "tokenizer.model")
    assert Tokenizer.load(both).kind == "huggingface"
    hylas_own = Tokenizer.load(tokenizer.directory)  # both files too, and hylas_tokenizer.json
    assert hylas_own.kind == "sentencepiece"


@pytest.fixture(scope="module")
def documents():
    """40 documents of 1-3,000 characters cut from the corpus."""
    text = load_corpus()[9].text
    cuts = np.cumsum(np.random.default_rng(1).integers(1, 3_000, size=41))
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.fixture(scope="module")
def hf_prepared(tmp_path_factory, hf_dir, documents):
    """``hylas data prepare --tokenizer HF_DIR`` with two worker processes."""
    root = tmp_path_factory.mktemp("hf-prepared")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    args = ["data", "prepare", "--input", str(src), "--tokenizer", str(hf_dir)]
    args += ["--out", str(root / "out"), "--workers", "2", "--val-fraction", "0.2"]
    assert main(args) == 0
    return root / "out"


def test_prepare_writes_the_ids_of_auto_tokenizer(hf_prepared, hf_dir, documents):
    ref = reference(hf_dir)
    data = PreparedData(hf_prepared)
    for split, held in (("train", False), ("val", True)):
        want = [
            [*ref(t, add_special_tokens=False)["input_ids"], ref.eos_token_id]
            for t in documents
            if (text_hash(t) / 2**64 < 0.2) == held
        ]
        s = data.split(split)
        assert [s.document(d).tolist() for d in range(s.num_documents)] == want
    assert data.manifest["tokenizer"] == Tokenizer.load(hf_dir).describe()
    assert data.manifest["tokenizer"]["kind"] == "huggingface"
    assert sorted(p.name for p in data.tokenizer_dir.iterdir()) == HF_FILES  # no weights
    data.check_tokenizer(Tokenizer.load(data.tokenizer_dir))


def test_data_of_another_tokenizer_is_refused_across_kinds(
    hf_prepared, hf_dir, tokenizer, documents, tmp_path, capsys
):
    sp_prepared = tmp_path / "sp"
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents[:10]))
    prepare(open_sources([str(src)]), tokenizer, sp_prepared, val_fraction=0.2, progress=False)
    hf = Tokenizer.load(hf_dir)
    with pytest.raises(DataError, match=r"tokenizer\.json does not match the one .* prepared"):
        PreparedData(sp_prepared).check_tokenizer(hf)
    with pytest.raises(DataError, match=r"tokenizer\.model does not match the one .* prepared"):
        PreparedData(hf_prepared).check_tokenizer(tokenizer)
    # the same tokenizer.json, another eos (as a base and a chat model's configs differ)
    other_eos = Tokenizer.load(with_config(hf_dir, tmp_path / "eos", eos_token=PAD))
    assert other_eos.sha256 == hf.sha256
    says = f"ends documents with id {other_eos.eos_id}, but .* with eos {hf.eos_id}"
    assert other_eos.eos_id != hf.eos_id
    with pytest.raises(DataError, match=says):
        PreparedData(hf_prepared).check_tokenizer(other_eos)

    run = tmp_path / "run"
    base = ["train", "--set", "train.steps=2", "train.warmup_steps=1", f"train.out_dir={run}"]
    base += ["model.vocab_size=512"]
    assert main([*base, f"data.path={hf_prepared}", f"data.tokenizer={tokenizer.directory}"]) == 2
    assert "does not match the one" in capsys.readouterr().err
    assert main([*base, f"data.path={sp_prepared}", f"data.tokenizer={hf_dir}"]) == 2
    assert "does not match the one" in capsys.readouterr().err
    assert not run.exists()


def test_a_checkpoint_carries_the_tokenizer_and_generate_decodes_with_it(
    hf_prepared, hf_dir, tmp_path, capsys
):
    import torch

    from hylas.model.decoder import HylasLM
    from hylas.model.generation import generate
    from hylas.train.checkpoint import load_model_weights, open_checkpoint

    run = tmp_path / "run"
    fast = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=64"]
    fast += ["train.eval_batches=0", f"data.path={hf_prepared}", "model.vocab_size=512"]
    fast += ["model.d_model=64", "model.n_heads=2", "model.layer_pattern=LF"]
    assert main(["train", "--set", *fast, f"train.out_dir={run}"]) == 0
    capsys.readouterr()
    ckpt = open_checkpoint(run)  # checks every listed file's sha256
    assert sorted(p.name for p in (ckpt.path / "tokenizer").iterdir()) == HF_FILES
    for name in HF_FILES:
        digest = ckpt.manifest["files"][f"tokenizer/{name}"]
        assert digest == file_sha256(hf_dir / name) == file_sha256(ckpt.path / "tokenizer" / name)
    tok = ckpt.tokenizer()
    assert tok.kind == "huggingface" and tok.describe() == Tokenizer.load(hf_dir).describe()

    prompt = "ROMEO. But, soft!"
    generate_args = ["--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", "8"]
    assert main(["generate", *generate_args]) == 0
    sample = capsys.readouterr().out
    ref = reference(hf_dir)
    model = HylasLM(ckpt.config.model)
    load_model_weights(ckpt, model)
    model.eval()
    with torch.no_grad():
        ids = ref(prompt, add_special_tokens=False)["input_ids"]
        new = list(generate(model, ids, 8, stop_ids=(ref.eos_token_id,)))
    new = new[:-1] if new[-1] == ref.eos_token_id else new
    assert new and sample == prompt + ref.decode(new) + "\n"


def test_a_checkpoint_from_before_the_tokenizer_directory_opens_its_tokenizer_model(
    tokenizer, tmp_path
):
    from hylas.train.checkpoint import Checkpoint

    shutil.copyfile(tokenizer.file, tmp_path / "tokenizer.model")
    old = Checkpoint(tmp_path, {}, None).tokenizer()
    assert old.kind == "sentencepiece" and old.sha256 == tokenizer.sha256
    assert old.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_save_hf_tokenizer_gives_auto_tokenizer_the_same_ids(kind, tokenizer, hf_dir, tmp_path):
    tok = tokenizer if kind == "sentencepiece" else Tokenizer.load(hf_dir)
    out = tmp_path / "export"
    out.mkdir()
    names = tok.save_hf(out)
    assert sorted(names) == sorted(p.name for p in out.iterdir())
    if kind == "huggingface":
        assert sorted(names) == HF_FILES  # the tokenizer's files, not the model's
    ref = reference(out)
    assert (ref.eos_token_id, len(ref)) == (tok.eos_id, tok.vocab_size)
    for text in [*TEXTS, held_out_text()]:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), text[:40]
        assert ref.decode(ids) == tok.decode(ids)
