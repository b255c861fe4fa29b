"""``hylas export``: a checkpoint as a Hugging Face model directory.

What it writes (docs/architecture.md, "Hugging Face export"):

    config.json               a stock architecture's (Llama, Qwen3, Mixtral, Qwen3-MoE) where
                              the math is the same (``hf_stock``), else Hylas's own type:
                              model_type "hylas", auto_map, the Hylas model config whole
    model*.safetensors        the weights, sharded above --max-shard-size with an index
    configuration_hylas.py,   Hylas's own model code, copied (``hylas.train.hf.bundle``): it
    modeling_hylas.py, ...    needs only torch and transformers (Hylas's own type only)
    tokenizer files           the checkpoint's tokenizer, for AutoTokenizer
    generation_config.json    bos, eos and pad ids
    README.md                 a model card: layers, mixer, MoE, sizes, tokens, held-out loss

The directory is built under a temporary name beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import safetensors.torch
import torch

from hylas.model.config import ModelConfig
from hylas.train.checkpoint import MODEL_FILE, Checkpoint, CheckpointError, open_checkpoint
from hylas.train.hf.stock import stock_architecture, stock_config, to_stock_state

log = logging.getLogger("hylas")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hylas_version() -> str:
    try:
        return version("hylas")
    except PackageNotFoundError:
        return "unknown"


def export(
    checkpoint: str | Path,
    out: str | Path,
    max_shard_size: str = "5GB",
    dtype: str = "float32",
) -> dict:
    """Export ``checkpoint`` (a checkpoint or run directory) to the new directory ``out``;
    return what was written (architecture, why, files)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--max-shard-size must be a size such as 5GB or 500MB, got {max_shard_size!r}"
        ) from None
    ckpt = open_checkpoint(checkpoint)
    cfg = ckpt.config.model
    tokenizer = ckpt.tokenizer()
    arch, why = stock_architecture(cfg)
    log.info(
        "exporting %s (step %d) as %s: %s",
        ckpt.path,
        ckpt.step,
        arch or "Hylas's own type (HylasForCausalLM, remote code)",
        why,
    )
    state = safetensors.torch.load_file(str(ckpt.path / MODEL_FILE))
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    max_positions = ckpt.config.train.seq_len

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        if arch:
            model = _stock_model(arch, cfg, state, max_positions, ids)
        else:
            model = _hylas_model(cfg, state, max_positions, ids)
        model.config.dtype = DTYPES[dtype]
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
        )
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if not arch:
            from hylas.train.hf.bundle import write_bundle

            write_bundle(tmp)
        # The tokenizer's own files (Hylas reads them back on import), then what
        # AutoTokenizer reads (for Hylas's sentencepiece model, its conversion).
        tokenizer.copy_to(tmp)
        tokenizer.save_hf(tmp)
        (tmp / "README.md").write_text(model_card(ckpt, cfg, arch, why, out.name))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "architecture": arch or "HylasForCausalLM",
        "why": why,
        "files": sorted(p.name for p in out.iterdir()),
        "step": ckpt.step,
    }


def _materialise(model_class, config, state: dict[str, torch.Tensor]):
    """``model_class(config)`` built on the meta device and given ``state``'s tensors
    (no random init, no second copy); tied weights tied again."""
    with torch.device("meta"):
        model = model_class(config)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if unexpected or still_meta:
        what = unexpected[0] if unexpected else f"no weight for {still_meta[0]}"
        raise CheckpointError(f"the export of {model_class.__name__} does not fit: {what}")
    return model


def _stock_model(arch: str, cfg: ModelConfig, state, max_positions: int, ids: dict):
    import transformers

    config = stock_config(arch, cfg, max_positions, ids)
    config.architectures = [arch]
    return _materialise(getattr(transformers, arch), config, to_stock_state(state, cfg))


def _hylas_model(cfg: ModelConfig, state, max_positions: int, ids: dict):
    from hylas.train.hf.bundle import source_digest
    from hylas.train.hf.configuration import HylasConfig
    from hylas.train.hf.modeling import HylasForCausalLM

    config = HylasConfig(
        hylas_model=cfg.to_dict(),
        hylas_version=hylas_version(),
        hylas_source_digest=source_digest(),
        max_position_embeddings=max_positions,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    config.architectures = ["HylasForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_hylas.HylasConfig",
        "AutoModelForCausalLM": "modeling_hylas.HylasForCausalLM",
    }
    return _materialise(HylasForCausalLM, config, {f"model.{k}": v for k, v in state.items()})


def model_card(ckpt: Checkpoint, cfg: ModelConfig, arch: str | None, why: str, name: str) -> str:
    """The README.md of an export: what the model is and how to load it."""
    from hylas.model.decoder import HylasLM

    with torch.device("meta"):
        sizes = HylasLM(cfg)
    total, active = sizes.num_parameters(), sizes.num_active_parameters()
    m = ckpt.manifest
    eval_loss = (m.get("metrics") or {}).get("eval_loss")
    tokens = m.get("tokens_seen")
    moe = cfg.moe
    remote = arch is None
    lines = [
        f"# {name}",
        "",
        f"A hybrid language model pretrained with Hylas {hylas_version()}, exported from "
        f"step {m['step']}.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch or 'HylasForCausalLM (model_type `hylas`, remote code)'} |",
        f"| why | {why} |",
        f"| layers | {cfg.n_layers}, pattern `{cfg.pattern}` (L linear, F softmax attention) |",
        f"| linear mixer | {cfg.linear_mixer if 'L' in cfg.pattern else 'none'} |",
        f"| softmax attention | {cfg.n_heads} heads, {cfg.kv_heads} key/value heads, "
        f"window {cfg.attention.window or 'none'}, QK-norm {'on' if cfg.attention.qk_norm else 'off'} |",
        f"| width | d_model {cfg.d_model}, feed-forward {cfg.ffn_dim} |",
    ]
    if moe.num_experts:
        lines.append(
            f"| MoE | {moe.num_experts} experts, top-{moe.top_k}, {moe.router} router, "
            f"{moe.shared_experts} shared, layers `{cfg.ffn_pattern}` (M MoE, D dense), "
            f"{'dropless' if not moe.capacity_factor else f'capacity factor {moe.capacity_factor}'} |"
        )
    lines += [
        f"| parameters | {total:,} ({active:,} active per token) |",
        f"| vocabulary | {cfg.vocab_size:,} |",
        f"| tokens trained | {f'{tokens:,}' if tokens is not None else 'unknown'} |",
        f"| held-out loss | {f'{eval_loss:.4f}' if eval_loss is not None else 'not measured'} |",
        "",
        "## Load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"'
        + (", trust_remote_code=True)" if remote else ")"),
        f'model = AutoModelForCausalLM.from_pretrained("{name}"'
        + (", trust_remote_code=True)" if remote else ")"),
        'ids = tokenizer("ROMEO.", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
    ]
    if remote:
        lines += [
            "The modeling code in this directory is Hylas's own, copied at export; it needs "
            "only torch and transformers and runs the torch chunkwise kernels. Where the "
            "same Hylas is installed it runs Hylas's kernels instead (Triton on CUDA).",
            "",
        ]
    lines += [
        "Continue pretraining it with Hylas: `hylas import-hf DIR --out CKPT`, then "
        "`hylas train --set train.init_from=CKPT`.",
        "",
    ]
    return "\n".join(lines)
