"""Multiway routing: per-modality copies of a module, with the routing passed explicitly.

BEiT-3 (Image as a Foreign Language, arXiv 2208.10442) and VLMo (arXiv 2111.02358) feed
``[vision tokens ; text tokens]`` through modality experts. Here the number of vision tokens
is an argument of every call — never module state, unlike torchscale's ``split_position``
attribute — and the branches are named ``vision``, ``text`` and ``vision_language``.

Routing rule (:meth:`Multiway.segments`): tokens ``[0, num_vision)`` go to ``vision`` and the
rest to ``text``; a module that also has a ``vision_language`` branch (the VL-FFN of the top
layers in the paper layout) sends a whole image-text sequence there instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Multiway", "per_modality", "route", "segments"]

VISION, TEXT, VISION_LANGUAGE = "vision", "text", "vision_language"


class Multiway(nn.ModuleDict):
    """Named per-modality branches; ``forward(x_BTD, num_vision)`` routes and concatenates.

    Args:
        branches: branch name -> module; names among ``vision``, ``text``,
            ``vision_language``.
    """

    def __init__(self, branches: dict[str, nn.Module]):
        unknown = set(branches) - {VISION, TEXT, VISION_LANGUAGE}
        if unknown or not {VISION, TEXT} <= set(branches):
            raise ValueError(f"Multiway needs vision and text branches (optionally vision_language), "
                             f"got {sorted(branches)}")
        super().__init__(branches)

    def segments(self, num_vision: int, num_tokens: int) -> list[tuple[str, slice]]:
        """Which branch handles which token range of a ``[vision ; text]`` sequence."""
        if num_vision == num_tokens:
            return [(VISION, slice(None))]
        if num_vision == 0:
            return [(TEXT, slice(None))]
        if VISION_LANGUAGE in self:
            return [(VISION_LANGUAGE, slice(None))]
        return [(VISION, slice(0, num_vision)), (TEXT, slice(num_vision, None))]

    def forward(self, x_BTD: torch.Tensor, num_vision: int) -> torch.Tensor:
        parts = [self[name](x_BTD[:, span]) for name, span in self.segments(num_vision, x_BTD.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def per_modality(make: Callable[[], nn.Module], branches: tuple[str, ...]) -> nn.Module:
    """``make()`` once per branch as a :class:`Multiway`, or a single shared module if
    ``branches`` is empty."""
    return Multiway({name: make() for name in branches}) if branches else make()


def segments(module: nn.Module, num_vision: int, num_tokens: int) -> list[tuple[str | None, slice]]:
    """:meth:`Multiway.segments` for a Multiway module; one shared segment otherwise."""
    if isinstance(module, Multiway):
        return module.segments(num_vision, num_tokens)
    return [(None, slice(None))]


def route(module: nn.Module, x_BTD: torch.Tensor, num_vision: int) -> torch.Tensor:
    """Apply a shared module, or a :class:`Multiway` one with its routing."""
    return module(x_BTD, num_vision) if isinstance(module, Multiway) else module(x_BTD)
