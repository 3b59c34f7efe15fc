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
from typing import Any

import yaml

from .configurable import ConfigError, Configurable, config, parse, to_dict
from .models import ModelConfig

__all__ = ["Config", "dump_config", "list_presets", "load_config", "preset_dir", "resolve_preset"]


@config
class Config(Configurable):
    """The root of a run's configuration.

    Attributes:
        model: the model to build (``kind``: multiway_encoder | decoder_lm).
        seed: seed for parameter init and everything random in a run.
    """

    model: ModelConfig
    seed: int = 0


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


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            out[key] = _merge(old, value)
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
    return _merge(_read_tree(parent_path, (*seen, path)), data)


def _overrides_tree(overrides: Iterable[str]) -> dict:
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
        node[leaf] = yaml.safe_load(raw)
    return tree


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a preset file (or bundled preset name) with ``key=value`` overrides, strictly.

    Raises:
        ConfigError: naming the dotted key for an unknown key (with the valid ones), a missing
            key, a wrong type or an invalid value.
    """
    tree = _merge(_read_tree(resolve_preset(path)), _overrides_tree(overrides))
    return parse(Config, tree)


def dump_config(cfg: Config) -> str:
    """YAML text that :func:`load_config` turns back into ``cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
