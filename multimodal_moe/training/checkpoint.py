"""Checkpoints: written so a crash at any instant never leaves one that gets loaded half-written.

What a checkpoint folder holds is :mod:`.checkpoint_layout`. A checkpoint is written into
``.tmp-step_XXXXXXX`` (every file flushed to disk), renamed into place, and only then is
``latest`` repointed (``os.replace`` of a fresh symlink, atomic on POSIX); a converted one is
such a folder on its own (:class:`FolderWriter`). To make room, the oldest checkpoints are
deleted before the new one is written, down to ``keep - 1`` (at least one, and never the one
``latest`` names); a write that fails removes its temporary folder and says why (a full disk:
where, how much is free, how much a checkpoint takes). Weights that share storage (a tied
output projection) are stored once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config, dump_config, merge_trees, overrides_tree
from ..configurable import ConfigError, parse, to_dict
from ..models.beit3_weights import resize_vision_positions
from ..state_dicts import compare_state
from .checkpoint_layout import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    EMA_FILE,
    HEADS_FILE,
    MODEL_FILE,
    SHARDED_DIR,
    STATE_FILE,
    CheckpointError,
    file_checksum,
    find_checkpoint,
    fsync_path,
    latest_target,
    point_latest,
    step_dir_name,
    write_checksums,
)

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriter", "FolderWriter", "check_new_folder",
           "config_differences", "find_checkpoint", "load_weights", "save_checkpoint"]

def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every tensor stored once: later names of a shared tensor are dropped."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def save_weights(state: dict[str, torch.Tensor], path: Path, step: int) -> None:
    save_file(_without_aliases(state), str(path), metadata={"format": "multimodal_moe", "step": str(step)})


class CheckpointWriter:
    """One checkpoint being written: files go into :attr:`tmp`, :meth:`commit` publishes it.

    In a distributed run every rank constructs it and calls :meth:`commit` (both synchronise);
    rank 0 writes the files, every rank may write shards into ``tmp / "sharded"``.
    """

    def __init__(self, root: str | Path, step: int, *, is_main: bool = True, barrier=lambda: None, keep: int = 3):
        self.root, self.step, self.is_main, self.barrier = Path(root), step, is_main, barrier
        self.name = step_dir_name(step)
        self.tmp = self.root / f".tmp-{self.name}"
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._prune(max(keep - 1, 1))
            self._start()
        barrier()

    def _start(self) -> None:
        if self.tmp.exists():  # left by a crash
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def _prune(self, keep: int) -> None:
        """Delete the oldest checkpoints beyond the newest ``keep``, never the one ``latest`` names."""
        latest = latest_target(self.root)
        for old in sorted(p for p in self.root.glob("step_*") if p.is_dir())[:-keep]:
            if old.name != self.name and old.resolve() != latest:
                shutil.rmtree(old)

    def abort(self) -> None:
        """Remove what a failed write left."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _failed(self, e: OSError) -> CheckpointError:
        self.abort()
        sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in self.root.glob("step_*")]
        free = shutil.disk_usage(self.root).free
        need = f"; a checkpoint takes about {max(sizes)} bytes" if sizes else ""
        return CheckpointError(f"writing checkpoint {self.name} into {self.tmp} failed: {e.strerror or e} "
                               f"({free} bytes free on that disk{need}); the previous checkpoints are intact")

    def write(self, *, model: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], cfg: Config,
              state: dict[str, Any] | None = None, ema: dict[str, torch.Tensor] | None = None,
              files: dict[str, str] | None = None) -> None:
        """Rank 0's files: weights, training state (none in a converted checkpoint), config, and
        ``files`` (name -> text: a converter's report), all checksummed."""
        try:
            save_weights(model, self.tmp / MODEL_FILE, self.step)
            save_weights(heads, self.tmp / HEADS_FILE, self.step)
            if ema is not None:
                save_weights(ema, self.tmp / EMA_FILE, self.step)
            if state is not None:
                torch.save({**state, "step": self.step}, self.tmp / STATE_FILE)
            (self.tmp / CONFIG_FILE).write_text(dump_config(cfg))
            for name, text in (files or {}).items():
                (self.tmp / name).write_text(text)
        except OSError as e:
            raise self._failed(e) from e
        except RuntimeError as e:  # torch.save reports a full disk as an "enforce fail" RuntimeError
            raise self._failed(OSError(str(e).splitlines()[0])) from e

    def _publish(self) -> None:
        """Checksum and flush the temporary folder, then rename it into place."""
        write_checksums(self.tmp)
        for f in sorted(self.tmp.rglob("*"), reverse=True):
            fsync_path(f)
        fsync_path(self.tmp)
        final = self.root / self.name
        if final.exists():  # the same step again (a run that ends where it was checkpointed)
            shutil.rmtree(final)
        os.replace(self.tmp, final)

    def commit(self, keep: int) -> Path:
        """Flush, rename into place, repoint ``latest``, delete the oldest beyond ``keep``."""
        self.barrier()
        if self.is_main:
            self._publish()
            point_latest(self.root, self.name)
            self._prune(keep)
        self.barrier()
        return self.root / self.name


