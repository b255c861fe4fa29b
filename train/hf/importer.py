"""``hylas import-hf``: a Hugging Face model directory as a Hylas checkpoint.

Sources: a Hylas export (model_type "hylas"; the weights come back unchanged), or a stock
Llama, Qwen3, Mixtral or Qwen3-MoE folder whose math Hylas expresses exactly
(``hf_stock``); anything else Hylas cannot express (attention or MLP biases, another RoPE
type, an activation other than SiLU, a head size other than hidden_size / heads, sliding
windows) is refused by name.

Linearisation (docs/architecture.md, "Hybrids from a Transformer"): ``--set
model.layer_pattern=LLLF model.linear_mixer=gated_deltanet`` turns the softmax layers at
the pattern's ``L`` places into linear layers. Each one takes q, k, v and o from the
attention it replaces (the key/value heads of grouped-query attention repeated to one per
query head), so its head sizes are the attention's head size (``model.linear_head_k`` and
``model.linear_head_v`` are set to it unless given); the FFNs, norms and embeddings are
copied, and only the mixer's own extra parameters (output gate, gates, decays, convs,
output norm) start as Hylas initialises them, named in the log.

The checkpoint written holds the weights, the model config and the source's tokenizer; it
has no optimizer or data state, so a run starts from it with ``train.init_from``. It is
built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from hylas.data.tokenizer import Tokenizer, file_sha256
from hylas.model.config import (
    AttentionConfig,
    ConfigError,
    ModelConfig,
    MoEConfig,
    RopeScalingConfig,
)
from hylas.train.checkpoint import FORMAT_VERSION, MANIFEST, MODEL_FILE, TOKENIZER_DIR
from hylas.train.config import Config, apply_overrides
from hylas.train.hf.stock import from_stock_state

log = logging.getLogger("hylas")

STOCK_TYPES = ("llama", "qwen3", "mixtral", "qwen3_moe")


class ImportRefused(ConfigError):
    """A Hugging Face model Hylas cannot take; the message names what and where."""


def import_hf(hf_dir: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Write the Hylas checkpoint ``out`` from the Hugging Face directory ``hf_dir``."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf = json.loads(config_file.read_text())
    kind = hf.get("model_type")
    where = str(config_file)
    if kind == "hylas":
        source = ModelConfig.from_dict(hf["hylas_model"])
    elif kind in STOCK_TYPES:
        from transformers import AutoConfig

        # transformers reads the config (older files' key names included) as it would
        stock = AutoConfig.from_pretrained(hf_dir).to_dict()
        source = model_config_of({**hf, **stock}, kind, where)
    else:
        raise ImportRefused(
            f"{where}: model_type {kind!r} is not one Hylas imports "
            f"(hylas, {', '.join(STOCK_TYPES)})"
        )
    cfg = target_config(source, overrides)
    tokenizer = Tokenizer.load(hf_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ImportRefused(
            f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {cfg.model.vocab_size}"
        )
    log.info("reading the weights of %s", hf_dir)
    if kind == "hylas":
        weights = {k.removeprefix("model."): v for k, v in read_weights(hf_dir).items()}
    else:
        weights = from_stock_state(read_stock_weights(hf_dir), source, str(hf_dir))
    state = map_layers(source, cfg.model, weights, str(hf_dir))
    write_checkpoint(out, cfg, state, tokenizer, {"imported_from": str(hf_dir), "type": kind})
    return {
        "source": f"{kind} ({hf_dir})",
        "parameters": sum(t.numel() for t in state.values()),
        "pattern": cfg.model.pattern,
    }


# -- reading ----------------------------------------------------------------------------------


def weight_files(hf_dir: Path) -> list[str]:
    """The directory's safetensors weight files (one, or the shards of its index)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (hf_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(
        f"{hf_dir} holds no safetensors weights (model.safetensors or its index); "
        "Hylas reads no pickled weights"
    )


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors weights, in fp32."""
    out = {}
    for name in weight_files(hf_dir):
        with safetensors.safe_open(str(hf_dir / name), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[key] = f.get_tensor(key).to(torch.float32)
    return out


def read_stock_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """A stock folder's weights in transformers' current names, fp32: loaded by transformers
    itself, which converts the layouts checkpoints are published in (e.g. Mixtral's experts
    one by one) to its own (stacked experts)."""
    from transformers import AutoModelForCausalLM

    weight_files(hf_dir)  # refuse pickled weights before transformers reads them
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def model_config_of(hf: dict, kind: str, where: str) -> ModelConfig:
    """The Hylas model config of a stock transformers config, or one sentence on what does
    not map."""

    def refuse(what: str):
        raise ImportRefused(f"{where}: {what}, which Hylas cannot express")

    if hf.get("attention_bias"):
        refuse("attention_bias is true (biases on q, k, v, o)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias is true (biases in the feed-forward)")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hf['hidden_act']!r} (Hylas's feed-forward is SwiGLU)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        refuse(
            f"head_dim is {hf['head_dim']} while hidden_size / num_attention_heads is {d // heads}"
        )
    if hf.get("sliding_window") and (kind == "mixtral" or hf.get("use_sliding_window")):
        refuse(f"a sliding window of {hf['sliding_window']} is set")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = RopeScalingConfig()
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            "llama3",
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
    elif rope_type != "default":
        refuse(f"RoPE type {rope_type!r} is used (Hylas has default and llama3)")
    moe = MoEConfig()
    if kind == "mixtral":
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            d_expert=hf["intermediate_size"],
        )
    elif kind == "qwen3_moe":
        if not hf.get("norm_topk_prob", False):
            refuse("norm_topk_prob is false (Hylas renormalises the top-k router weights)")
        if hf.get("decoder_sparse_step", 1) != 1:
            refuse(f"decoder_sparse_step is {hf['decoder_sparse_step']} (only 1 maps)")
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = "".join("D" if i in dense else "M" for i in range(hf["num_hidden_layers"]))
        moe = MoEConfig(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            d_expert=hf["moe_intermediate_size"],
            pattern=pattern,
        )
    try:
        return ModelConfig(
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            vocab_size=hf["vocab_size"],
            layer_pattern="F",
            d_ff=hf["intermediate_size"],
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention=AttentionConfig(qk_norm=kind in ("qwen3", "qwen3_moe")),
            moe=moe,
        ).validate()
    except ConfigError as e:
        raise ImportRefused(f"{where}: {e}") from None
    except KeyError as e:
        raise ImportRefused(f"{where} has no {e.args[0]}") from None


def target_config(source: ModelConfig, overrides: Sequence[str]) -> Config:
    """The imported model's full config: the source's, with ``--set model.*`` applied.
    Linear layers made from attention take its head size unless the overrides say."""
    others = [o for o in overrides if not o.strip().startswith("model.")]
    if others:
        raise ImportRefused(
            f"import-hf takes model.* settings only, got {others[0]!r}; give the others to "
            "hylas train"
        )
    cfg = Config(model=ModelConfig.from_dict(source.to_dict()))
    if "L" not in source.pattern:  # linear layers made from attention keep its shapes
        head = source.d_model // source.n_heads
        cfg.model.linear_head_k = cfg.model.linear_head_v = head
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


# -- mapping ----------------------------------------------------------------------------------


def map_layers(
    source: ModelConfig, target: ModelConfig, weights: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The target model's full state: the source's weights where the layer kinds agree,
    attention weights made linear where an ``F`` became ``L``, Hylas's init for the rest
    (logged by name); a weight whose shape does not fit is refused by name."""
    from hylas.model.decoder import HylasLM

    if target.n_layers != source.n_layers:
        raise ImportRefused(
            f"{where} has {source.n_layers} layers; model.n_layers={target.n_layers} cannot map"
        )
    mapped: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mixer\.(.+)", name)
        if m is None:
            mapped[name] = t
            continue
        i = int(m[1])
        was, now = source.pattern[i], target.pattern[i]
        if was == now and (now == "F" or source.linear_mixer == target.linear_mixer):
            mapped[name] = t
        elif was == "F" and now == "L":
            mapped.update(_linear_from_attention(i, m[2], t, source, target))
        else:
            raise ImportRefused(
                f"{where}: layer {i} is {'linear (' + source.linear_mixer + ')' if was == 'L' else 'softmax'} "
                f"there; import can turn softmax layers linear, not into another mixer"
            )
    model = HylasLM(target, kernel_backend="torch", seed=0)
    state = {n: p.detach() for n, p in model.named_parameters()}
    for name, t in sorted(mapped.items()):
        if name not in state:
            raise ImportRefused(f"{where}: the weight {name} has no place in the imported model")
        if t.shape != state[name].shape:
            raise ImportRefused(
                f"{where}: {name} is {list(t.shape)} there but {list(state[name].shape)} in the "
                "imported model's config; a layer made linear needs linear_head_k = "
                "linear_head_v = the attention's head size and linear_v_heads = n_heads"
            )
    fresh = sorted(set(state) - set(mapped))
    if fresh:
        by_part = defaultdict(list)
        for name in fresh:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            by_part[m[2] if m else name].append(m[1] if m else "")
        parts = "; ".join(
            f"{part} (layer{'s' if len(ls) > 1 else ''} {', '.join(ls)})"
            for part, ls in by_part.items()
        )
        log.info("started as Hylas initialises them (no counterpart in the source): %s", parts)
    return {**state, **{k: v.contiguous() for k, v in mapped.items()}}


