"""The pretraining stream mixer: each step, one batch from each of the image, text and
image-text streams, as BEiT-3's masked data modeling trains (2048 images + 2048 texts + 2048
pairs per step in the paper, i.e. 1:1:1).

Ratios are relative frequencies: the most frequent stream appears at every step and a stream
with half its ratio at every other step, on a fixed schedule (stream s is in step n when
floor((n+1) r) > floor(n r) for its ratio r relative to the largest), so the proportions hold
exactly over any window and the schedule needs no random state to resume. Batch sizes are the
streams' own. Any stream may be absent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from fractions import Fraction

from .batches import ImageBatch, ImageTextBatch, TextBatch
from .streams import StreamLoader

__all__ = ["PretrainMixer", "PretrainStep"]

STREAMS = ("image", "text", "image_text")


@dataclasses.dataclass
class PretrainStep:
    """One step's batches; a stream that is absent, or not scheduled this step, is None."""
    step: int
    image: ImageBatch | None = None
    text: TextBatch | None = None
    image_text: ImageTextBatch | None = None

    def batches(self) -> dict[str, ImageBatch | TextBatch | ImageTextBatch]:
        return {name: b for name in STREAMS if (b := getattr(self, name)) is not None}

    def to(self, device, non_blocking: bool = False) -> PretrainStep:
        """A copy with every present batch on ``device``."""
        return dataclasses.replace(self, **{name: b.to(device, non_blocking=non_blocking)
                                            for name, b in self.batches().items()})

    def pin_memory(self) -> PretrainStep:
        """A copy with every present batch in page-locked memory (already pinned ones as they are)."""
        return dataclasses.replace(self, **{name: b.pin_memory() for name, b in self.batches().items()})


class PretrainMixer:
    """Yields :class:`PretrainStep` forever from resampled :class:`StreamLoader` s.

    Args:
        streams: loaders by stream name (``image``, ``text``, ``image_text``); None or missing = absent.
        ratios: relative frequency of each present stream (default 1 each: every stream every step).
    """

    def __init__(self, streams: dict[str, StreamLoader | None], ratios: dict[str, float] | None = None):
        unknown = set(streams) - set(STREAMS)
        if unknown:
            raise ValueError(f"unknown pretraining stream(s) {sorted(unknown)}; known: {', '.join(STREAMS)}")
        self.loaders = {name: loader for name, loader in streams.items() if loader is not None}
        if not self.loaders:
            raise ValueError("the mixer needs at least one of the image, text and image-text streams")
        ratios = dict(ratios or {})
        extra = set(ratios) - set(self.loaders)
        if extra:
            raise ValueError(f"ratios given for absent stream(s) {sorted(extra)}; present: {sorted(self.loaders)}")
        raw = {name: float(ratios.get(name, 1.0)) for name in self.loaders}
        if any(not r > 0 or math.isinf(r) for r in raw.values()):
            raise ValueError(f"stream ratios must be positive and finite, got {raw}")
        top = max(raw.values())
        self.ratios = {name: Fraction(r / top).limit_denominator(10_000) for name, r in raw.items()}
        self.step = 0
        self._iters: dict[str, Iterator] = {}

    def scheduled(self, step: int) -> list[str]:
        """The streams that contribute a batch at ``step``."""
        return [name for name, r in self.ratios.items() if math.floor((step + 1) * r) > math.floor(step * r)]

    def __iter__(self) -> Iterator[PretrainStep]:
        while True:
            out = PretrainStep(step=self.step)
            for name in self.scheduled(self.step):
                if name not in self._iters:
                    self._iters[name] = iter(self.loaders[name])
                setattr(out, name, next(self._iters[name]))
            self.step += 1
            yield out

    def state_dict(self) -> dict:
        return {"step": self.step, "streams": {name: loader.state_dict() for name, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["streams"]) != set(self.loaders):
            raise ValueError(f"the saved data state has streams {sorted(state['streams'])}, this mixer "
                             f"{sorted(self.loaders)}")
        self.step = state["step"]
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["streams"][name])
        self._iters = {}

    def skipped(self) -> dict[str, dict[str, int]]:
        """Bad samples skipped so far, per stream and reason."""
        return {name: dict(loader.skipped) for name, loader in self.loaders.items()}
