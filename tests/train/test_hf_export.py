"""``hylas export``: trained checkpoints as Hugging Face directories, reloaded in a fresh
process that can import torch and transformers but not Hylas (nor Triton), and compared
with Hylas's own model: logits, every greedy decoding step's logits and tokens, the
text-generation pipeline, and left-padded batches, for every mixer in the registry, for
MoE (softmax and sigmoid routers, with and without shared experts) and for each stock
transformers class an export may claim (Llama, Qwen3, Mixtral, Qwen3-MoE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hylas.data.corpus import load_corpus, split_corpus
from hylas.data.prepare import prepare, prepare_embedded_corpus
from hylas.data.sources import open_sources
from hylas.data.tokenizer import Tokenizer
from hylas.model.decoder import HylasLM
from hylas.model.generation import generate
from hylas.model.registry import mixer_registry
from hylas.train.checkpoint import CheckpointError, load_model_weights, open_checkpoint
from hylas.train.cli import main
from hylas.train.config import load_config
from hylas.train.hf.export import export
from hylas.train.hf.stock import stock_architecture
from hylas.train.trainer import train
from tests.helpers import rel_rms_error

WORKER = Path(__file__).with_name("hf_load_worker.py")

# A two-layer model trained for seconds: enough that greedy choices are not near-ties.
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.steps=60",
    "train.warmup_steps=2",
    "train.seq_len=64",
    "train.batch_size=4",
    "train.lr=5e-3",
    "train.eval_batches=1",
    "train.log_every=60",
    "train.dtype=float32",
]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]
LINEAR = sorted(n for n in mixer_registry() if n != "attention")

# name -> (overrides, the class the export must use)
EXPORTS: dict[str, tuple[list[str], str]] = {
    **{
        m: ([f"model.linear_mixer={m}", "model.layer_pattern=LF"], "HylasForCausalLM")
        for m in LINEAR
    },
    "attention": (["model.layer_pattern=F"], "LlamaForCausalLM"),
    "llama3_rope_gqa": (
        ["model.layer_pattern=F", "model.n_kv_heads=1", "model.rope_scaling.kind=llama3"],
        "LlamaForCausalLM",
    ),
    "attention_window": (
        ["model.layer_pattern=F", "model.attention.window=16"],
        "HylasForCausalLM",
    ),
    "qwen3_untied_gqa": (
        [
            "model.layer_pattern=F",
            "model.attention.qk_norm=true",
            "model.tie_embeddings=false",
            "model.n_kv_heads=1",
        ],
        "Qwen3ForCausalLM",
    ),
    "mixtral": (["model.layer_pattern=F", *MOE], "MixtralForCausalLM"),
    "qwen3_moe_first_dense": (
        ["model.layer_pattern=F", "model.attention.qk_norm=true", *MOE, "model.moe.first_dense=1"],
        "Qwen3MoeForCausalLM",
    ),
    "moe_shared_softmax": (
        ["model.layer_pattern=LF", *MOE, "model.moe.shared_experts=1"],
        "HylasForCausalLM",
    ),
    "moe_sigmoid": (
        ["model.layer_pattern=LF", *MOE, "model.moe.router=sigmoid"],
        "HylasForCausalLM",
    ),
    "moe_dense_mixed": (
        ["model.layer_pattern=F", *MOE, "model.moe.pattern=DM"],
        "HylasForCausalLM",
    ),
}
SHARDED = "gla"  # exported in shards of at most SHARD_SIZE, with an index
SHARD_SIZE = "200KB"
PROMPTS = ["COUNTESS.\nIn delivering", "LAFEU.\nHe was excellent indeed, madam; the"]
NEW_TOKENS = 12
LOGIT_TOL = 1e-5  # fp32, relative RMS error


@dataclass
class Export:
    """One trained checkpoint, its export, and Hylas's own answers for it."""

    run: Path
    hf: Path
    arch: str
    prompt_ids: list[list[int]]
    logits: torch.Tensor  # [2, 80, V]: of batch_ids()
    greedy: list[list[int]]  # hylas generate, per prompt
    steps: list[torch.Tensor]  # [new tokens, V] per prompt: each decoding step's logits
    expected_text: list[str]  # prompt + the decoded continuation
    eos: int


def batch_ids() -> torch.Tensor:
    """[2, 80]: past one 64-token chunk of the linear kernels and past the window."""
    return torch.randint(0, 4096, (2, 80), generator=torch.Generator().manual_seed(0))


