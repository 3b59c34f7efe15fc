"""Reading shards: a deterministic, splittable, resumable webdataset stream.

:class:`ShardStream` is an ``IterableDataset`` over webdataset shards (:func:`tar_samples`:
consecutive tar members sharing a key make a sample) with a shuffle buffer, with the splitting
done here explicitly instead of by webdataset's defaults (whose ``single_node_only`` raises as
soon as ``WORLD_SIZE`` > 1):

- ``resampled=True`` (training): each (rank, worker) draws shards with replacement, weighted
  per shard set, from its own seed, and yields exactly ``epoch_batches`` batches per epoch, so
  every rank takes the same number of steps whatever the shard sizes are.
- ``resampled=False`` (evaluation): every worker walks all shards in order and keeps the samples
  whose index modulo (world size x workers) is its own, before decoding: each sample is seen
  exactly once across ranks and workers, whatever the number of shards.

Determinism and resume. Every random choice derives from (seed, epoch, rank, worker) for the
shard order and shuffle buffer, and from (..., sample index) for a sample's augmentation and
masking, so a sample's result does not depend on what was decoded before it. Each batch carries
its worker and how many raw samples that worker has drawn; :class:`StreamLoader` records this,
and a resumed loader has each worker pass over that many raw samples without decoding them and
continue with exactly the batches the uninterrupted run would have produced, in the same order.

A *processor* turns samples into batches (see ``data_pipelines.processors``): ``processor(sample,
seed)`` returns an item or raises :class:`~data_pipelines.skips.SkipSample`, and
``processor.collate(items, seed)`` returns a batch dataclass with a ``skipped`` field. Items
are grouped ``batch_size`` at a time unless the processor brings its own ``batcher(batch_size,
skip)`` (the LM processor packs documents into fixed-length rows).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import shard_urls
from .skips import SkipCounter, SkipSample, decode_json, decode_text

__all__ = ["Processor", "ShardStream", "StreamLoader", "derive_seed", "dist_rank_world", "shard_texts",
           "tar_samples"]


class Processor(Protocol):
    def __call__(self, sample: dict[str, Any], seed: int) -> Any: ...

    def collate(self, items: list[Any], seed: int) -> Any: ...


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: different tuples, unrelated seeds)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from an initialised process group, else torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclasses.dataclass
class _Position:
    """Where a worker's stream stands in an epoch: batches made, raw samples drawn, and how much
    of the next sample the last batch already took (only a token packer takes part of one)."""
    epoch: int = 0
    batches: int = 0
    drawn: int = 0
    offset: int = 0


class _ItemBatcher:
    """``batch_size`` items per batch (the packer interface of :class:`~data_pipelines.text.TokenPacker`)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.items = batch_size, []

    def add(self, index: int, item) -> list[tuple[list, int, int]]:
        self.items.append(item)
        if len(self.items) < self.batch_size:
            return []
        full, self.items = self.items, []
        return [(full, index + 1, 0)]

    def rest(self) -> list:
        return self.items


