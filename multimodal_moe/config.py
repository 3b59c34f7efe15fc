"""Run configuration: YAML presets with ``extends:`` and ``--set key=value`` overrides.

A preset is a YAML file in ``configs/``. ``extends: <path>`` (relative to the file) names a
parent preset; the child's keys are merged over the parent's, mapping by mapping, except that
a mapping whose ``kind`` differs from the parent's replaces it whole (a new FFN kind does not
inherit the old one's fields). Overrides ``a.b=c`` are parsed as YAML values (``3`` is an int,
``true`` a bool, ``[1, 2]`` a list) and merged the same way, after the files. The result is
checked by :func:`multimodal_moe.configurable.parse` before anything is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .configurable import ConfigError, Configurable, config, parse, to_dict
from .models import ModelConfig
from .tasks import TaskConfig, default_task

__all__ = ["Config", "TrainConfig", "dump_config", "list_presets", "load_config", "preset_dir", "resolve_preset"]


@config
class TrainConfig(Configurable):
    """How a task is trained.

    Attributes:
        steps: optimizer updates.
        optimizer: adamw | adam | adafactor (:mod:`multimodal_moe.training.optim` says how each
            treats weight decay and which of the settings below apply).
        schedule: cosine | linear | inverse_sqrt | constant_with_warmup: the lr after warmup
            (formulas in :mod:`multimodal_moe.training.optim`).
        lr: peak learning rate (reached after warmup).
        min_lr: the end of the cosine and linear decays.
        warmup_steps: linear warmup from 0.
        constant_steps: updates at the peak lr between warmup and decay (T5 / OpenMoE's
            inverse-square-root schedule: no warmup, 10k constant steps).
        weight_decay: decoupled for adamw and adafactor, L2 for adam; not applied to biases,
            norms, positions, CLS/mask tokens.
        betas / eps: Adam(W) moments (BEiT-3: 0.9, 0.98 and 1e-6).
        layer_decay: layer-wise lr decay factor (lr x decay^(layers above)); null disables it.
        grad_accum: micro-batches per update.
        clip_grad: clip the global gradient norm to this; null disables clipping.
        precision: auto (bf16 autocast on a GPU that supports it, fp32 otherwise) | fp32 | bf16.
        ema_decay: keep an exponential moving average of the weights (timm ModelEmaV3); 0 disables it.
        compile: compile the backbone with ``torch.compile`` (heads and losses stay eager).
        tf32: in fp32 runs on CUDA, matmuls and convolutions may use TF32 tensor cores (Ampere
            and newer), routing included; false keeps them in full fp32. bf16 runs leave TF32
            off, so what they compute in fp32 (routing, visual targets, losses) stays exact.
        device: auto (CUDA if available, else CPU) | cpu | cuda | cuda:N ...
        num_workers: data loader worker processes per stream.
        log_every: steps between lines of ``metrics.jsonl`` (values are averaged over them).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        keep_checkpoints: how many checkpoints to keep (oldest deleted first).
        max_bad_steps: stop after this many consecutive steps with a non-finite loss or gradient.
        tensorboard: also write TensorBoard scalars to ``<run-dir>/tensorboard``.
        data_parallel: under torchrun, ddp (replicated weights) | fsdp (FSDP2: sharded weights,
            gradients and optimizer state; sharded checkpoints).
        expert_parallel: under torchrun with ddp, split each top-k / MH-MoE layer's experts over
            groups of this many ranks (1: experts replicated).
    """

    steps: int = 300
    optimizer: Literal["adamw", "adam", "adafactor"] = "adamw"
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant_with_warmup"] = "cosine"
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    constant_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float | None = None
    grad_accum: int = 1
    clip_grad: float | None = 3.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    ema_decay: float = 0.0
    compile: bool = False
    tf32: bool = True
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    tensorboard: bool = False
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel: int = 1

    def check(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                     "expert_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "constant_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf") or not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr" if self.lr > 0 else "lr",
                              f"need 0 < lr and 0 <= min_lr <= lr; got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps + self.constant_steps >= self.steps:
            name = "warmup_steps" if self.warmup_steps >= self.steps else "constant_steps"
            raise ConfigError(name, f"warmup_steps + constant_steps = {self.warmup_steps + self.constant_steps} "
                                    f"leave no step of the {self.steps} to decay")
        if self.schedule == "inverse_sqrt" and not self.warmup_steps + self.constant_steps:
            raise ConfigError("schedule", "inverse_sqrt decays as sqrt(W / t) from update W = warmup_steps + "
                                          "constant_steps; set one of them")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError("eps" if self.eps <= 0 else "weight_decay", "eps must be > 0 and weight_decay >= 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError("layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("clip_grad", f"must be positive or null, got {self.clip_grad}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.expert_parallel > 1 and self.data_parallel != "ddp":
            raise ConfigError("expert_parallel", "runs with data_parallel: ddp (FSDP2 already shards the experts)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError("device", f"{self.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        if self.ema_decay and (self.expert_parallel > 1 or self.data_parallel == "fsdp"):
            raise ConfigError("ema_decay", "the weight EMA keeps a whole copy of the model; it is not available with "
                                           "sharded weights (fsdp or expert_parallel > 1)")


@config
class Config(Configurable):
    """The root of a run's configuration.

    Attributes:
        model: the model to build (``kind``: multiway_encoder | decoder_lm).
        task: what ``mmoe pretrain`` trains it on (``kind``: mmm | lm); :func:`load_config`
            fills in the model's default task on the bundled data when a preset names none.
        train: optimisation, logging and checkpoints.
        seed: seed for parameter init and everything random in a run.
    """

    model: ModelConfig
    task: TaskConfig | None = None
    train: TrainConfig = TrainConfig()
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be in [0, 2**63), got {self.seed}")
        if self.task is not None:
            try:
                self.task.check_model(self.model)
            except ConfigError as e:
                raise e.under("task") from None


def preset_dir() -> Path:
    """The bundled ``configs/`` folder: beside the package in a source checkout, inside it
    when installed from a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no configs/ folder found next to {here}")


