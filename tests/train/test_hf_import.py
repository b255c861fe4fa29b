"""``hylas import-hf``: a stock Llama (built here from a config with random weights, with a
Hugging Face tokenizer directory) imported gives the Llama's logits; imported as a hybrid
(``LLLF``) its copied weights are the Llama's and it trains with falling loss; export then
import is the identity on weights; what Hylas cannot express is refused by name."""

import json
import logging
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hylas.data.prepare import prepare_embedded_corpus
from hylas.data.tokenizer import Tokenizer
from hylas.model.decoder import HylasLM
from hylas.train.checkpoint import load_model_weights, open_checkpoint
from hylas.train.cli import main
from hylas.train.config import load_config
from hylas.train.hf.export import export
from hylas.train.hf.importer import ImportRefused, import_hf
from hylas.train.trainer import TrainError, train
from tests.helpers import assert_close

CORPUS = Path(__file__).parents[2] / "data" / "corpus" / "shakespeare.jsonl.xz"
TOL = 1e-5  # fp32: relative RMS error of the logits


def make_llama(out: Path, tokenizer: Tokenizer, **overrides) -> LlamaForCausalLM:
    """A small random Llama 3 (GQA, llama3 RoPE scaling, untied head) saved with the
    tokenizer's Hugging Face files: the shape of a downloaded Llama-3-style folder."""
    kw = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,  # positions below and above it are tested
        },
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():  # norms away from one, so a misplaced norm weight shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    tokenizer.save_hf(out)
    return model.eval()


def continued_pretraining(ckpt: Path, data: Path, run: Path) -> list[str]:
    """The overrides of a short run started from an imported checkpoint on prepared data."""
    return [
        f"train.init_from={ckpt}",
        f"data.path={data}",
        "train.steps=8",
        "train.warmup_steps=2",
        "train.batch_size=8",
        "train.seq_len=128",
        "train.eval_batches=2",
        "train.dtype=float32",
        f"train.out_dir={run}",
    ]


@pytest.fixture(scope="module")
def sp_tokenizer() -> Tokenizer:
    return Tokenizer.load(prepare_embedded_corpus(4096)[0])


@pytest.fixture(scope="module")
def llama(tmp_path_factory, sp_tokenizer):
    """(folder, the transformers model): its tokenizer is a Hugging Face directory."""
    folder = tmp_path_factory.mktemp("llama") / "llama"
    model = make_llama(folder, sp_tokenizer)
    assert not (folder / "tokenizer.model").exists()
    return folder, model


def hylas_model(ckpt_dir: Path) -> HylasLM:
    ckpt = open_checkpoint(ckpt_dir)
    model = HylasLM(ckpt.config.model, kernel_backend="torch")
    load_model_weights(ckpt, model)
    return model.eval()


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 80), generator=torch.Generator().manual_seed(1))