def packed_data(root: Path) -> Path:
    """Twelve paragraphs of a training work (about 40 tokens each), prepared with the tiny
    recipe's tokenizer: every 64-token sample packs several documents, and a few steps
    teach a small model to continue them (greedy text that is not one token repeated)."""
    tok_dir, _ = prepare_embedded_corpus(4096)
    works, _ = split_corpus(load_corpus())
    paragraphs = [p for p in works[0].text.split("\n\n") if p.strip()]
    text = root / "scene.txt"
    text.write_text("\n\n".join(paragraphs[9:21]))  # from "COUNTESS.\nIn delivering my son"
    sources = open_sources([str(text)], split_documents="paragraph")
    prepare(sources, Tokenizer.load(tok_dir), root / "data", val_fraction=0.01, progress=False)
    return root / "data"


def train_packed(overrides: list[str]):
    """train(), checking that its batches were packed documents (cu_seqlens beyond the
    sample starts)."""
    documents_beyond_samples = []
    forward = HylasLM.forward

    def watching(self, input_ids, *args, **kwargs):
        cu = kwargs.get("cu_seqlens")
        if self.training:
            extra = 0 if cu is None else len(cu) - 1 - input_ids.shape[0]
            documents_beyond_samples.append(extra)
        return forward(self, input_ids, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HylasLM, "forward", watching)
        result = train(load_config("tiny", overrides))
    assert min(documents_beyond_samples) > 0, "a training batch without document boundaries"
    return result


@torch.no_grad()
def references(run: Path) -> dict:
    """What Hylas itself gives for the checkpoint in ``run`` (torch kernels)."""
    ckpt = open_checkpoint(run)
    tok = ckpt.tokenizer()
    model = HylasLM(ckpt.config.model, "torch")
    load_model_weights(ckpt, model)
    model.eval()
    ref = {"prompt_ids": [], "greedy": [], "steps": [], "expected_text": [], "eos": tok.eos_id}
    ref["logits"] = model(batch_ids()).logits
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        greedy = list(generate(model, ids, NEW_TOKENS, stop_ids=(tok.eos_id,)))
        # generate()'s own steps, kept: the prompt once, then one token at a time
        out, steps = model(torch.tensor([ids]), use_cache=True), []
        for token in greedy:
            steps.append(out.logits[0, -1])
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
        steps = torch.stack(steps)
        assert steps.argmax(-1).tolist() == greedy
        top2 = steps.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        # far above the fp32 differences between Hylas and an export (about 1e-6)
        assert margin > 1e-4, f"{run.name}: greedy choices near a tie ({margin:.1e})"
        shown = tok.decode(ids)
        ref["prompt_ids"].append(ids)
        ref["greedy"].append(greedy)
        ref["steps"].append(steps)
        ref["expected_text"].append(prompt + tok.decode(ids + greedy)[len(shown) :])
    return ref


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Export]:
    """Every EXPORTS entry trained, exported and answered for by Hylas, in this process."""
    root = tmp_path_factory.mktemp("hf_export")
    data = packed_data(root)
    done = {}
    for name, (overrides, _) in EXPORTS.items():
        run, hf = root / "runs" / name, root / "hf" / name
        result = train_packed([*SMALL, *overrides, f"data.path={data}", f"train.out_dir={run}"])
        shard = {"max_shard_size": SHARD_SIZE} if name == SHARDED else {}
        written = export(result.checkpoint, hf, **shard)
        done[name] = Export(run, hf, written["architecture"], **references(run))
    return done


@pytest.fixture(scope="module")
def reloaded(exports, tmp_path_factory) -> tuple[dict, dict, Path]:
    """One fresh process loads every export (hf_load_worker.py): its observations per
    export, what it imported, and the folder of its tensors."""
    root = tmp_path_factory.mktemp("hf_reload")
    job = {
        "out": str(root),
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "batch": batch_ids().tolist(),
        "exports": [
            {"name": n, "dir": str(e.hf), "remote": e.arch == "HylasForCausalLM"}
            for n, e in exports.items()
        ],
    }
    (root / "job.json").write_text(json.dumps(job))
    # a user's environment, less anything that points at Hylas or a warm Hugging Face cache
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(("HF_", "TRANSFORMERS_"))
    }
    env |= {
        "HF_HOME": str(root / "hf_home"),  # an empty modules cache
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, str(WORKER), str(root / "job.json")],
        cwd=root,  # not the repository: nothing of Hylas's importable from the working dir
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = {n: json.loads((root / f"{n}.json").read_text()) for n in exports}
    return seen, json.loads((root / "process.json").read_text()), root