def list_presets() -> list[str]:
    """Names of the bundled presets, e.g. ``beit3/debug``."""
    root = preset_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_preset(path: str | Path) -> Path:
    """A config file path: as given if it exists, else a bundled preset by name
    (``beit3/debug``, ``beit3/debug.yaml`` or ``configs/beit3/debug.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/")
    candidate = preset_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config {str(path)!r} is neither a file nor a bundled preset; "
                            f"presets: {', '.join(list_presets())}")


def merge_trees(base: dict, update: dict) -> dict:
    """``update`` on top of ``base``, recursively (a mapping of another ``kind`` replaces the old one)."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            out[key] = merge_trees(old, value)
        else:
            out[key] = value
    return out


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError("extends", f"cycle: {chain}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a YAML mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError("extends", f"must be a path string, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError("extends", f"{parent!r} (from {path}) does not exist")
    return merge_trees(_read_tree(parent_path, (*seen, path)), data)


def overrides_tree(overrides: Iterable[str]) -> dict:
    """``["a.b=1", "c=[x]"]`` -> ``{"a": {"b": 1}, "c": ["x"]}``, each value read as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "overrides both a value and a key inside it")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(key.strip(), f"--set value {raw!r} is not valid YAML ({problem}); quote it to pass "
                                           "a string") from None
    return tree


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a preset file (or bundled preset name) with ``key=value`` overrides, strictly.

    Raises:
        ConfigError: naming the dotted key for an unknown key (with the valid ones), a missing
            key, a wrong type or an invalid value.
    """
    files, overrides = _read_tree(resolve_preset(path)), overrides_tree(overrides)
    tree = merge_trees(files, overrides)
    if "task" not in files and isinstance(overrides.get("task", {}), dict):  # the default task, task.* on top
        model = parse(Config, {k: v for k, v in tree.items() if k not in ("task", "train")}).model
        tree["task"] = merge_trees(to_dict(default_task(model)), overrides.get("task", {}))
    return parse(Config, tree)


def dump_config(cfg: Config) -> str:
    """YAML text that :func:`load_config` turns back into ``cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
