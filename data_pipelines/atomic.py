"""Files and folders written whole or not at all: each is staged under a hidden sibling name and
renamed into place (one ``rename(2)``, atomic on POSIX within a filesystem), so a crash or an
error mid-way leaves the old version or nothing, never half a file.

    with atomic_write(path) as tmp:          # a file: write tmp, it becomes path
        tmp.write_text(...)
    with atomic_write(out_dir, directory=True) as tmp:   # a folder: fill tmp
        ...

The checkpoint writer (``multimodal_moe.training.checkpoint``) stages the same way and also
fsyncs every file and repoints ``latest``; writers whose staging outlives one block (a shard
sink open across calls) use :func:`staging_path` and :func:`put_in_place` directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "put_in_place", "remove", "staging_path"]


def staging_path(path: str | os.PathLike) -> Path:
    """The hidden sibling that ``path`` is staged under (per process, so two writers of the same
    path never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    """Delete a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def put_in_place(staged: Path, path: str | os.PathLike) -> Path:
    """Rename ``staged`` to ``path``. A file replaces an existing one atomically; an existing
    folder is removed first (POSIX renames a folder only over an empty one)."""
    path = Path(path)
    if staged.is_dir() and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(staged, path)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Stage ``path``: yields its :func:`staging_path` (an empty folder when ``directory``; for a
    file, nothing yet), renamed to ``path`` when the block ends and removed when it raises.
    ``fsync``: the staged file reaches the disk before the rename (for a file that must survive
    a power cut, not only a crash of this process)."""
    path = Path(path)
    staged = staging_path(path)
    remove(staged)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staged.mkdir()
    try:
        yield staged
        if fsync and staged.is_file():
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
        put_in_place(staged, path)
    except BaseException:
        remove(staged)
        raise
