"""Checkpoints: written so a crash at any instant never leaves one that gets loaded half-written.

A run's ``checkpoints/`` folder holds ``step_XXXXXXX/`` directories and ``latest``, a symlink to
the newest. Each checkpoint directory holds::

    model.safetensors   the backbone's weights (what fine-tuning and ``load_checkpoint`` read)
    heads.safetensors   the task's own weights (pretraining heads)
    ema.safetensors     the weight EMA of backbone and heads, when training keeps one
    state.pt            optimizer, scheduler, RNG and data-reader state, step, meters
                        (plain tensors and containers: read with ``weights_only=True``)
    config.yaml         the resolved run config

It is written into ``.tmp-step_XXXXXXX`` (every file flushed to disk), renamed into place,
and only then is ``latest`` repointed (``os.replace`` of a fresh symlink, atomic on POSIX). The
oldest checkpoints beyond ``keep`` are deleted last, never the one ``latest`` names.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..config import Config, dump_config
from ..configurable import ConfigError, parse, to_dict

__all__ = ["Checkpoint", "CheckpointError", "config_differences", "find_checkpoint", "save_checkpoint"]

MODEL_FILE, HEADS_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE = (
    "model.safetensors", "heads.safetensors", "ema.safetensors", "state.pt", "config.yaml")
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split_task_state(task: nn.Module) -> dict[str, torch.Tensor]:
    """The task's tensors outside its backbone (``task.model``)."""
    return {k: v.detach().contiguous() for k, v in task.state_dict().items() if not k.startswith("model.")}


def save_checkpoint(checkpoints_dir: str | Path, step: int, *, task: nn.Module, state: dict[str, Any], cfg: Config,
                    ema: nn.Module | None = None, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.

    Args:
        checkpoints_dir: the run's ``checkpoints/`` folder (created if needed).
        step: optimizer updates done.
        task: the (unwrapped) task; its ``model`` is the backbone.
        state: the training state for ``state.pt`` (tensors, numbers, strings, containers).
        cfg: the resolved run config.
        ema: the EMA copy of ``task``, if any.
        keep: checkpoints to keep.
    """
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": "multimodal_moe", "step": str(step)}
    save_model(task.model, str(tmp / MODEL_FILE), metadata=meta)
    save_file(_split_task_state(task), str(tmp / HEADS_FILE), metadata=meta)
    if ema is not None:
        save_model(ema, str(tmp / EMA_FILE), metadata=meta)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(dump_config(cfg))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = root / name
    if final.exists():  # the same step again (a run that ends where it was checkpointed)
        shutil.rmtree(final)
    os.replace(tmp, final)
    link = root / f".tmp-{LATEST}"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, root / LATEST)
    _fsync(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: a checkpoint dir, ``checkpoints/latest``, a
    run's ``checkpoints/`` folder or a run dir (both meaning their latest)."""
    path = Path(path)
    for candidate in (path, path / LATEST, path / "checkpoints" / LATEST):
        if (candidate / MODEL_FILE).is_file() or (candidate / STATE_FILE).is_file():
            return candidate.resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raise CheckpointError(f"{str(path)!r} is not a checkpoint: expected a directory with {MODEL_FILE} and "
                          f"{STATE_FILE}, a checkpoints/ folder with {LATEST}, or a run directory")


def config_differences(saved: Any, requested: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configs, with both values."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(saved) | set(requested), key=str):
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in requested:
                out.append(f"{sub} (only in the {'checkpoint' if key in saved else 'requested config'})")
            else:
                out.extend(config_differences(saved[key], requested[key], sub))
        return out
    return [] if saved == requested else [f"{prefix} (checkpoint {saved!r}, requested {requested!r})"]


@dataclass
class Checkpoint:
    """A checkpoint directory, read lazily."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        ckpt = cls(find_checkpoint(path))
        missing = [f for f in (MODEL_FILE, CONFIG_FILE) if not (ckpt.path / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt.path} is incomplete: missing {', '.join(missing)}")
        return ckpt

    @property
    def config(self) -> Config:
        try:
            return parse(Config, yaml.safe_load((self.path / CONFIG_FILE).read_text()))
        except (yaml.YAMLError, ConfigError) as e:
            raise CheckpointError(f"{self.path / CONFIG_FILE} is not a valid run config: {e}") from None

    def check_compatible(self, cfg: Config, sections: tuple[str, ...] = ("model",)) -> None:
        """Raise :class:`CheckpointError` naming every key of ``sections`` that differs."""
        saved = to_dict(self.config)
        requested = to_dict(cfg)
        diffs = [d for s in sections for d in config_differences(saved.get(s), requested.get(s), s)]
        if diffs:
            raise CheckpointError(f"checkpoint {self.path} does not fit the requested config; mismatched keys:\n  "
                                  + "\n  ".join(diffs))

    def _load(self, fn, what: str, *args, **kwargs):
        path = self.path / what
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {what}")
        try:
            return fn(*args, str(path), **kwargs) if args else fn(str(path), **kwargs)
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None

    def load_model_into(self, model: nn.Module) -> None:
        """Load the backbone weights (strict: every key present, no extra, same shapes)."""
        self._load(load_model, MODEL_FILE, model, strict=True)

    def load_task_into(self, task: nn.Module) -> None:
        self.load_model_into(task.model)
        heads = self._load(load_file, HEADS_FILE)
        missing, unexpected = task.load_state_dict(heads, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise CheckpointError(f"{self.path / HEADS_FILE} does not fit the task: missing {missing}, "
                                  f"unexpected {unexpected}")

    def load_ema_into(self, ema: nn.Module) -> None:
        self._load(load_model, EMA_FILE, ema, strict=True)

    def training_state(self) -> dict[str, Any]:
        return self._load(torch.load, STATE_FILE, weights_only=True, map_location="cpu")
