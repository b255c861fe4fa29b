"""End-to-end training on the embedded corpus: loss falls, checkpoints round-trip, resume
is exact, and the command line writes what it promises."""

import json

import pytest
import safetensors.torch
import torch

from hylas.model.decoder import HylasLM
from hylas.train.checkpoint import CheckpointError, load_model_weights, open_checkpoint
from hylas.train.cli import main
from hylas.train.config import load_config
from hylas.train.optim import lr_at, param_groups
from hylas.train.trainer import TrainError, train

# The tiny recipe's architecture, shortened to seconds.
FAST = [
    "train.steps=10",
    "train.warmup_steps=2",
    "train.batch_size=8",
    "train.seq_len=128",
    "train.eval_batches=2",
    "train.log_every=2",
]


def test_evaluation_can_be_switched_off(tmp_path):
    overrides = [*FAST, "train.steps=2", "train.eval_batches=0", f"train.out_dir={tmp_path}"]
    result = train(load_config("tiny", overrides))
    assert result.first_eval_loss is None and result.last_eval_loss is None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]  # the training loss, no held-out loss
    assert "eval_loss" not in records[0] and records[0]["loss"] > 0


def test_checkpoint_holds_whole_state_and_refuses_corruption_and_misfits(tmp_path):
    result = train(load_config("tiny", [*FAST, "train.steps=3", f"train.out_dir={tmp_path}"]))
    path = result.checkpoint
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "optimizer-00000.safetensors",
        "rng-00000.safetensors",
        "tokenizer",
        "trainer.json",
    ]
    ckpt = open_checkpoint(tmp_path)  # a run directory finds its newest checkpoint
    assert ckpt.path == path and ckpt.step == 3
    listed = {n for n in ckpt.manifest["files"] if n.startswith("tokenizer/")}
    assert {"tokenizer/tokenizer.model", "tokenizer/hylas_tokenizer.json"} <= listed
    assert listed == {f"tokenizer/{p.name}" for p in (path / "tokenizer").iterdir()}
    tokenizer = ckpt.tokenizer()
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 4096
    assert ckpt.manifest["world"] == {"world_size": 1, "dp": 1, "sp": 1, "zero_stage": 0}
    assert ckpt.trainer_state()["optimizer_steps"] == 3
    model = HylasLM(ckpt.config.model)
    load_model_weights(ckpt, model)
    stored = safetensors.torch.load_file(path / "model.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p, stored[name])
    moments = ckpt.optimizer_moments()
    assert moments.names() == dict(model.named_parameters()).keys()
    assert all(moments.get(n, "exp_avg_sq").min() >= 0 for n in moments.names())
    assert not list((tmp_path / "checkpoints").glob(".*")), "temporary directory left behind"

    wider = load_config("tiny", ["model.d_model=128", "model.n_heads=2"]).model
    with pytest.raises(
        CheckpointError, match=r"embed.weight is \[4096, 256\] there and \[4096, 128\]"
    ):
        load_model_weights(ckpt, HylasLM(wider))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        open_checkpoint(path)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    whole = train(load_config("tiny", [*FAST, "train.steps=6", f"train.out_dir={tmp_path / 'a'}"]))
    interrupted = load_config(
        "tiny", [*FAST, "train.steps=6", "train.exit_at_step=3", f"train.out_dir={tmp_path / 'b'}"]
    )
    first = train(interrupted)
    assert first.steps == 3 and first.checkpoint.name == "step_000003"
    with pytest.raises(TrainError, match="already holds a run"):
        train(interrupted)
    resumed = train(interrupted, resume="auto")
    assert resumed.steps == 6
    a = safetensors.torch.load_file(whole.checkpoint / "model.safetensors")
    b = safetensors.torch.load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert resumed.last_eval_loss == whole.last_eval_loss

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, lines)]

    assert losses("b") == losses("a")


def test_no_weight_decay_on_norms_biases_and_embeddings():
    cfg = load_config("tiny", ["model.d_model=64", "model.n_heads=2", "model.vocab_size=512"])
    model = HylasLM(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.weight", "norm.weight"}
    assert all(p.dim() == 2 and names[id(p)] != "embed.weight" for p in decay["params"])
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])  # GLA gate bias
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_schedule():
    t = load_config("tiny", ["train.steps=110", "train.warmup_steps=10", "train.lr=1.0"]).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5)
    assert lr_at(110, t) == pytest.approx(t.min_lr_ratio)


