"""Data paths in configs: ``bundled:<rel>`` names a file or folder of the dataset bundled with
this package (``data_pipelines/bundled/<rel>``); anything else is a path as given."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED", "BUNDLED_PREFIX", "data_path"]

BUNDLED_PREFIX = "bundled:"
BUNDLED = Path(__file__).resolve().parent / "bundled"


def data_path(path: str) -> Path:
    """The file or folder a config's data path names (see the module docstring)."""
    return BUNDLED / path[len(BUNDLED_PREFIX):] if path.startswith(BUNDLED_PREFIX) else Path(path)
