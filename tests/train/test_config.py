"""Config loading: recipes, YAML files, --set overrides parsed by type, and clear errors."""

import pytest
import torch

from hylas.train.cli import main
from hylas.train.config import ConfigError, load_config, recipe_names


def test_tiny_recipe_is_the_default():
    assert "tiny" in recipe_names()
    cfg = load_config()
    assert cfg.model.linear_to_full == "3:1"  # a string, not YAML 1.1's base-60 int 181
    assert cfg.model.pattern == "LLLF"
    assert load_config("tiny") == cfg


def test_overrides_are_parsed_by_the_field_type():
    cfg = load_config(
        "tiny",
        [
            "model.n_layers=8",
            "train.lr=1e-3",
            "model.tie_embeddings=false",
            "model.linear_to_full=1:1",
            "model.n_kv_heads=2",
            "train.out_dir=/somewhere/else",
        ],
    )
    assert cfg.model.n_layers == 8 and isinstance(cfg.model.n_layers, int)
    assert cfg.train.lr == 1e-3
    assert cfg.model.tie_embeddings is False
    assert cfg.model.pattern == "LFLFLFLF"
    assert cfg.model.n_kv_heads == 2
    assert load_config("tiny", ["model.n_kv_heads=none"]).model.n_kv_heads is None


def test_yaml_file_is_read_with_every_value_typed_by_its_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model:\n  linear_to_full: 1:1\n  n_layers: 2\ntrain:\n  lr: 5e-4\n  steps: 10\n  warmup_steps: 2\n"
    )
    cfg = load_config(str(path), ["train.steps=20"])
    assert cfg.model.linear_to_full == "1:1" and cfg.model.pattern == "LF"
    assert cfg.train.lr == 5e-4 and cfg.train.steps == 20


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.n_layer=4"],
            "unknown config key 'model.n_layer' in model; did you mean model.n_layers",
        ),
        (["modle.n_layers=4"], "unknown config key 'modle' at the top level; did you mean model"),
        (["model.n_layers=four"], "model.n_layers must be int, got 'four'"),
        (["model.n_layers=6"], "multiple of the layer pattern"),
        (["model.d_model=250"], "divisible by model.n_heads"),
        (["train.dtype=float16"], "train.dtype must be auto, float32 or bfloat16"),
        (["train.warmup_steps=1000"], "cannot exceed train.steps"),
        (["model.moe.num_experts=8", "model.moe.top_k=9"], "model.moe.top_k must be in"),
        (["parallel.sp=0"], "parallel.sp must be at least 1"),
        (["parallel.sp=3"], "train.seq_len=256 must divide by parallel.sp=3"),
        (["data.verify=maybe"], "data.verify must be bool"),
        (["data.colour=1"], "unknown config key 'data.colour' in data"),
        (["kernels.backend=cuda"], "kernels.backend must be auto, torch or triton"),
        (["model.linear_mixer=mamba3"], "'mamba3' is not a known linear mixer"),
        (["model.linear_to_full=3-1"], "must look like '3:1'"),
        (["model"], "--set takes key=value"),
        (["model=3"], "model is a section"),
    ],
)
def test_bad_values_fail_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("tiny", overrides)


def test_missing_file_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="neither a YAML file nor a recipe"):
        load_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(capsys):
    assert main(["train", "--set", "model.n_layer=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hylas: error: unknown config key 'model.n_layer'")
    assert not any("Traceback" in line for line in err)


def test_cli_export_of_a_directory_that_is_not_a_checkpoint_is_refused(capsys, tmp_path):
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"hylas: error: {tmp_path} is neither a checkpoint nor a run directory with checkpoints"
    )
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("amx", [True, False])
def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_fast(monkeypatch, amx):
    from hylas.train.trainer import compute_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == ("bfloat16" if amx else "float32")
    assert compute_dtype("float32", cpu) == "float32"
    assert compute_dtype("bfloat16", cpu) == "bfloat16"