def test_an_imported_llama_gives_the_llamas_logits(tmp_path, llama):
    folder, reference = llama
    assert main(["import-hf", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.model.pattern == "FFFF" and ckpt.config.model.kv_heads == 2
    assert ckpt.config.model.rope_scaling.kind == "llama3"
    assert ckpt.tokenizer().kind == "huggingface"
    ids = sample_ids(reference.config.vocab_size)
    with torch.no_grad():
        assert_close(hylas_model(tmp_path / "ckpt")(ids).logits, reference(ids).logits, TOL)


def test_a_llama_imported_as_a_hybrid_keeps_its_weights_and_trains(tmp_path, llama, caplog):
    folder, reference = llama
    out = tmp_path / "hybrid"
    with caplog.at_level(logging.INFO, logger="hylas"):
        import_hf(folder, out, ["model.layer_pattern=LLLF", "model.linear_mixer=gated_deltanet"])
    fresh = next(r.message for r in caplog.records if "started as Hylas initialises" in r.message)
    for part in ("mixer.g_proj.weight", "mixer.A_log", "mixer.q_conv.weight", "mixer.b_proj"):
        assert part in fresh
    assert "q_proj" not in fresh and "ffn" not in fresh and "embed" not in fresh

    hybrid = hylas_model(out)
    assert open_checkpoint(out).config.model.pattern == "LLLF"
    theirs = reference.state_dict()
    mine = hybrid.state_dict()
    V = reference.config.vocab_size
    assert torch.equal(mine["embed.weight"][:V], theirs["model.embed_tokens.weight"])
    assert torch.equal(mine["lm_head.weight"][:V], theirs["lm_head.weight"])
    for i in range(4):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for a, b in [
            ("input_layernorm", "mixer_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "ffn.gate_proj"),
            ("mlp.down_proj", "ffn.down_proj"),
            ("self_attn.q_proj", "mixer.q_proj"),
            ("self_attn.o_proj", "mixer.o_proj"),
        ]:
            assert torch.equal(mine[f"{dst}{b}.weight"], theirs[f"{src}{a}.weight"]), (i, a)
        # grouped-query: 2 key/value heads of 16 serve 4 heads, each repeated twice in the
        # linear layers; the softmax layer (3) keeps its 2 as they are
        for proj in ("k_proj", "v_proj"):
            kv = theirs[f"{src}self_attn.{proj}.weight"]
            heads = kv.view(2, 16, 64)
            expected = kv if i == 3 else torch.cat([heads[0], heads[0], heads[1], heads[1]])
            assert torch.equal(mine[f"{dst}mixer.{proj}.weight"], expected), (i, proj)

    # Continue pretraining on data tokenized with the Llama's own tokenizer.
    data = tmp_path / "data"
    prepare = ["data", "prepare", "--input", str(CORPUS), "--tokenizer", str(folder)]
    assert main([*prepare, "--out", str(data), "--workers", "1"]) == 0
    overrides = continued_pretraining(out, data, tmp_path / "run")
    cfg = load_config("tiny", overrides)
    from hylas.train.cli.run import with_model_of_checkpoint

    result = train(with_model_of_checkpoint(cfg, overrides))
    assert result.last_eval_loss < result.first_eval_loss - 0.3


def test_export_then_import_is_the_identity_on_weights(tmp_path):
    from tests.train.test_training import FAST

    run = train(
        load_config(
            "tiny",
            [
                *FAST,
                "train.steps=2",
                "model.d_model=64",
                "model.n_layers=4",
                f"train.out_dir={tmp_path}",
            ],
        )
    )
    export(run.checkpoint, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    before = safetensors.torch.load_file(str(run.checkpoint / "model.safetensors"))
    after = safetensors.torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (
        open_checkpoint(tmp_path / "back").config.model
        == open_checkpoint(run.checkpoint).config.model
    )
    # the export carries Hylas's own tokenizer files, so the import has the very same one
    # and a run from it takes the data the original was trained on
    mine, theirs = open_checkpoint(tmp_path / "back").tokenizer(), run_tokenizer(run)
    assert (
        (mine.kind, mine.sha256) == (theirs.kind, theirs.sha256) == ("sentencepiece", mine.sha256)
    )
    # an imported checkpoint holds no training state: resuming it is refused in words
    with pytest.raises(TrainError, match="imported model with no training state"):
        train(
            load_config("tiny", [*FAST, f"train.out_dir={tmp_path / 'r'}"]),
            resume=tmp_path / "back",
        )


def run_tokenizer(run) -> Tokenizer:
    return open_checkpoint(run.checkpoint).tokenizer()


def test_a_checkpoint_of_another_tokenizer_cannot_start_a_run(tmp_path, llama):
    folder, _ = llama
    import_hf(folder, tmp_path / "ckpt")
    overrides = [f"train.init_from={tmp_path / 'ckpt'}", f"train.out_dir={tmp_path / 'run'}"]
    from hylas.train.cli.run import with_model_of_checkpoint

    cfg = with_model_of_checkpoint(load_config("tiny", overrides), overrides)
    with pytest.raises(TrainError, match="trained with another tokenizer than the data's"):
        train(cfg)  # the embedded corpus is tokenized with Hylas's sentencepiece model


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention_bias=True), "attention_bias is true"),
        (dict(mlp_bias=True), "mlp_bias is true"),
        (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
        (dict(head_dim=32), "head_dim is 32 while hidden_size / num_attention_heads is 16"),
        (
            dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
            "RoPE type 'linear'",
        ),
    ],
    ids=["attention-bias", "mlp-bias", "gelu", "head-dim", "rope-linear"],
)
def test_llama_variants_hylas_cannot_express_are_refused(tmp_path, sp_tokenizer, change, message):
    folder = tmp_path / "llama"
    make_llama(folder, sp_tokenizer, **change)
    with pytest.raises(ImportRefused, match=re.escape(message)):
        import_hf(folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # nothing half-written


def test_bad_imports_are_refused_in_one_sentence(tmp_path, llama, capsys):
    folder, _ = llama
    cases = [
        ([str(tmp_path)], f"{tmp_path} is not a Hugging Face model directory (no config.json)"),
        ([str(folder), "--set", "train.lr=1"], "import-hf takes model.* settings only"),
        (
            [
                str(folder),
                "--set",
                "model.layer_pattern=LF",
                "model.linear_mixer=gla",
                "model.linear_head_k=8",
            ],
            "blocks.0.mixer.k_proj.weight is [64, 64] there but [32, 64]",
        ),
    ]
    for args, message in cases:
        assert main(["import-hf", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("hylas: error: ") and message in err[-1], err
        assert not any("Traceback" in line for line in err)
        assert not (tmp_path / "out").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ImportRefused, match="model_type 'gpt2' is not one Hylas imports"):
        import_hf(other, tmp_path / "out")


@pytest.mark.parametrize(
    "model, arch",
    [
        (["model.attention.qk_norm=false"], "LlamaForCausalLM"),
        (["model.attention.qk_norm=true"], "Qwen3ForCausalLM"),
        (
            ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=32"],
            "MixtralForCausalLM",
        ),
        (
            ["model.attention.qk_norm=true", "model.moe.num_experts=4", "model.moe.pattern=DM"],
            "Qwen3MoeForCausalLM",
        ),
    ],
    ids=["llama", "qwen3", "mixtral", "qwen3-moe"],
)
def test_stock_exports_import_back_to_the_same_model(tmp_path, model, arch):
    from tests.train.test_training import FAST

    small = ["model.layer_pattern=F", "model.d_model=64", "model.n_layers=2", "model.n_heads=2"]
    overrides = [*FAST, "train.steps=1", "train.warmup_steps=0", "train.eval_batches=0"]
    overrides += [*small, *model]
    run = train(load_config("tiny", [*overrides, f"train.out_dir={tmp_path / 'run'}"]))
    assert export(run.checkpoint, tmp_path / "hf")["architecture"] == arch
    import_hf(tmp_path / "hf", tmp_path / "back")
    original, back = hylas_model(run.checkpoint), hylas_model(tmp_path / "back")
    cfg = open_checkpoint(tmp_path / "back").config.model
    assert (cfg.pattern, cfg.ffn_pattern) == (original.cfg.pattern, original.cfg.ffn_pattern)
    ids = sample_ids(original.cfg.vocab_size)
    with torch.no_grad():
        assert_close(back(ids).logits, original(ids).logits, TOL, arch)