def _linear_from_attention(
    i: int, part: str, t: torch.Tensor, source: ModelConfig, target: ModelConfig
) -> dict[str, torch.Tensor]:
    """Layer i's attention weight ``part`` as the linear mixer's: q and o as they are, k and
    v with each key/value head repeated for the query heads it served."""
    prefix = f"blocks.{i}.mixer."
    head = source.d_model // source.n_heads
    if part in ("q_proj.weight", "o_proj.weight"):
        return {prefix + part: t}
    if part in ("k_proj.weight", "v_proj.weight"):
        heads = (
            target.n_heads if part == "k_proj.weight" else target.linear_v_heads or target.n_heads
        )
        kv = source.kv_heads
        if heads % kv:
            raise ImportRefused(
                f"layer {i}: {kv} key/value heads cannot spread over {heads} linear heads"
            )
        grouped = t.view(kv, head, -1).repeat_interleave(heads // kv, dim=0)
        return {prefix + part: grouped.reshape(heads * head, -1)}
    if part in ("q_norm.weight", "k_norm.weight"):
        return {}  # QK-norm has no counterpart in a linear mixer
    raise ImportRefused(f"layer {i}: the attention weight {part} has no linear counterpart")


# -- writing ----------------------------------------------------------------------------------


def write_checkpoint(
    out: Path, cfg: Config, state: dict[str, torch.Tensor], tokenizer: Tokenizer, origin: dict
) -> None:
    """A weights-only checkpoint (no optimizer or data state) that ``train.init_from``,
    ``hylas generate`` and ``hylas export`` read: manifest, model.safetensors, tokenizer/."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)
    try:
        weights = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
        safetensors.torch.save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        names = [MODEL_FILE]
        names += [f"{TOKENIZER_DIR}/{n}" for n in tokenizer.copy_to(tmp / TOKENIZER_DIR)]
        manifest = {
            "format": FORMAT_VERSION,
            "step": 0,
            "tokens_seen": 0,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "world": {},
            "config": cfg.to_dict(),
            "metrics": {},
            "data": None,
            "imported": origin,
            "files": {n: file_sha256(tmp / n) for n in sorted(names)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