def test_warmup_stable_decay_schedule():
    t = load_config(
        "tiny",
        [
            "train.steps=100",
            "train.warmup_steps=10",
            "train.lr=1.0",
            "train.schedule=wsd",
            "train.decay_fraction=0.2",
            "train.min_lr_ratio=0.0",
        ],
    ).train
    assert lr_at(4, t) == pytest.approx(0.5)
    assert [lr_at(s, t) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable until the last 20
    assert lr_at(89, t) == pytest.approx(0.5)  # halfway down the linear decay
    assert lr_at(99, t) == pytest.approx(0.0)  # the last update reaches the floor


def test_command_line_trains_the_tiny_recipe_then_generates(tmp_path, capsys):
    """The whole path once: the command line, the engine, data, evaluation, the checkpoint,
    then generation from it. (Each linear mixer's own training is checked at the model
    level, tests/model/test_mixers.py.)"""
    run = tmp_path / "run"
    assert main(["train", "--set", *FAST, "train.dtype=float32", f"train.out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {run / 'checkpoints' / 'step_000010'}" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert records[-1]["step"] == 10 and "eval_loss" in records[-1]
    for r in (r for r in records if "loss" in r):
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys()
    # step 0 is near ln(4096) = 8.3 for a fresh model; ten steps bring it well down.
    first, last = records[0]["eval_loss"], records[-1]["eval_loss"]
    assert 7.5 < first < 9.0 and last < first - 1.0
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == 5 and train_losses[-1] < train_losses[0]
    manifest = json.loads((run / "checkpoints" / "step_000010" / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["config"]["model"]["linear_to_full"] == "3:1"
    assert (run / "config.yaml").is_file()

    assert (
        main(["generate", "--checkpoint", str(run), "--prompt", "ROMEO.", "--max-new-tokens", "12"])
        == 0
    )
    sample = capsys.readouterr().out
    assert sample.startswith("ROMEO.") and len(sample) > len("ROMEO.\n")

    # a second run into the same directory is refused rather than mixed into the first
    assert main(["train", "--set", *FAST, f"train.out_dir={run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_forcing_triton_without_a_gpu_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = tmp_path / "run"
    assert main(["train", "--set", "kernels.backend=triton", f"train.out_dir={run}"]) == 2
    assert "backend='triton' needs CUDA tensors" in capsys.readouterr().err
    assert not run.exists()


def test_a_tiny_moe_hybrid_trains(tmp_path):
    overrides = [*FAST, "train.steps=6", "train.dtype=float32", "model.moe.num_experts=4"]
    result = train(load_config("tiny", [*overrides, f"train.out_dir={tmp_path}"]))
    assert result.last_eval_loss < result.first_eval_loss - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "moe_load_imbalance" in r]
    assert logged and all(r["moe_load_imbalance"] >= 1.0 for r in logged)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Two prepared sources (comedies and histories, as jsonl) sharing one tokenizer."""
    from hylas.data.corpus import load_corpus
    from hylas.data.prepare import prepare
    from hylas.data.sources import open_sources
    from hylas.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("mixture")
    works = load_corpus()
    tok = train_tokenizer((w.text for w in works[:6]), 512, root / "tok")
    for name, part in (("comedies", works[:6]), ("histories", works[6:10])):
        scenes = [s for w in part for s in w.text.split("\n\n\n") if s.strip()]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in scenes))
        src = open_sources([str(root / f"{name}.jsonl")])
        prepare(src, tok, root / name, val_fraction=0.05, progress=False)
    yaml = root / "mix.yaml"
    yaml.write_text(
        "model: {vocab_size: 512}\n"
        f"data:\n  path:\n    - {{path: {root / 'comedies'}, weight: 3}}\n"
        f"    - {{path: {root / 'histories'}, weight: 1}}\n"
    )
    return root


def test_training_on_a_prepared_mixture_resumes_exactly(tmp_path, mixture):
    cfg = ["--set", *FAST, "train.steps=6"]
    args = ["train", "--config", str(mixture / "mix.yaml"), *cfg]
    assert main([*args, f"train.out_dir={tmp_path / 'a'}"]) == 0
    assert main([*args, f"train.out_dir={tmp_path / 'b'}", "train.exit_at_step=3"]) == 0
    assert main([*args, f"train.out_dir={tmp_path / 'b'}", "--resume", "auto"]) == 0

    def records(run):
        text = (tmp_path / run / "metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    assert {"eval_loss", "eval_loss/comedies", "eval_loss/histories"} <= set(records("a")[-1])
    steps = [[(r["step"], r.get("loss"), r.get("eval_loss")) for r in records(run)] for run in "ab"]
    assert steps[0] == steps[1]
    a = safetensors.torch.load_file(
        tmp_path / "a" / "checkpoints" / "step_000006" / "model.safetensors"
    )
    b = safetensors.torch.load_file(
        tmp_path / "b" / "checkpoints" / "step_000006" / "model.safetensors"
    )
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run saw other batches"
    manifest = json.loads(
        (tmp_path / "a" / "checkpoints" / "step_000006" / "manifest.json").read_text()
    )
    assert sum(manifest["data"]["consumed"]) == 6 * 8  # steps x batch size, split 3:1
    assert manifest["data"]["consumed"] == [36, 12]


def test_training_refuses_data_that_does_not_fit(tmp_path, mixture, capsys):
    from hylas.data.tokenizer import train_tokenizer

    other = train_tokenizer(["quite different words\n"] * 300, 300, tmp_path / "other")
    base = ["train", "--set", *FAST, f"train.out_dir={tmp_path / 'r'}", "model.vocab_size=512"]
    cases = [
        (
            [f"data.path={mixture / 'comedies'}", f"data.tokenizer={other.directory}"],
            "does not match the one",
        ),
        ([f"data.path={tmp_path / 'nothing'}"], "does not exist"),
        ([f"data.path={mixture / 'comedies'}", "model.vocab_size=384"], "model.vocab_size is 384"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
