"""Load Hugging Face exports as a user without Hylas would, and write down what they give.

Run by tests/train/test_hf_export.py in a fresh process: ``python hf_load_worker.py JOB``.
Imports of ``hylas`` and ``triton`` are refused before anything else is imported, so an
export that needs either fails here. The job (JSON) names each export, whether it is
Hylas's own type (remote code) or a stock transformers class, the prompts, how many tokens
to generate, and a fixed batch of token ids. For each export this writes what transformers
gave: ``<name>.json`` (config fields, token ids, greedy tokens, pipeline text, the loaded
classes) and ``<name>.safetensors`` (logits of the batch, each decoding step's logits,
alone and in the left-padded batch); the test compares them with Hylas's own numbers. An
export that fails records its traceback and the others still run.
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("hylas", "triton")
refused: set[str] = set()


class RefuseImports(importlib.abc.MetaPathFinder):
    """Refuses ``hylas`` and ``triton`` (and their submodules), and remembers who asked."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            refused.add(top)
            raise ModuleNotFoundError(f"{name} is blocked in this process", name=name)
        return None


sys.meta_path.insert(0, RefuseImports())

import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    pipeline,
)

torch.set_num_threads(2)


def class_name(obj) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    return f"{t.__module__}.{t.__qualname__}"


@torch.no_grad()
def observe(job: dict, export: dict, out: Path) -> dict:
    d, remote, prompts, n = export["dir"], export["remote"], job["prompts"], job["new_tokens"]
    # A stock export must load with remote code refused outright, not merely unrequested.
    trust = {"trust_remote_code": remote}
    seen: dict = {}
    tensors: dict[str, torch.Tensor] = {}

    config = AutoConfig.from_pretrained(d, **trust)
    seen["config"] = {
        "class": class_name(config),
        "model_type": config.model_type,
        "architectures": config.architectures,
        "auto_map": getattr(config, "auto_map", None),
        "mixer_pattern": getattr(config, "mixer_pattern", None),
        "ffn_pattern": getattr(config, "ffn_pattern", None),
        "num_hidden_layers": config.num_hidden_layers,
        "layer_types": getattr(config, "layer_types", None),
    }

    tok = AutoTokenizer.from_pretrained(d, **trust)
    seen["tokenizer"] = {
        "plain": [tok(p, add_special_tokens=False).input_ids for p in prompts],
        "default": [tok(p).input_ids for p in prompts],
        "bos_eos_pad": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
    }

    model = AutoModelForCausalLM.from_pretrained(d, **trust).eval()
    seen["model_class"] = class_name(model)
    seen["dtype"] = str(next(model.parameters()).dtype)
    tensors["logits"] = model(torch.tensor(job["batch"])).logits.float()

    seen["greedy"] = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p, add_special_tokens=False).input_ids])
        g = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seen["greedy"].append(g.sequences[0, ids.shape[1] :].tolist())
        tensors[f"steps.{i}"] = torch.cat(g.logits).float()

    tok.padding_side = "left"
    enc = tok(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    g = model.generate(
        **enc, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    seen["batched"] = {
        "pads": (enc.attention_mask == 0).sum(1).tolist(),
        "left_padded": bool((enc.attention_mask[:, -1] == 1).all()),
        "new": g.sequences[:, enc.input_ids.shape[1] :].tolist(),
    }
    tensors["batched_steps"] = torch.stack(g.logits, 1).float()

    pipe = pipeline("text-generation", model=d, **trust)
    seen["pipeline"] = [
        pipe(p, max_new_tokens=n, do_sample=False)[0]["generated_text"] for p in prompts
    ]

    safetensors.torch.save_file(tensors, str(out / f"{export['name']}.safetensors"))
    return seen


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    for export in job["exports"]:
        try:
            seen = {"error": None, **observe(job, export, out)}
        except Exception:
            seen = {"error": traceback.format_exc()}
        (out / f"{export['name']}.json").write_text(json.dumps(seen))
    modules = sorted(sys.modules)
    summary = {
        # hylas.*, a bundled file imported as a top-level hylas_* module, triton*
        "hylas_modules": [m for m in modules if m.partition(".")[0].startswith(BLOCKED)],
        "bundled_modules": sorted(
            {m.rpartition(".")[2] for m in modules if m.startswith("transformers_modules.")}
        ),
        "refused": sorted(refused),
    }
    (out / "process.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