def check_new_folder(path: str | Path) -> None:
    """Raise ``FileExistsError`` unless ``path`` is absent or an empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose another --dst")


class FolderWriter(CheckpointWriter):
    """A checkpoint written as the folder ``path`` itself (absent or empty), outside any run: a
    converted one. The same files and checksums, renamed into place by :meth:`commit`, but no
    ``latest`` and nothing pruned; single-process, ``step`` only labels the weights."""

    def __init__(self, path: str | Path, step: int = 0):
        path = Path(path)
        check_new_folder(path)
        self.root, self.name, self.step, self.is_main, self.barrier = path.parent, path.name, step, True, lambda: None
        self.tmp = self.root / f".tmp-{self.name}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._start()

    def commit(self, keep: int = 1) -> Path:
        """Flush and rename into place (``keep`` is unused: nothing is pruned)."""
        check_new_folder(self.root / self.name)
        self._publish()
        return self.root / self.name


def task_states(task: nn.Module, state: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone weights, the task's other weights) of a task's state dict (``state``: one
    gathered from shards), each tied weight once."""
    state = task.state_dict() if state is None else state
    seen: set[int] = set()
    for name, p in task.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state = {k: v for k, v in state.items() if k != name}
        seen.add(id(p))
    model = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return model, {k: v for k, v in state.items() if not k.startswith("model.")}


def save_checkpoint(checkpoints_dir: str | Path, step: int, *, task: nn.Module, state: dict[str, Any], cfg: Config,
                    ema: nn.Module | None = None, keep: int = 3) -> Path:
    """Write a single-process checkpoint of ``task`` (its ``model`` is the backbone) atomically,
    point ``latest`` at it, keep the newest ``keep``."""
    writer = CheckpointWriter(checkpoints_dir, step, keep=keep)
    model, heads = task_states(task)
    writer.write(model=model, heads=heads, state=state, cfg=cfg, ema=None if ema is None else ema.state_dict())
    return writer.commit(keep)


def converted_checkpoints(dst: str | Path) -> Path:
    """The checkpoints folder of the run dir ``dst`` that a conversion is to write; refused when
    it already holds checkpoints."""
    checkpoints = Path(dst) / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{checkpoints} already holds checkpoints; choose a new --dst")
    return checkpoints


