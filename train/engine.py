"""DeepSpeed as Hylas's engine: the config built from Hylas's keys, one optimizer step over
the micro-batches of a global batch, and each parameter's full state for checkpoints.

Precision: fp32 weights, gradients and optimizer state at every world size; bfloat16 runs
the forward under DeepSpeed's ``torch_autocast`` section (autocast over fp32 weights), which
is what ``train.dtype`` has always meant. DeepSpeed's bf16 mode (bf16 weights with fp32
master copies) is not used, so a run's numerics do not depend on its layout.

Gradients: DeepSpeed averages gradients over its group (the whole world, since parameters
are replicated over sp); the trainer scales each micro-batch's summed token loss by
world / (the step's global target count), so the averaged gradient is that of the mean
token loss of the global batch. ``backward`` passes ``scale_wrt_gas=False``: the scaling
already accounts for accumulation.

Clipping: DeepSpeed clips at ZeRO 1-3 (its global norm over the sharded gradients); at
ZeRO 0 the gradients are whole on every rank and Hylas clips them itself, which also lets a
bad step drop them (DeepSpeed's stage-0 clip cannot run on a model without gradients).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_optimizer_state,
)

from hylas.configs.base import ConfigError
from hylas.parallel.mesh import Layout
from hylas.train.checkpoint import Moments
from hylas.train.config import Config
from hylas.train.optim import param_groups

# DeepSpeed keys that Hylas sets from its own config; a user JSON may not set them.
OWNED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr, train.beta1, train.beta2 and train.weight_decay",
    "scheduler": "train.schedule",
    "fp16": "train.dtype",
    "bf16": "train.dtype",
    "torch_autocast": "train.dtype",
    "zero_optimization.stage": "parallel.zero_stage",
}
MOMENTS = ("exp_avg", "exp_avg_sq")

# ZeRO-3 calls the tensor collectives torch renamed; the warning would repeat on every rank.
warnings.filterwarnings(
    "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
)


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch of ``global_batch`` samples spreads over ranks and forwards."""

    global_batch: int
    micro_batch: int  # samples one rank runs per forward
    accumulation: int  # forwards per rank per optimizer step
    dp: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accumulation


