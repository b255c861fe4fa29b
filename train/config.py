"""The run configuration: nested typed dataclasses, loaded from YAML and ``--set`` overrides.

Every value, from YAML or from the command line, is parsed by its field's type (YAML is
read with all scalars as strings, so ``3:1`` stays a string and ``1e-3`` is a float for a
float field). Unknown keys, values of the wrong type and impossible combinations stop
with one :class:`ConfigError` sentence naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hylas.configs.base import ConfigError
from hylas.model.config import ModelConfig

# The shipped recipes: hylas.configs sits beside hylas.train, in the checkout and in an
# installed wheel alike (pyproject's package-dir). A path, not importlib.resources: the
# code folders are namespace packages (docs/architecture.md, "Packaging").
RECIPES = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["Config", "ConfigError", "load_config", "recipe_names"]


@dataclass
class TrainConfig:
    steps: int = 600
    seq_len: int = 256
    batch_size: int = 16  # the global batch: samples per optimizer step, over all ranks
    # Samples one rank runs per forward; 0 = batch_size / dp (no accumulation). Gradient
    # accumulation steps = batch_size / (micro_batch_size x dp).
    micro_batch_size: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    # cosine: warmup, then cosine decay over the rest. wsd: warmup, then constant lr, then
    # a linear decay over the last decay_fraction of the steps (warmup-stable-decay).
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1  # never applied to norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    out_dir: str = "runs/tiny"
    # auto | float32 | bfloat16 (autocast; fp32 weights and optimizer). auto: bfloat16 where
    # the hardware has fast bf16 matmuls (CUDA with bf16, CPUs with AMX), else float32.
    dtype: str = "auto"
    eval_every: int = 0  # 0 = evaluate at step 0 and at the end only
    eval_batches: int = 8  # held-out batches per evaluation; 0 = no evaluation
    log_every: int = 10
    save_every: int = 0  # 0 = checkpoint at the end only
    exit_at_step: int = 0  # > 0: checkpoint and exit cleanly at that step (job time limits)
    keep_checkpoints: int = 3  # keep the newest K checkpoints; 0 = all
    max_bad_steps: int = 5  # stop after this many skipped (non-finite) steps in a row
    init_from: str = ""  # a checkpoint whose weights start a new run (fresh optimizer, step 0)
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default

    def validate(self) -> TrainConfig:
        for name in ("steps", "seq_len", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "exit_at_step",
            "threads",
            "grad_clip",
            "micro_batch_size",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) cannot exceed train.steps ({self.steps})"
            )
        if self.max_bad_steps <= 0:
            raise ConfigError(f"train.max_bad_steps must be positive, got {self.max_bad_steps}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"train.schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("train.beta1 and train.beta2 must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        return self


@dataclass
class ParallelConfig:
    """How the processes torchrun starts are laid out (docs/architecture.md, "Parallel
    dimensions"): world = dp x sp; dp follows from the world size."""

    sp: int = 1  # sequence-parallel ranks per sample (LASP-2); 1 = off
    zero_stage: int = 1  # DeepSpeed ZeRO: 0 off, 1 optimizer states, 2 + gradients, 3 + weights
    deepspeed_config: str = ""  # a DeepSpeed JSON adding what Hylas has no key for
    timeout_s: float = 600.0  # how long a collective waits for a peer before the run fails

    def validate(self) -> ParallelConfig:
        if self.sp < 1:
            raise ConfigError(f"parallel.sp must be at least 1, got {self.sp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        return self


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0: the metrics, the resolved config, the layout."""

    enabled: bool = False
    project: str = "hylas"
    name: str = ""  # empty: the run directory's name
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline

    def validate(self) -> WandbConfig:
        if self.mode not in ("auto", "online", "offline"):
            raise ConfigError(f"wandb.mode must be auto, online or offline, got {self.mode!r}")
        return self


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | torch | triton

    def validate(self) -> KernelsConfig:
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"kernels.backend must be auto, torch or triton, got {self.backend!r}"
            )
        return self


@dataclass
class DataSource:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # A directory made by `hylas data prepare`, or a list of {path, weight} to train on a
    # weighted mixture. Empty: the embedded corpus, with a tokenizer of model.vocab_size.
    path: str | list[DataSource] = ""
    tokenizer: str = ""  # empty: the tokenizer stored inside the (first) prepared directory
    verify: bool = True  # check every shard's sha256 before training (reads the data once)

    @property
    def sources(self) -> list[DataSource]:
        if isinstance(self.path, list):
            return self.path
        return [DataSource(self.path)] if self.path else []

    def validate(self) -> DataConfig:
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ConfigError(f"data.path item {i} has no path")
            if not src.weight > 0:
                raise ConfigError(
                    f"data.path item {i} ({src.path}) needs a positive weight, got {src.weight}"
                )
        return self


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        self.kernels.validate()
        self.data.validate()
        self.parallel.validate()
        self.wandb.validate()
        if self.train.seq_len % self.parallel.sp:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} must divide by parallel.sp="
                f"{self.parallel.sp}: each sp rank holds an equal contiguous segment"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown(key: str, known: list[str]) -> ConfigError:
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {(section + '.' if section else '') + close[0]}?" if close else ""
    where = f"in {section}" if section else "at the top level"
    return ConfigError(f"unknown config key {key!r} {where}{hint}")


def _parse_scalar(key: str, text: str, tp: Any) -> Any:
    """Parse a string by the field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null", "~", ""):
            return None
        scalars = [a for a in args if a is not type(None) and typing.get_origin(a) is not list]
        return _parse_scalar(key, text, scalars[0])
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if tp is int:
            return int(text.replace("_", ""))
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        raise ConfigError(f"{key} must be {tp.__name__}, got {text!r}") from None
    raise ConfigError(f"{key} has a type the loader cannot parse: {tp}")


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from a nested dict of strings."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give it keys, not {value!r}")
            _apply(current, value, key + ".")
        elif isinstance(value, list) and (item_type := _list_item_type(hints[name])) is not None:
            setattr(obj, name, _parse_list(key, value, item_type))
        else:
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{key} takes a single value, not {value!r}")
            setattr(obj, name, _parse_scalar(key, str(value), hints[name]))


def _list_item_type(tp: Any) -> type | None:
    """The dataclass of a ``list[Item]`` alternative of a field's type, if it has one."""
    for alt in typing.get_args(tp) or (tp,):
        if typing.get_origin(alt) is list:
            return typing.get_args(alt)[0]
    return None


def _parse_list(key: str, items: list, item_type: type) -> list:
    """A list of items, each a mapping of the item's fields or the value of its first field."""
    first = dataclasses.fields(item_type)[0].name
    out = []
    for i, item in enumerate(items):
        obj = item_type()
        _apply(obj, item if isinstance(item, dict) else {first: item}, f"{key}[{i}].")
        out.append(obj)
    return out


def recipe_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(config: str) -> tuple[dict[str, Any], str]:
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {config} does not exist")
        text, source = path.read_text(), str(path)
    elif config in recipe_names():
        text = (RECIPES / f"{config}.yaml").read_text()
        source = f"recipe {config}"
    else:
        raise ConfigError(
            f"--config {config!r} is neither a YAML file nor a recipe ({', '.join(recipe_names())})"
        )
    try:
        # BaseLoader keeps every scalar a string; the dataclass types parse them.
        data = yaml.load(text, Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, not {type(data).__name__}")
    return data, source


def _override_to_dict(item: str) -> dict[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set takes key=value (like model.n_layers=4), got {item!r}")
    node: dict[str, Any] = {}
    root = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return root


def load_config(config: str | None = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the validated config: defaults, then the YAML file or recipe, then ``--set``s."""
    cfg = Config()
    data, _ = _read_yaml(config or "tiny")
    _apply(cfg, data, "")
    return apply_overrides(cfg, overrides).validate()


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``key=value`` strings to ``cfg`` (not validated)."""
    for item in overrides:
        _apply(cfg, _override_to_dict(item), "")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint manifest)."""
    cfg = Config()
    _apply(cfg, yaml.load(yaml.safe_dump(data), Loader=yaml.BaseLoader), "")
    return cfg.validate()