def save_converted(checkpoints: Path, task: nn.Module, cfg: Config, source: Checkpoint, conversion: str) -> Path:
    """One checkpoint of ``task`` (``cfg``) converted from ``source``, at its step and without
    optimizer state, for ``--init`` to start a run from; returns its path."""
    writer = CheckpointWriter(checkpoints, source.training_state()["step"], keep=1)
    model, heads = task_states(task)
    writer.write(model=model, heads=heads, cfg=cfg,
                 state={"converted_from": str(source.path), "conversion": conversion})
    return writer.commit(keep=1)


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


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)``, strict except for names that alias a loaded tensor
    (tied weights are stored once); any other missing or unexpected key is an error naming it."""
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()
                if k in state or not (k in params and id(params[k]) in loaded)}
    if mismatch := compare_state(state, expected):
        raise CheckpointError(f"{source} does not fit the model: {mismatch}")
    module.load_state_dict(state, strict=False)


VISION_POSITIONS = "vision_embed.pos_embed"  # the encoder's (1, 1 + patches, D) table


def at_image_size(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (an encoder's weights) with its vision position table resized to ``model``'s
    patch grid where the model is built for another image size (bicubic, the CLS row kept, as
    unilm resizes it); any other state as it is."""
    ours, table = dict(model.named_parameters()).get(VISION_POSITIONS), state.get(VISION_POSITIONS)
    if ours is None or table is None or ours.shape == table.shape or ours.shape[2] != table.shape[2]:
        return state
    return {**state, VISION_POSITIONS: resize_vision_positions(table, math.isqrt(ours.shape[1] - 1))}


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

    def set_aside_newer(self) -> list[str]:
        """Make this checkpoint the run's ``latest``, renaming every newer ``step_*`` folder to
        ``corrupt-step_*`` (kept for a look, out of pruning's and the next writes' way); the
        names set aside. For a resume from an older checkpoint than ``latest``."""
        newer = sorted(p for p in self.path.parent.glob("step_*") if p.is_dir() and p.name > self.path.name)
        for path in newer:
            os.replace(path, path.with_name(f"corrupt-{path.name}"))
        point_latest(self.path.parent, self.path.name)
        return [p.name for p in newer]

    @classmethod
    def latest_intact(cls, checkpoints_dir: str | Path) -> Checkpoint:
        """The newest checkpoint in ``checkpoints_dir`` that opens and verifies; each one passed
        over is named on stderr."""
        candidates = sorted((p for p in Path(checkpoints_dir).glob("step_*") if p.is_dir()), reverse=True)
        for path in candidates:
            try:
                ckpt = cls.open(path)
                ckpt.verify()
                return ckpt
            except CheckpointError as e:
                print(f"passing over {path.name}: {e}", file=sys.stderr)
        raise CheckpointError(f"no intact checkpoint in {checkpoints_dir} ({len(candidates)} tried)")

    @property
    def config(self) -> Config:
        return self.config_with(())

    def config_with(self, overrides: Iterable[str]) -> Config:
        """The config the checkpoint was written with, ``key=value`` overrides (``--set``) on top.

        Raises:
            CheckpointError: the saved config is unreadable.
            ConfigError: an override names an unknown key or a bad value.
        """
        self.verify(CONFIG_FILE)
        try:
            saved = to_dict(parse(Config, yaml.safe_load((self.path / CONFIG_FILE).read_text())))
        except (yaml.YAMLError, ConfigError) as e:
            raise CheckpointError(f"{self.path / CONFIG_FILE} is not a valid run config: {e}") from None
        return parse(Config, merge_trees(saved, overrides_tree(overrides)))

    @property
    def sharded(self) -> Path | None:
        """The folder of an FSDP2 run's shards, if this checkpoint has one."""
        path = self.path / SHARDED_DIR
        return path if path.is_dir() else None

    def check_compatible(self, cfg: Config, sections: tuple[str, ...] = ("model",)) -> None:
        """Raise :class:`CheckpointError` naming every key of ``sections`` that differs."""
        saved, requested = to_dict(self.config), to_dict(cfg)
        diffs = [d for s in sections for d in config_differences(saved.get(s), requested.get(s), s)]
        if diffs:
            raise CheckpointError(f"checkpoint {self.path} does not fit the requested config; mismatched keys:\n  "
                                  + "\n  ".join(diffs))

    def verify(self, name: str | None = None) -> None:
        """Check one file (or all) against ``checksums.json``; raise :class:`CheckpointError`
        naming the corrupt file. Checkpoints written before checksums existed pass."""
        sums_path = self.path / CHECKSUMS_FILE
        if not sums_path.is_file():
            return
        try:
            sums = json.loads(sums_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{sums_path} is unreadable ({e}); the checkpoint cannot be verified") from None
        for rel in [name] if name is not None else sorted(sums):
            path = self.path / rel
            if rel not in sums or not path.is_file():
                continue
            got = file_checksum(path)
            if got != sums[rel]:
                raise CheckpointError(f"{path} is corrupt: {got['bytes']} bytes with CRC-32 {got['crc32']:08x}, but "
                                      f"it was written as {sums[rel]['bytes']} bytes with CRC-32 "
                                      f"{sums[rel]['crc32']:08x} (resume from an older checkpoint with "
                                      f"--resume=latest-intact)")

    def _read(self, fn, name: str, **kwargs):
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {name}")
        self.verify(name)
        try:
            return fn(str(path), **kwargs)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f"it asks for {found.group(1)}" if found else str(e).strip().splitlines()[0][:200]
            raise CheckpointError(f"{path} pickles Python objects other than tensors and plain values, which no "
                                  f"checkpoint of ours holds ({what}); it was not unpickled, since that could run "
                                  f"code") from None
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None

    def weights(self, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
        """A weights file (``model``, ``heads`` or ``ema.safetensors``) as a state dict."""
        return self._read(load_file, name)

    def _backbone(self, model: nn.Module, resize_positions: bool) -> dict[str, torch.Tensor]:
        state = self.weights(MODEL_FILE)
        return at_image_size(model, state) if resize_positions else state

    def load_model_into(self, model: nn.Module, *, resize_positions: bool = False) -> None:
        """Load the backbone weights (strict: every key present, no extra, same shapes; with
        ``resize_positions`` the vision position table is resized to the model's image size
        first, :func:`at_image_size`: what ``--init`` does)."""
        load_weights(model, self._backbone(model, resize_positions), str(self.path / MODEL_FILE))

    def load_task_weights(self, task: nn.Module, *, resize_positions: bool = False) -> None:
        """Load the backbone into ``task.model`` (as :meth:`load_model_into`) and the task's own
        weights (heads) into the rest of ``task``, both strictly."""
        backbone = self._backbone(task.model, resize_positions)
        load_weights(task, {**{f"model.{k}": v for k, v in backbone.items()}, **self.weights(HEADS_FILE)},
                     str(self.path))

    def heads_fit(self, task: nn.Module) -> bool:
        """Whether this checkpoint's heads are ``task``'s: the same task kind, names and shapes,
        and the same meaning (such as a VQA head's answer list). A converted backbone has none."""
        mine, heads, own = self.config.task, self.weights(HEADS_FILE), task_states(task)[1]
        return (mine is not None and mine.kind == task.cfg.kind
                and mine.heads_depend_on() == task.resolved_config().heads_depend_on()
                and heads.keys() == own.keys() and all(heads[k].shape == own[k].shape for k in own))

    def load_task(self, cfg: Config | None = None) -> nn.Module:
        """The task of ``cfg`` (default: the checkpoint's own config) with this checkpoint's
        backbone and heads, both loaded strictly.

        Raises:
            ValueError: the checkpoint holds no heads of that task (e.g. a pretraining
                checkpoint evaluated as VQA), with the ones it has and the ones needed.
        """
        from ..tasks import build_task

        cfg = self.config if cfg is None else cfg
        task = build_task(cfg)
        heads, expected = self.weights(HEADS_FILE), set(task_states(task)[1])
        if set(heads) != expected:
            raise ValueError(f"{self.path} holds heads {sorted(heads) or 'none'}, the {cfg.task.kind} task needs "
                             f"{sorted(expected)}; fine-tune it first (mmoe finetune --init {self.path})")
        self.load_task_weights(task)
        return task

    def training_state(self) -> dict[str, Any]:
        return self._read(torch.load, STATE_FILE, weights_only=True, map_location="cpu")

    def finetune_config(self, cfg: Config) -> Config:
        """``cfg`` for a run that starts from this checkpoint's backbone: the model as it was
        trained (whatever its FFN kinds), with ``cfg``'s drop path, gradient checkpointing and
        attention backend, and for an encoder ``cfg``'s image size (the vision position table is
        resized when the weights load: BEiT-3 fine-tunes at 384 or 480 px what it pretrained at 224)."""
        return dataclasses.replace(cfg, model=self.config.model.with_finetune_fields_of(cfg.model))
