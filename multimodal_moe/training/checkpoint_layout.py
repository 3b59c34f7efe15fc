"""The checkpoint layout: a run's ``checkpoints/`` folder holds ``step_XXXXXXX/`` directories and
``latest``, a symlink to the newest. Each checkpoint directory holds::

    model.safetensors   the backbone's weights, whole (what fine-tuning and ``load_checkpoint`` read)
    heads.safetensors   the task's own weights (pretraining heads)
    ema.safetensors     the weight EMA of the backbone, when training keeps one
    state.pt            optimizer (unless sharded), per-rank RNG and data-reader
                        state, step, meters: plain tensors and containers, read with
                        ``weights_only=True``
    sharded/            FSDP2 runs only: model and optimizer shards (torch.distributed.checkpoint)
    config.yaml         the resolved run config
    checksums.json      CRC-32 and size of every other file, checked whenever one is read, so a
                        flipped bit or a truncated file is an error naming it, never loaded

A converted checkpoint is such a folder on its own, without ``state.pt``. The names, the
checksums, the ``latest`` pointer and how a path is resolved to a checkpoint live here; writing
and reading one, in :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

__all__ = ["CHECKSUMS_FILE", "CONFIG_FILE", "CheckpointError", "EMA_FILE", "HEADS_FILE", "LATEST", "MODEL_FILE",
           "SHARDED_DIR", "STATE_FILE", "file_checksum", "find_checkpoint", "fsync_path", "latest_target",
           "point_latest", "step_dir_name", "write_checksums"]

MODEL_FILE, HEADS_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE, SHARDED_DIR, CHECKSUMS_FILE = (
    "model.safetensors", "heads.safetensors", "ema.safetensors", "state.pt", "config.yaml", "sharded",
    "checksums.json")
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def file_checksum(path: Path) -> dict[str, int]:
    """CRC-32 and size of a file, read in 16 MiB blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"crc32": crc, "bytes": size}


def write_checksums(directory: Path) -> None:
    """``checksums.json`` of every file under ``directory``."""
    sums = {str(p.relative_to(directory)): file_checksum(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_FILE}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1) + "\n")


def latest_target(root: Path) -> Path | None:
    """The checkpoint folder ``root/latest`` points at, if it points at one."""
    latest = root / LATEST
    return latest.resolve() if latest.exists() else None


def point_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (``os.replace`` of a fresh symlink)."""
    link = root / f".tmp-{LATEST}"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, root / LATEST)
    fsync_path(root)


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: a checkpoint dir, ``checkpoints/latest``, a
    run's ``checkpoints/`` folder or a run dir (both meaning their latest)."""
    path = Path(path)
    for candidate in (path, path / LATEST, path / "checkpoints" / LATEST):
        if (candidate / MODEL_FILE).is_file() or (candidate / STATE_FILE).is_file():
            return candidate.resolve()
    for link in (path / LATEST, path / "checkpoints" / LATEST):
        if link.is_symlink() and not link.exists():
            others = sorted(p.name for p in link.parent.glob("step_*") if p.is_dir())
            raise CheckpointError(f"{link} points at {os.readlink(link)}, which does not exist; the checkpoints there "
                                  f"are {', '.join(others) or 'none'} (--resume=latest-intact takes the newest intact "
                                  f"one)")
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raise CheckpointError(f"{str(path)!r} is not a checkpoint: expected a directory with {MODEL_FILE} and "
                          f"{STATE_FILE}, a checkpoints/ folder with {LATEST}, or a run directory")
