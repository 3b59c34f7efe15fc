"""Typed, strict configuration objects.

Every component that can be configured owns a frozen, keyword-only dataclass that lives next
to it and validates itself in ``check()``. Families of interchangeable components (FFN
variants, model kinds) share a base config class that is a :class:`Registry`: the ``kind``
key of a YAML mapping selects the subclass, so a block is handed "an FFN config" and never
branches on which one.

:func:`parse` turns plain data (from YAML and ``--set`` overrides) into these dataclasses and
fails before anything is built: unknown keys (listing the valid ones), missing keys, wrong
types, out-of-range values, each error naming the dotted key it is about.
:func:`to_dict` is its inverse, used to write the resolved config into run dirs and
checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import re
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

__all__ = ["ConfigError", "Registry", "config", "parse", "to_dict"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid.

    Args:
        key: dotted path of the offending key, relative to the object that raised it; the
            parser prefixes the path of the enclosing sections.
        message: what is wrong, with the value, and what would be right.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, with its key nested under ``prefix``."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def config(cls: type[C]) -> type[C]:
    """Decorator for config classes: a frozen, keyword-only dataclass that runs ``check()``
    after construction (also after ``dataclasses.replace``)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


class Configurable:
    """Base of every config class: validation hook run at construction."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the field if a value is invalid."""


class Registry(Configurable):
    """Base of a family of configs selected by a ``kind`` key.

    A direct subclass declares the family (``class FFNConfig(Registry): ...``); its concrete
    configs register themselves under a kind name with ``@FFNConfig.register("dense")``. A kind
    whose module should load only when a config names it is declared by name instead: in code
    with :meth:`register_lazy` (``"package.module:Class"``), or, from any installed package, as
    an entry point of the family's ``entry_points`` group (``[project.entry-points.
    "multimodal_moe.tasks"]`` ``vqa = "eval_tasks.vqa:VQAConfig"`` in its ``pyproject.toml``).
    Either way the module is imported the first time the kind is looked up, and registers it.
    """

    kind: ClassVar[str] = ""
    entry_points: ClassVar[str | None] = None  # the entry-point group of a family's lazy kinds
    _kinds: ClassVar[dict[str, type]]
    _lazy: ClassVar[dict[str, str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if Registry in cls.__bases__:
            cls._kinds, cls._lazy = {}, {}

    @classmethod
    def register(cls, kind: str):
        def add(sub: type[C]) -> type[C]:
            if kind in cls._kinds:
                raise ValueError(f"{cls.__name__} kind {kind!r} is registered twice")
            sub.kind = kind
            cls._kinds[kind] = sub
            return sub

        return add

    @classmethod
    def register_lazy(cls, kind: str, target: str) -> None:
        """Declare ``kind`` as the class ``target`` (``"package.module:Class"``), imported when
        the kind is first looked up."""
        if kind in cls._kinds or cls._lazy.get(kind, target) != target:
            raise ValueError(f"{cls.__name__} kind {kind!r} is registered twice")
        cls._lazy[kind] = target

    @classmethod
    def _declared(cls) -> dict[str, str]:
        """Lazy kinds by name: the entry points of the family's group, then :meth:`register_lazy`."""
        return (_entry_points(cls.entry_points) if cls.entry_points else {}) | cls._lazy

    @classmethod
    def kind_names(cls) -> list[str]:
        """Every kind this family can build, registered or declared, sorted."""
        return sorted(cls._kinds.keys() | cls._declared().keys())

    @classmethod
    def resolve(cls, kind: str) -> type:
        """The config class of ``kind``, importing its module if it is declared lazily.

        Raises:
            KeyError: no such kind.
            ImportError: its module does not load, or does not register the kind it declares.
        """
        if kind not in cls._kinds:
            target = cls._declared()[kind]
            module, _, name = target.partition(":")
            loaded = getattr(importlib.import_module(module), name, None)
            if loaded is None or cls._kinds.get(kind) is not loaded:
                raise ImportError(f"{target} does not register {cls.__name__} kind {kind!r} (it needs "
                                  f"@{cls.__name__}.register({kind!r}))")
        return cls._kinds[kind]

    @classmethod
    def kinds(cls) -> dict[str, type]:
        """Every kind's name and config class (importing the modules of lazy ones)."""
        return {kind: cls.resolve(kind) for kind in cls.kind_names()}


@functools.cache
def _entry_points(group: str) -> dict[str, str]:
    """Name -> ``"module:Class"`` of the installed entry points of ``group``, read once per
    process (the metadata of every installed distribution is scanned)."""
    return {point.name: point.value for point in importlib.metadata.entry_points(group=group)}


def _family(tp: Any) -> type | None:
    """The registry base class if ``tp`` is one, else None."""
    if isinstance(tp, type) and issubclass(tp, Registry) and Registry in tp.__bases__:
        return tp
    return None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (dicts to dataclasses,
    lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list of {_type_name(item_tp)}, got {_describe(value)}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string; YAML 1.2 and people, as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(tp) or _family(tp) is not None:
        if isinstance(value, tp):
            return value
        return _parse_mapping(tp, value, key)
    raise TypeError(f"config annotation {tp!r} at {key!r} is not supported by the parser")


def _parse_mapping(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(key, f"expected a mapping, got {_describe(data)}")
    family = _family(cls)
    if family is not None:
        kinds = family.kind_names()
        kind = data.get("kind")
        if kind is None:
            raise ConfigError(key, f"missing 'kind'; valid kinds: {', '.join(kinds)}")
        if kind not in kinds:
            raise ConfigError(f"{key}.kind" if key else "kind", f"unknown kind {kind!r}; valid kinds: {', '.join(kinds)}")
        cls = family.resolve(kind)
        data = {k: v for k, v in data.items() if k != "kind"}
    elif "kind" in data and data["kind"] != getattr(cls, "kind", None):
        raise ConfigError(f"{key}.kind" if key else "kind", f"{cls.__name__} takes no kind {data['kind']!r}")
    else:
        data = {k: v for k, v in data.items() if k != "kind"}

    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}.{name}" if key else str(name),
                              f"unknown key{hint}; valid keys: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            values[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "missing required key")
    try:
        return cls(**values)
    except ConfigError as e:
        raise e.under(key) from None


def parse(cls: type[C], data: Any) -> C:
    """Build the config ``cls`` (a dataclass or a registry family) from plain data."""
    return _coerce(data, cls, "")


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) that :func:`parse` turns back into ``cfg``."""
    if dataclasses.is_dataclass(cfg):
        out = {"kind": cfg.kind} if isinstance(cfg, Registry) else {}
        for f in dataclasses.fields(cfg):
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg
