"""Webdataset shards: the sample layout of every stream kind, and a reproducible writer.

A shard is a plain tar; a sample is the consecutive members that share a key (the name up
to the first dot, so keys never contain dots). The fields of each kind:

============  ===================================================================================
kind          fields
============  ===================================================================================
image         an image: ``jpg``, ``png``, ``webp`` or ``jpeg`` (:data:`IMAGE_FIELDS`, the first
              present is read; the original encoded bytes); optional ``json`` metadata
text          ``txt``: one document, UTF-8; optional ``json`` metadata (``{"lang": "de"}``: the
              document's language, which LM evaluation reports perplexity by)
image_text    an image + ``txt`` (the caption)
vqa           an image and all its questions: an image + ``json``: ``{"image_id",
              "questions": [{"question_id", "question", "answers": [10 strings],
              "question_type", "answer_type"}, ...]}``; ids integers or strings;
              ``"answers": []`` and no types in a label-free (test) split. Also read: one
              question per sample, ``json`` ``{"question_id", "question", "answers",
              "question_type", "image_id"}`` (the bundled shards' layout)
retrieval     an image + ``json``: ``{"image_id", "captions": [strings]}``
nlvr2         two images, ``left.<image>`` and ``right.<image>`` (``left.png``: the key ends at
              the first dot) + ``json``: ``{"identifier", "sentence", "label": true | false}``
============  ===================================================================================

``classification`` (one image and its class): an image + ``cls`` (the class index in ASCII digits,
webdataset's convention) and/or ``json`` ``{"label": class name}``; a name, where there is one,
decides: it is looked up in the task's class list (``mmoe data write-shards classification`` writes
both, ``cls`` indexing the sorted class folders of what it wrote).

img2dataset's output is image_text shards as it is, in any ``encode_format`` (jpg, png, webp):
``00000.tar`` ... holding ``000000000.jpg``, ``000000000.txt`` (the caption) and
``000000000.json`` (its metadata, not read), beside ``00000_stats.json`` (what the download
attempted and got: :func:`img2dataset_stats`) and ``00000.parquet`` (never opened).

:class:`ShardSink` writes shards named ``<prefix>-000000.tar`` ... into a directory, each
closed at ``maxcount`` samples or ``maxsize`` bytes, with fixed member metadata (mtime 0,
owner, mode), so the same samples in the same order give byte-identical shards. Beside them it
writes ``sizes.json`` (``{shard name: samples}``, the layout open_clip reads) and
``manifest.json`` (kind, totals, fields). Output goes to a temporary directory renamed into
place at the end: an interrupted write never leaves a directory that looks complete, and an
existing directory is replaced only when asked.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from .atomic import put_in_place, remove, staging_path

__all__ = ["IMAGE_FIELDS", "KINDS", "ShardSink", "img2dataset_stats", "safe_key", "shard_urls"]

KINDS = ("image", "text", "image_text", "vqa", "retrieval", "nlvr2", "classification")
# img2dataset's three encode formats, and jpeg, which other webdataset writers use (open_clip reads the same four)
IMAGE_FIELDS = ("jpg", "png", "webp", "jpeg")
REQUIRED_FIELDS = {
    "image": (IMAGE_FIELDS,),
    "text": (("txt",),),
    "image_text": (IMAGE_FIELDS, ("txt",)),
    "vqa": (IMAGE_FIELDS, ("json",)),
    "retrieval": (IMAGE_FIELDS, ("json",)),
    "nlvr2": (tuple(f"left.{f}" for f in IMAGE_FIELDS), tuple(f"right.{f}" for f in IMAGE_FIELDS), ("json",)),
    "classification": (IMAGE_FIELDS, ("cls", "json")),
}
_MTIME = 0


def safe_key(name: str) -> str:
    """A webdataset key from any name: characters other than letters, digits, ``-`` and ``_``
    (dots and slashes included) become ``_``."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if not key:
        raise ValueError(f"no usable characters in sample name {name!r}")
    return key


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    raise TypeError(f"a field must be bytes, str or a JSON mapping, not {type(value).__name__}")


