"""How a state dict fails to fit a model, said one way wherever weights are loaded: a
checkpoint into its run's model, an official BEiT-3 file into the encoder, a VQ-KD tokenizer
file. :func:`compare_state` finds the keys; the caller decides which problems are errors and
raises its own kind of error with :class:`StateMismatch`'s text."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["StateMismatch", "compare_state", "listing"]


def listing(keys: Iterable[str], limit: int = 12) -> str:
    """Sorted keys, comma-separated: the first ``limit`` and a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class StateMismatch:
    """The keys of a state dict that do not fit: ``missing`` (expected, absent), ``unexpected``
    (present, not expected) and ``wrong_shape`` (``"key (found) (expected shape)"``), each named
    as the source names them. False when everything fits; its text lists what does not."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def __str__(self) -> str:
        parts = (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.wrong_shape))
        return "; ".join(f"{what}: {listing(keys)}" for what, keys in parts if keys)


def compare_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...] | torch.Size], *,
                  name_of: Callable[[str], str | None] | None = None,
                  ignore: Callable[[str], bool] | None = None) -> StateMismatch:
    """What of ``state`` does not fit ``expected`` (key -> shape). ``name_of`` gives a key as the
    source file names it (default: as it is); keys of ``state`` for which ``ignore`` is true
    are neither unexpected nor loaded."""
    def source(key: str) -> str:
        return (name_of(key) if name_of is not None else None) or key

    present = {k: v for k, v in state.items() if ignore is None or not ignore(k)}
    return StateMismatch(
        missing=[source(k) for k in expected if k not in present],
        unexpected=[source(k) for k in present if k not in expected],
        wrong_shape=[f"{source(k)} {tuple(present[k].shape)} (expected {tuple(shape)})"
                     for k, shape in expected.items() if k in present and tuple(present[k].shape) != tuple(shape)])