def test_stock_architecture_claims_only_the_exact_matches():
    def arch(*overrides):
        return stock_architecture(load_config("tiny", list(overrides)).model)

    softmax, qk = "model.layer_pattern=F", "model.attention.qk_norm=true"
    assert arch(softmax)[0] == "LlamaForCausalLM"
    assert arch(softmax, "model.rope_scaling.kind=llama3")[0] == "LlamaForCausalLM"
    assert arch(softmax, qk)[0] == "Qwen3ForCausalLM"
    assert arch(softmax, *MOE)[0] == "MixtralForCausalLM"
    assert arch(softmax, qk, *MOE)[0] == "Qwen3MoeForCausalLM"
    assert arch(softmax, qk, *MOE, "model.moe.pattern=DM")[0] == "Qwen3MoeForCausalLM"
    refused = [
        ("linear layers", ["model.layer_pattern=LF"]),
        ("linear layers", ["model.layer_pattern=LLLF", qk]),
        ("a sliding window of 16", [softmax, "model.attention.window=16"]),
        ("a sliding window of 8", [softmax, qk, "model.attention.window=8"]),
        ("1 shared expert", [softmax, *MOE, "model.moe.shared_experts=1"]),
        ("2 shared expert", [softmax, qk, *MOE, "model.moe.shared_experts=2"]),
        ("a sigmoid router", [softmax, *MOE, "model.moe.router=sigmoid"]),
        ("a sigmoid router", [softmax, qk, *MOE, "model.moe.router=sigmoid"]),
        ("a capacity factor of 1.25", [softmax, *MOE, "model.moe.capacity_factor=1.25"]),
        ("dense and MoE layers mixed", [softmax, *MOE, "model.moe.first_dense=1"]),
        ("dense and MoE layers mixed", [softmax, *MOE, "model.moe.pattern=MD"]),
    ]
    for why, overrides in refused:
        name, reason = arch(*overrides)
        assert name is None and reason.startswith(why), (overrides, reason)


def test_each_export_uses_the_class_its_math_allows(exports):
    for name, e in exports.items():
        assert e.arch == EXPORTS[name][1], name
        config = json.loads((e.hf / "config.json").read_text())
        py_files = sorted(p.name for p in e.hf.glob("*.py"))
        assert config["architectures"] == [e.arch], name
        if e.arch == "HylasForCausalLM":
            assert config["model_type"] == "hylas"
            assert {"modeling_hylas.py", "configuration_hylas.py"} <= set(py_files), name
            assert config["auto_map"] == {
                "AutoConfig": "configuration_hylas.HylasConfig",
                "AutoModelForCausalLM": "modeling_hylas.HylasForCausalLM",
            }
        else:  # stock: nothing to trust
            assert "auto_map" not in config and py_files == [], name
        assert (e.hf / "tokenizer.json").is_file() and (e.hf / "README.md").is_file()
        generation = json.loads((e.hf / "generation_config.json").read_text())
        assert generation["eos_token_id"] == e.eos, name