def batch_layout(cfg: Config, layout: Layout) -> BatchLayout:
    """Refuse a batch that does not divide over the layout, naming the numbers."""
    tc, dp = cfg.train, layout.dp
    if not tc.micro_batch_size and tc.batch_size % dp:
        raise ConfigError(
            f"train.batch_size ({tc.batch_size}) does not split evenly over dp = {dp} ranks; "
            f"make it a multiple of {dp}"
        )
    micro = tc.micro_batch_size or tc.batch_size // dp
    if tc.batch_size % (micro * dp):
        raise ConfigError(
            f"train.batch_size ({tc.batch_size}) is not a multiple of train.micro_batch_size "
            f"({micro}) x dp ({dp}) = {micro * dp}; every rank needs the same whole number "
            "of micro-batches"
        )
    return BatchLayout(tc.batch_size, micro, tc.batch_size // (micro * dp), dp)


def deepspeed_config(cfg: Config, layout: Layout, batches: BatchLayout, dtype: str) -> dict:
    """DeepSpeed's config from Hylas's keys, plus the user's JSON for what Hylas has no key for."""
    tc, pc = cfg.train, cfg.parallel
    ds: dict = {
        # DeepSpeed's data-parallel world is the gradient group: dp x sp ranks.
        "train_batch_size": batches.micro_batch * batches.accumulation * layout.world,
        "train_micro_batch_size_per_gpu": batches.micro_batch,
        "gradient_accumulation_steps": batches.accumulation,
        "gradient_clipping": tc.grad_clip if pc.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": pc.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW under ZeRO
        "steps_per_print": 2**62,  # Hylas logs progress itself
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        # Gradients stay fp32 in communication too (DeepSpeed would reduce some in bf16).
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    if pc.deepspeed_config:
        merge_user_config(ds, Path(pc.deepspeed_config))
    return ds


def merge_user_config(ds: dict, path: Path) -> None:
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"parallel.deepspeed_config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config {path} must hold a JSON object")
    for key, value in user.items():
        nested = key == "zero_optimization" and isinstance(value, dict)
        for name in [f"{key}.{k}" for k in value] if nested else [key]:
            if name in OWNED_KEYS:
                raise ConfigError(
                    f"parallel.deepspeed_config {path} sets {name}, which Hylas sets from "
                    f"{OWNED_KEYS[name]}; remove it there and use that key"
                )
        if nested:
            ds["zero_optimization"].update(value)
        else:
            ds[key] = value


def avoid_cpu_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU collectives.

    On CPU, DeepSpeed's torch backend builds that op with a C++ compiler the first time
    the backend starts (about 30 s, and a failure where there is no compiler). gloo does
    everything Hylas needs on CPU, so the builder is told there is nothing to build.
    """
    # Replaced in the module's namespace, where the backend looks the builder up.
    vars(importlib.import_module("deepspeed.comm.torch"))["build_shm_op"] = lambda: None


class Engine:
    """A DeepSpeed engine over a HylasLM, stepped one global batch at a time."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        layout: Layout,
        batches: BatchLayout,
        dtype: str,
        device: torch.device,
    ):
        tc = cfg.train
        self.stage, self.grad_clip = cfg.parallel.zero_stage, tc.grad_clip
        self.device, self.dtype = device, dtype
        os.environ.setdefault("LOCAL_RANK", str(layout.local_rank))  # DeepSpeed asserts on it
        if device.type == "cpu":
            avoid_cpu_comm_build()
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo", dist_init_required=False
        )
        optimizer = torch.optim.AdamW(
            param_groups(model, tc.weight_decay),
            lr=tc.lr,
            betas=(tc.beta1, tc.beta2),
            eps=1e-8,
        )
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, layout, batches, dtype)
        )
        self.module = self.ds.module
        # The torch AdamW underneath (ZeRO wraps it); its state is what checkpoints hold.
        self.adam: torch.optim.AdamW = getattr(self.optimizer, "optimizer", self.optimizer)
        self.params = list(self.module.named_parameters())  # a tied weight once
        self._linked = False

    def __call__(self, **kwargs):
        return self.ds(**kwargs)

    def autocast(self) -> torch.autocast:
        """The forward's autocast (``train.dtype``), for what the trainer computes from the
        forward's output: the loss's LM head runs as it would inside the forward."""
        enabled = self.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, skip: bool) -> tuple[bool, float]:
        """The optimizer step at learning rate ``lr``; with ``skip`` (a non-finite loss on some
        rank) parameters and optimizer state stay as they are. Returns (applied, grad norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = math.nan
        if self.stage == 0:
            if not skip:
                grads = [p for _, p in self.params if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, self.grad_clip or math.inf))
                skip = not math.isfinite(grad_norm)  # the same on every rank: grads are reduced
            if skip:  # AdamW leaves a parameter without a gradient untouched
                for _, p in self.params:
                    p.grad = None
            self.ds.step()
            return not skip, grad_norm
        self.ds.step()
        applied = self.ds.was_step_applied()
        if skip and applied:
            raise RuntimeError("DeepSpeed applied a step whose gradients are not finite")
        if applied:
            self._link_all_groups()
        norm = self.ds.get_global_grad_norm()
        return applied, float(norm) if norm is not None and applied else math.nan

    def _link_all_groups(self) -> None:
        """ZeRO 1-2 link each parameter to its slice of the Adam state after the first step,
        but DeepSpeed 0.19 does it while only the first parameter group is visible, so the
        parameters of the other groups (no weight decay) would have no state to read or
        write. Link them all once the state exists."""
        if self.stage in (1, 2) and not self._linked:
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
            self._linked = True

    # -- checkpoint state: every parameter whole, whatever the ZeRO stage -----------------

    def full_state(self, name: str, p: torch.nn.Parameter) -> dict[str, torch.Tensor | None]:
        """fp32 value and Adam moments of one parameter, gathered whole (a collective at
        ZeRO 1-3: every rank calls it for every parameter in the same order)."""
        if self.stage == 0:
            state = self.adam.state.get(p, {})
            return {"param": p.detach(), **{k: state.get(k) for k in MOMENTS}}
        started = self.optimizer_steps() > 0
        return {
            "param": safe_get_full_fp32_param(p),
            **{k: safe_get_full_optimizer_state(p, k) if started else None for k in MOMENTS},
        }

    def optimizer_steps(self) -> int:
        """Updates AdamW has applied (its bias correction counts them)."""
        for state in self.adam.state.values():
            return int(state["step"])
        return 0

    def restore_optimizer(self, moments: Moments, steps: int) -> None:
        """Set the Adam moments (whole tensors by parameter name) and the step count.

        AdamW creates its state at its first step, so one step with zero gradients and
        learning rate 0 comes first: it leaves every parameter as it is (the update and the
        decoupled weight decay both scale with the learning rate) and creates the state the
        moments are then written into.
        """
        if steps == 0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for _, p in self.params:
            p.grad = torch.zeros_like(p) if self.stage == 0 else None
        if self.stage == 0:
            self.adam.step()
        else:
            self._zero_gradient_step()
            self._link_all_groups()
        with torch.no_grad():
            for name, p in self.params:
                for key in MOMENTS:
                    if self.stage == 0:
                        self.adam.state[p][key].copy_(moments.get(name, key))
                    else:
                        safe_set_full_optimizer_state(p, moments.get(name, key), key)
        for state in self.adam.state.values():
            state["step"].fill_(steps)
        for _, p in self.params:
            p.grad = None

    def _zero_gradient_step(self) -> None:
        """Run a forward and backward whose gradients are all zero, then an engine step."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.ds.device)
        self.ds.set_gradient_accumulation_boundary(True)
        out = self.ds(input_ids=ids, logits=True)
        self.ds.backward(out.logits.sum() * 0.0, scale_wrt_gas=False)
        self.ds.step()
        self.ds.zero_grad()