class ShardSink:
    """Writes samples of one kind into ``out_dir`` (see the module docstring).

    ``with ShardSink(out_dir, "image_text") as sink: sink.write(key, {"jpg": data, "txt": caption})``
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, *, prefix: str = "shard", maxcount: int = 10_000,
                 maxsize: int = 1 << 30, overwrite: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}; known: {', '.join(KINDS)}")
        if maxcount < 1 or maxsize < 1:
            raise ValueError("maxcount and maxsize must be positive")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        self.kind, self.prefix = kind, prefix
        self.maxcount, self.maxsize = maxcount, maxsize
        self._tmp = staging_path(self.out_dir)
        remove(self._tmp)
        self._tmp.mkdir(parents=True)
        self._writer: wds.TarWriter | None = None
        self._shard_sizes: dict[str, int] = {}
        self._bytes = 0
        self._keys: set[str] = set()
        self.fields: Counter[str] = Counter()

    def write(self, key: str, fields: Mapping[str, Any]) -> None:
        """Add one sample; ``key`` must be a :func:`safe_key` and unique in this sink."""
        if key != safe_key(key):
            raise ValueError(f"sample key {key!r} contains characters a webdataset key cannot hold; "
                             f"use safe_key() -> {safe_key(key)!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        for alternatives in REQUIRED_FIELDS[self.kind]:
            if not any(f in fields for f in alternatives):
                raise ValueError(f"a {self.kind} sample needs a {' or '.join(alternatives)} field; {key!r} has "
                                 f"{sorted(fields)}")
        if any(not f or f.startswith(".") or "/" in f for f in fields):  # "left.png" is fine: the key ends first
            raise ValueError(f"field names must be non-empty, without a leading dot or a slash: {sorted(fields)}")
        if self._writer is None or self._count >= self.maxcount or self._bytes >= self.maxsize:
            self._next_shard()
        encoded = {"__key__": key, **{f: _encode(v) for f, v in fields.items()}}
        self._bytes += self._writer.write(encoded)
        self._count += 1
        self._shard_sizes[self._name] += 1
        self._keys.add(key)
        self.fields.update(fields.keys())

    def _next_shard(self) -> None:
        self._close_shard()
        self._name = f"{self.prefix}-{len(self._shard_sizes):06d}.tar"
        self._writer = wds.TarWriter(str(self._tmp / self._name), encoder=False, mtime=_MTIME, user="mmoe",
                                     group="mmoe", mode=0o444)
        self._shard_sizes[self._name] = 0
        self._count = self._bytes = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> Path:
        """Finish the last shard, write ``sizes.json`` and ``manifest.json``, move into place."""
        self._close_shard()
        if not self._shard_sizes:
            remove(self._tmp)
            raise ValueError(f"no samples were written for {self.out_dir}")
        (self._tmp / "sizes.json").write_text(json.dumps(self._shard_sizes, indent=1) + "\n")
        manifest = {"kind": self.kind, "samples": sum(self._shard_sizes.values()),
                    "shards": len(self._shard_sizes), "fields": dict(sorted(self.fields.items()))}
        (self._tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return put_in_place(self._tmp, self.out_dir)

    def abort(self) -> None:
        self._close_shard()
        remove(self._tmp)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_urls(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths from a directory (its ``*.tar``, sorted), a brace pattern
    (``dir/shard-{000000..000009}.tar``), a single tar, or a list of any of these."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in shard_urls(item)]
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in {spec}")
        return urls
    urls = list(wds.shardlists.expand_urls(spec))
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return urls


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """``manifest.json`` of a directory written by :class:`ShardSink` (kind, samples, fields)."""
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {shard_dir} a directory written by `mmoe data write-shards`?")
    return json.loads(path.read_text())


_STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def img2dataset_stats(urls: list[str]) -> dict | None:
    """What img2dataset's ``<shard>_stats.json`` beside the tars at ``urls`` say, summed: the
    samples it attempted (``count``), wrote (``successes``) and lost (``failed_to_download``,
    ``failed_to_resize``; ``status`` per message); ``shards`` counts the tars with stats and
    ``unreadable`` lists stats files that do not parse. None when no tar has one."""
    total: dict[str, Any] = {"shards": 0, **dict.fromkeys(_STATS_COUNTS, 0), "status": Counter(), "unreadable": []}
    for url in urls:
        path = Path(url).with_name(Path(url).stem + "_stats.json")
        if not path.is_file():
            continue
        try:
            stats = json.loads(path.read_text())
            counts = {k: int(stats.get(k, 0)) for k in _STATS_COUNTS}
            status = Counter({str(k): int(v) for k, v in stats.get("status_dict", {}).items()})
        except (ValueError, TypeError, AttributeError):
            total["unreadable"].append(str(path))
            continue
        total["shards"] += 1
        for key, n in counts.items():
            total[key] += n
        total["status"].update(status)
    if not total["shards"] and not total["unreadable"]:
        return None
    total["status"] = dict(total["status"].most_common())
    return total
