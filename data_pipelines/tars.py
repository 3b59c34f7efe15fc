"""Reading webdataset tars: consecutive members sharing a key make a sample.

:func:`tar_samples` is what every reader here stands on (training and evaluation streams, the
answer vocabulary, ``mmoe data inspect``): plain Python ``tarfile`` in streaming mode, so a tar
is read front to back once, and a truncated or unreadable tar costs its remaining samples, never
the stream. :func:`shard_texts` is the text of shards, for training a tokenizer.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .shards import shard_urls
from .skips import SkipCounter, SkipSample, decode_json, decode_text

__all__ = ["shard_texts", "tar_samples"]


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's naming: <key>.<field>, key up to the first dot
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def tar_samples(urls: Iterable[str], skips: SkipCounter) -> Iterator[dict]:
    """Samples (dicts of raw bytes per field, plus ``__key__`` and ``__url__``) of the
    webdataset tars at ``urls``: consecutive members named ``<key>.<field>`` make one sample.

    A tar that cannot be read, or ends inside a member or (a plain, uncompressed tar) before its
    end-of-archive blocks, is counted once as ``truncated_tar`` and the stream goes on with the
    next one (the sample it was inside is dropped with it); a sample holding a field twice is
    skipped as ``duplicate_field``. Names starting with ``__`` (webdataset's metadata) are ignored.
    """
    for url in urls:
        yield from _tar_file_samples(url, skips)


def _tar_file_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    sample: dict | None = None
    duplicate = None
    try:
        with open(url, "rb") as f:
            head = f.read(6)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    found = _MEMBER.match(member.name)
                    if not member.isreg() or found is None or _META.match(member.name):
                        continue
                    key, field = found.group(1), found.group(2).lower()
                    if sample is None or sample["__key__"] != key:  # the previous sample is complete
                        if sample is not None and duplicate is None:
                            yield sample
                        sample, duplicate = {"__key__": key, "__url__": url}, None
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"{member.name} ends after {len(data)} of its {member.size} bytes")
                    if field in sample and duplicate is None:
                        duplicate = field
                        skips.add(SkipSample("duplicate_field", f"{field} of {key} twice"), where=url)
                    sample[field] = data
                end = tar.offset
            if not head.startswith(_COMPRESSED):  # a plain tar ends with a zero block where the members end
                f.seek(end)
                if f.read(512) != bytes(512):
                    raise tarfile.ReadError(f"it ends at byte {end} without the end-of-archive blocks")
    except (OSError, tarfile.TarError, EOFError, ValueError) as exn:
        skips.add(SkipSample("truncated_tar", f"{url}: {exn}"[:300]))
        return
    if sample is not None and duplicate is None:
        yield sample


def shard_texts(inputs: list[str]) -> Iterator[str]:
    """The text of shard directories / tars / brace patterns (``txt`` fields, JSON captions and
    questions; undecodable ones skipped) or of plain text files."""
    skips = SkipCounter()
    for item in inputs:
        path = Path(item)
        if not (path.is_dir() or path.suffix == ".tar" or "{" in item):
            yield path.read_text(encoding="utf-8")
            continue
        for sample in tar_samples(shard_urls(item), skips):
            try:
                if "txt" in sample:
                    yield decode_text(sample["txt"])
                if "json" in sample:
                    record = decode_json(sample["json"])
                    yield from record.get("captions", [])
                    if "question" in record:
                        yield record["question"]
                    yield from (q["question"] for q in record.get("questions", []) if "question" in q)
            except SkipSample as skip:
                skips.add(skip)
