"""Bad input is skipped, counted per reason and logged at a rate limit — never silently
trained on, and fatal only when nothing is left: a stream without a usable sample.

Every decoder raises :class:`SkipSample` with one of :data:`REASONS`; the reader catches it,
counts it in a :class:`SkipCounter` and moves on. Counts travel with the batches (each batch
carries the skips its worker saw since its previous batch), so the training process can
report them in its metrics without shared state between DataLoader workers. A stream that
skips every sample for long (``data_pipelines.streams``) raises :class:`UnusableShards`
instead of reading on forever.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["ID", "REASONS", "TEXT", "TEXTS", "SkipCounter", "SkipSample", "UnusableShards", "decode_json",
           "decode_record", "decode_text"]

REASONS = {
    "truncated_tar": "a shard ended inside a member (or is not a tar at all); later samples of it are lost",
    "duplicate_field": "a sample whose tar holds one of its fields twice (which one is meant is unknown)",
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


class UnusableShards(ValueError):
    """A stream's shards give no usable sample: every one read for long was skipped, or there was
    none (the message names the shards, what their samples hold and why they were skipped)."""


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
    if not isinstance(record, dict):
        raise SkipSample("bad_json", f"not a JSON object but {_describe(record)}")
    missing = [k for k in required if k not in record]
    if missing:
        raise SkipSample("bad_json", f"missing {missing}")
    return record


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def TEXT(value) -> str:
    """A JSON string."""
    if not isinstance(value, str):
        raise TypeError(f"a string, got {_describe(value)}")
    return value


def ID(value) -> str:
    """An identifier: a JSON string or integer, as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"a string or an integer, got {_describe(value)}")
    return str(value)


def TEXTS(value) -> list[str]:
    """A JSON list of strings (a bare string is refused, not split into characters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"a list of strings, got {_describe(value)}")
    return value


def decode_record(data: bytes, schema: dict, optional: dict | None = None) -> dict:
    """A JSON object whose ``schema`` keys are present and of their types (``{key: TEXT | ID |
    TEXTS}``, each a function that returns the value or raises ``TypeError``), as are those of
    ``optional`` that are present and not null; only these keys, converted. :class:`SkipSample`
    ``bad_json`` names the first key that is missing or of the wrong type."""
    record = decode_json(data, *schema)
    out = {}
    for key, kind in (*schema.items(), *(optional or {}).items()):
        if key not in record or (key not in schema and record[key] is None):
            continue
        try:
            out[key] = kind(record[key])
        except TypeError as e:
            raise SkipSample("bad_json", f"{key!r} must be {e}") from None
    return out


class SkipCounter:
    """Counts skips per reason and logs them at a rate limit in time: the first of each reason,
    then at most one line per reason per ``log_interval`` seconds (``math.inf``: the first
    only), with the count so far, so that a stream of nothing but bad samples cannot flood a log.
    ``clock``: seconds from any origin (a test passes a fake one); ``muted``: count and log
    nothing (a reader whose skips another reader counts)."""

    def __init__(self, log_interval: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 muted: bool = False):
        if not log_interval >= 0:
            raise ValueError(f"log_interval is in seconds, >= 0 (math.inf: log the first of each reason only), "
                             f"got {log_interval}")
        self.counts: Counter[str] = Counter()
        self.log_interval, self.clock = log_interval, clock
        self.muted = muted  # e.g. while a resumed stream passes over what it had read: counted then
        self._unreported: Counter[str] = Counter()
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (time, count) of its last line

    def add(self, skip: SkipSample, where: str = "") -> None:
        if self.muted:
            return
        reason = skip.reason
        self.counts[reason] += 1
        self._unreported[reason] += 1
        n = self.counts[reason]
        now = self.clock()
        last = self._logged.get(reason)
        if last is not None and now - last[0] < self.log_interval:
            return
        since = f" ({n - last[1]} since the line {now - last[0]:.0f} s before)" if last is not None else ""
        self._logged[reason] = (now, n)
        log.warning("skipped sample #%d for %s%s%s: %s", n, reason, since, f" in {where}" if where else "",
                    skip.detail or REASONS[reason])

    def take_new(self) -> dict[str, int]:
        """The skips counted since the previous call (what the next batch carries)."""
        new, self._unreported = dict(self._unreported), Counter()
        return new