@pytest.mark.integration
@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_reloads_without_hylas_and_gives_hylas_numbers(reloaded, exports, name):
    seen, _, tensors_dir = reloaded
    e, r = exports[name], seen[name]
    assert r["error"] is None, r["error"]
    remote = e.arch == "HylasForCausalLM"

    c = r["config"]
    if remote:
        assert c["model_type"] == "hylas" and c["class"].endswith(
            ".configuration_hylas.HylasConfig"
        )
        cfg = open_checkpoint(e.run).config.model
        assert c["mixer_pattern"] == cfg.pattern and c["ffn_pattern"] == cfg.ffn_pattern
        assert c["num_hidden_layers"] == cfg.n_layers == 2
        assert set(c["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert c["layer_types"] is None  # transformers' own field, not Hylas's L/F pattern
        assert r["model_class"].startswith("transformers_modules.")
        assert r["model_class"].endswith(".modeling_hylas.HylasForCausalLM")
    else:  # the mapping's claim, checked against transformers' own class
        family = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
        family |= {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
        module = f"transformers.models.{family[e.arch]}.modeling_{family[e.arch]}"
        assert r["model_class"] == f"{module}.{e.arch}"
        assert c["architectures"] == [e.arch] and c["auto_map"] is None
    assert r["dtype"] == "torch.float32"

    # the tokenizer: Hylas's ids, and nothing added by default (the pipeline relies on it)
    assert r["tokenizer"]["plain"] == e.prompt_ids
    assert r["tokenizer"]["default"] == e.prompt_ids
    assert r["tokenizer"]["bos_eos_pad"][1] == e.eos

    got = safetensors.torch.load_file(str(tensors_dir / f"{name}.safetensors"))
    assert rel_rms_error(got["logits"], e.logits) < LOGIT_TOL
    for i in range(len(PROMPTS)):
        assert r["greedy"][i] == e.greedy[i], f"prompt {i}"
        assert rel_rms_error(got[f"steps.{i}"], e.steps[i]) < LOGIT_TOL, f"prompt {i}"
        assert r["pipeline"][i] == e.expected_text[i], f"prompt {i}"

    # left-padded batch: each row as alone (up to its end of sequence)
    b = r["batched"]
    assert b["left_padded"] and sorted(b["pads"])[0] == 0 and max(b["pads"]) > 0
    for i, row in enumerate(b["new"]):
        n = len(e.greedy[i])
        assert row[:n] == e.greedy[i], f"row {i}"
        assert rel_rms_error(got["batched_steps"][i, :n], e.steps[i]) < LOGIT_TOL, f"row {i}"


@pytest.mark.integration
def test_the_fresh_process_ran_without_hylas_or_triton(reloaded):
    _, process, _ = reloaded
    assert process["hylas_modules"] == []
    assert "hylas" in process["refused"]  # the wrapper looked for an installed Hylas; refused
    bundled = set(process["bundled_modules"])
    assert {"modeling_hylas", "configuration_hylas", "hylas_model_decoder"} <= bundled
    assert not {m for m in bundled if "triton" in m}


def test_sharded_export_has_an_index_and_every_weight(exports):
    e = exports[SHARDED]  # its logits after a reload: test_export_reloads_..._numbers[gla]
    shards = sorted(e.hf.glob("model-*.safetensors"))
    index = json.loads((e.hf / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and not (e.hf / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    stored = {}
    for p in shards:
        stored |= safetensors.torch.load_file(str(p))
    assert set(stored) == set(index["weight_map"])
    trained = safetensors.torch.load_file(str(open_checkpoint(e.run).path / "model.safetensors"))
    assert set(stored) == {f"model.{k}" for k in trained}
    assert all(torch.equal(stored[f"model.{k}"], v) for k, v in trained.items())


def test_cli_export_bfloat16(exports, tmp_path, capsys):
    e = exports["attention"]
    out = tmp_path / "bf16"
    argv = ["export", "--checkpoint", str(e.run), "--out", str(out), "--dtype", "bfloat16"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"to {out} as LlamaForCausalLM" in said and "trust_remote_code" not in said
    weights = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the same numbers, rounded: the fp32 export's embedding in bf16
    fp32 = safetensors.torch.load_file(str(e.hf / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert torch.equal(weights[name], fp32[name].to(torch.bfloat16))


def test_export_refuses_bad_input_and_leaves_nothing_behind(exports, tmp_path, capsys):
    ckpt = open_checkpoint(exports["attention"].run).path
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "readme.txt").write_text("no checkpoint here")
    with pytest.raises(CheckpointError) as e:
        export(not_a_checkpoint, tmp_path / "out1")
    message = str(e.value)
    assert "is neither a checkpoint nor a run directory" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out1")
    assert (
        main(["export", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "o")]) == 2
    )
    assert "hylas: error: " in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export(ckpt, taken)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert (taken / "mine.txt").read_text() == "keep me"

    with pytest.raises(ValueError, match="--dtype must be one of"):
        export(ckpt, tmp_path / "out2", dtype="int8")
    # a failure inside the build (the weights written, then the disk full) removes it all
    building = []

    def disk_full(self, directory):
        building.append(sorted(p.name for p in Path(directory).iterdir()))
        raise OSError("No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(open_checkpoint(ckpt).tokenizer()), "save_hf", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export(ckpt, tmp_path / "out3")
    assert "model.safetensors" in building[0]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["notes", "taken"], "a temporary or partial directory was left behind"

    empty = tmp_path / "empty"  # an existing empty --out is taken
    empty.mkdir()
    assert export(ckpt, empty)["architecture"] == "LlamaForCausalLM"
    assert (empty / "config.json").is_file()