class ShardStream(IterableDataset):
    """Batches from webdataset shards (see the module docstring).

    Args:
        shards: shard sets: each a directory, a brace pattern or a list of tars.
        processor: turns samples into items and items into a batch.
        batch_size: items per batch.
        resampled: training mode (infinite, weighted, equal batches per worker) or evaluation
            mode (one pass, each sample once across ranks and workers; the last batch may be short).
        weights: relative sampling weight of each shard set (resampled mode); default equal per shard.
        epoch_batches: batches each worker yields per epoch in resampled mode.
        shuffle_buffer: samples in the shuffle buffer (resampled mode; 0 = no shuffling).
        seed: the root of all randomness.
        log_every: log the first skip of each reason and then every n-th.
    """

    def __init__(self, shards: Sequence, processor: Processor, *, batch_size: int, resampled: bool = True,
                 weights: Sequence[float] | None = None, epoch_batches: int = 1000, shuffle_buffer: int = 1000,
                 seed: int = 0, log_every: int = 1000):
        super().__init__()
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        self.shard_sets = [shard_urls(s) for s in shards]
        if weights is not None and (len(weights) != len(self.shard_sets) or any(w < 0 for w in weights)
                                    or not sum(weights) > 0):
            raise ValueError(f"weights {list(weights)} must be {len(self.shard_sets)} non-negative numbers, "
                             f"one per shard set, not all zero")
        if batch_size < 1 or epoch_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and epoch_batches ({epoch_batches}) must be positive")
        self.urls = [u for s in self.shard_sets for u in s]
        # a shard's weight: its set's weight shared among the set's shards
        self.url_weights = ([1.0] * len(self.urls) if weights is None else
                            [w / len(s) for w, s in zip(weights, self.shard_sets) for _ in s])
        self.processor, self.batch_size, self.resampled = processor, batch_size, resampled
        self.epoch_batches, self.shuffle_buffer, self.seed, self.log_every = (
            epoch_batches, shuffle_buffer, seed, log_every)
        self.num_workers = 1
        self.start: dict[int, _Position] = {}  # logical worker -> where to start
        self.worker_offset = 0  # rotates logical worker ids so a resumed loader keeps the batch order

    def _raw_samples(self, rank: int, world: int, worker: int, workers: int, epoch: int,
                     skips: SkipCounter) -> Iterator[dict]:
        fruitless = [0]  # shards opened since the last sample came out of one

        if self.resampled:
            rng = random.Random(derive_seed(self.seed, epoch, rank, worker, 0))
            patience = max(100, 10 * len(self.urls))

            def urls():
                while True:
                    if fruitless[0] > patience:
                        raise RuntimeError(f"{fruitless[0]} shards in a row gave no sample (skipped so far: "
                                           f"{dict(skips.counts)}); are the shards {self.urls[:3]} readable tars?")
                    fruitless[0] += 1
                    yield rng.choices(self.urls, weights=self.url_weights)[0]
        else:
            def urls():
                yield from self.urls

        def counted(samples):
            for sample in samples:
                fruitless[0] = 0
                yield sample

        if self.resampled:
            samples = counted(tar_samples(urls(), skips))
            if self.shuffle_buffer > 1:
                shuffle_rng = random.Random(derive_seed(self.seed, epoch, rank, worker, 1))
                yield from _shuffled(samples, self.shuffle_buffer, shuffle_rng)
            else:
                yield from samples
        else:  # every slot reads every tar; the first alone counts what is wrong with the tars
            slot, slots = rank * workers + worker, world * workers
            samples = counted(tar_samples(urls(), skips if slot == 0 else SkipCounter(log_every=10**9)))
            yield from (s for i, s in enumerate(samples) if i % slots == slot)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"ShardStream was set up for {self.num_workers} workers but runs in {workers}; "
                               f"iterate it through StreamLoader")
        worker = (physical + self.worker_offset) % workers
        rank, world = dist_rank_world()
        pos = dataclasses.replace(self.start.get(worker, _Position()))
        skips = SkipCounter(self.log_every)
        while True:
            yield from self._epoch(rank, world, worker, workers, pos, skips)
            if not self.resampled:
                return
            pos = _Position(epoch=pos.epoch + 1)

    def _epoch_done(self, pos: _Position) -> bool:
        return self.resampled and pos.batches >= self.epoch_batches

    def _epoch(self, rank, world, worker, workers, pos: _Position, skips: SkipCounter) -> Iterator:
        if self._epoch_done(pos):  # resumed at the end of an epoch
            return
        raw = self._raw_samples(rank, world, worker, workers, pos.epoch, skips)
        skips.muted = True  # resume: pass over what was drawn before, without decoding or counting again
        try:
            for _ in range(pos.drawn):
                if next(raw, None) is None:
                    return
        finally:
            skips.muted = False
        yield from _carrying_skips(self._batches(raw, rank, worker, pos, skips), skips)

    def _batches(self, raw: Iterator[dict], rank: int, worker: int, pos: _Position,
                 skips: SkipCounter) -> Iterator:
        make_batcher = getattr(self.processor, "batcher", None)
        batcher = make_batcher(self.batch_size, pos.offset) if make_batcher else _ItemBatcher(self.batch_size)
        while not self._epoch_done(pos):
            sample = next(raw, None)
            if sample is None:  # end of an evaluation pass
                break
            index = pos.drawn
            pos.drawn += 1
            try:
                item = self.processor(sample, derive_seed(self.seed, pos.epoch, rank, worker, 2, index))
            except SkipSample as skip:
                skips.add(skip, where=f"{sample.get('__url__')}:{sample.get('__key__')}")
                continue
            for items, next_index, offset in batcher.add(index, item):
                if self._epoch_done(pos):  # a long document can fill more batches than the epoch has left
                    break
                yield self._batch(items, rank, worker, pos, next_index, offset)
        if rest := batcher.rest():
            yield self._batch(rest, rank, worker, pos, pos.drawn, 0)

    def _batch(self, items: list, rank: int, worker: int, pos: _Position, next_index: int, offset: int):
        """A batch whose successor starts at raw sample ``next_index``, ``offset`` tokens in."""
        batch = self.processor.collate(items, derive_seed(self.seed, pos.epoch, rank, worker, 3, pos.batches))
        pos.batches += 1
        batch.position = (worker, pos.epoch, pos.batches, next_index, offset)
        return batch


