"""Bad input is skipped, counted per reason and logged at a rate limit — never fatal, never
silently trained on.

Every decoder raises :class:`SkipSample` with one of :data:`REASONS`; the reader catches it,
counts it in a :class:`SkipCounter` and moves on. Counts travel with the batches (each batch
carries the skips its worker saw since its previous batch), so the training process can
report them in its metrics without shared state between DataLoader workers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

__all__ = ["REASONS", "SkipCounter", "SkipSample", "decode_json", "decode_text"]

REASONS = {
    "truncated_tar": "a shard ended inside a member (or is not a tar at all); later samples of it are lost",
    "corrupt_image": "image bytes that Pillow cannot decode",
    "image_too_large": "an image whose header declares more pixels than the configured limit "
                       "(decompression-bomb guard); it is never decoded",
    "missing_field": "a sample without a field its stream needs (e.g. an image-text sample without txt)",
    "bad_utf8": "text that is not valid UTF-8",
    "bad_json": "a json field that does not parse or lacks the keys its stream needs",
    "empty_text": "text with no tokens after tokenisation",
}

log = logging.getLogger("data_pipelines")


class SkipSample(Exception):
    """A sample (or the rest of a shard) cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_text(data: bytes | bytearray) -> str:
    """Strict UTF-8, or :class:`SkipSample` ``bad_utf8``."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("bad_utf8", f"{e.reason} at byte {e.start}") from None


def decode_json(data: bytes, *required: str) -> dict:
    """A JSON object holding ``required`` keys, or :class:`SkipSample` ``bad_utf8`` / ``bad_json``."""
    try:
        record = json.loads(decode_text(data))
    except json.JSONDecodeError as e:
        raise SkipSample("bad_json", str(e)) from None
    missing = [k for k in required if not isinstance(record, dict) or k not in record]
    if missing:
        raise SkipSample("bad_json", f"missing {missing}")
    return record


class SkipCounter:
    """Counts skips per reason; logs the first of each reason and then every ``log_every``-th."""

    def __init__(self, log_every: int = 1000):
        self.counts: Counter[str] = Counter()
        self.log_every = log_every
        self._unreported: Counter[str] = Counter()

    def add(self, skip: SkipSample, where: str = "") -> None:
        self.counts[skip.reason] += 1
        self._unreported[skip.reason] += 1
        n = self.counts[skip.reason]
        if n == 1 or n % self.log_every == 0:
            log.warning("skipped sample #%d for %s%s: %s", n, skip.reason, f" in {where}" if where else "",
                        skip.detail or REASONS[skip.reason])

    def take_new(self) -> dict[str, int]:
        """The skips counted since the previous call (what the next batch carries)."""
        new, self._unreported = dict(self._unreported), Counter()
        return new