def _carrying_skips(batches: Iterator, skips: SkipCounter) -> Iterator:
    """Each batch with the skips counted since the previous one; held back by one batch, so the
    last batch also carries the skips that came after it (e.g. a truncated final shard)."""
    held = None
    for batch in batches:
        if held is not None:
            held.skipped = skips.take_new()
            yield held
        held = batch
    if held is not None:
        held.skipped = skips.take_new()
        yield held


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
            except SkipSample as skip:
                skips.add(skip)


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: fill to ``bufsize``, then emit a random element per arriving sample."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        k = rng.randrange(bufsize)
        buf[k], sample = sample, buf[k]
        yield sample
    rng.shuffle(buf)
    yield from buf


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """A loader worker ignores SIGTERM: a scheduler's preemption (Slurm's ``scancel``, ``kill
    -TERM -PGID``) signals the whole process group, and a worker that died of it would take the
    step down with it before the main process could checkpoint. The main process stops the
    workers when it is done; a worker whose parent died exits by itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StreamLoader:
    """A ``DataLoader`` over a :class:`ShardStream` that can save and restore its position.

    Iterating yields batches forever in resampled mode (epoch after epoch) and one pass in
    evaluation mode. ``state_dict()`` after n batches, loaded into a new loader over the same
    shards and settings, makes it yield exactly batch n+1, n+2, ... of the original run.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        self.stream = stream
        stream.num_workers = max(num_workers, 1)
        self._loader_kwargs = {"batch_size": None, "num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers:
            self._loader_kwargs.update(persistent_workers=False, prefetch_factor=prefetch_factor or 2,
                                       worker_init_fn=leave_sigterm_to_the_main_process)
        self._positions: dict[int, _Position] = {}
        self._delivered = 0
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> Iterator:
        self.stream.start = dict(self._positions)
        self.stream.worker_offset = self._delivered % self.stream.num_workers
        for batch in DataLoader(self.stream, **self._loader_kwargs):
            worker, *where = batch.position
            self._positions[worker] = _Position(*where)
            self._delivered += 1
            for reason, n in batch.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            yield batch

    def state_dict(self) -> dict:
        return {"workers": self.stream.num_workers, "delivered": self._delivered, "skipped": dict(self.skipped),
                "positions": {w: dataclasses.astuple(p) for w, p in self._positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["workers"] != self.stream.num_workers:
            raise ValueError(f"the saved data position was recorded with {state['workers']} loader worker(s), this "
                             f"loader has {self.stream.num_workers}; resume with the same number of workers")
        self._delivered = state["delivered"]
        self.skipped = dict(state["skipped"])
        self._positions = {int(w): _Position(*p) for w, p in state["positions"].items()}
