"""Reading shards: a deterministic, splittable, resumable webdataset stream.

:class:`ShardStream` is an ``IterableDataset`` over webdataset shards (read by
:func:`~data_pipelines.tars.tar_samples`) with a shuffle buffer, with the splitting
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

A stream that cannot use its samples stops instead of reading on forever: ``max_skipped_in_a_row``
samples skipped one after another in one worker, shards that give no sample at all, or an
evaluation pass without a single batch raise :class:`~data_pipelines.skips.UnusableShards` in
the main process, naming the shards, the fields their samples hold and why they were skipped. A
worker sends the message as an item and stops, so that it arrives as it was written, not inside
the worker's traceback.

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
import signal
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import shard_urls
from .skips import SkipCounter, SkipSample, UnusableShards
from .tars import tar_samples

__all__ = ["Processor", "ShardStream", "StreamLoader", "derive_seed", "dist_rank_world"]


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
        log_interval: seconds between log lines of one skip reason (its first is always logged).
        max_skipped_in_a_row: unusable samples one after another in one worker that stop the stream
            with :class:`~data_pipelines.skips.UnusableShards`. A usable stream's bad samples come
            a few at a time (even at 90% bad, 1000 in a row has odds of 1e-46), and 1000 skips take
            a second or two to read; a shard that holds no usable sample is found as soon as it is read.
    """

    def __init__(self, shards: Sequence, processor: Processor, *, batch_size: int, resampled: bool = True,
                 weights: Sequence[float] | None = None, epoch_batches: int = 1000, shuffle_buffer: int = 1000,
                 seed: int = 0, log_interval: float = 60.0, max_skipped_in_a_row: int = 1000):
        super().__init__()
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        self.shard_sets = [shard_urls(s) for s in shards]
        if weights is not None and (len(weights) != len(self.shard_sets) or any(w < 0 for w in weights)
                                    or not sum(weights) > 0):
            raise ValueError(f"weights {list(weights)} must be {len(self.shard_sets)} non-negative numbers, "
                             f"one per shard set, not all zero")
        if batch_size < 1 or epoch_batches < 1 or max_skipped_in_a_row < 1:
            raise ValueError(f"batch_size ({batch_size}), epoch_batches ({epoch_batches}) and max_skipped_in_a_row "
                             f"({max_skipped_in_a_row}) must be positive")
        self.urls = [u for s in self.shard_sets for u in s]
        # a shard's weight: its set's weight shared among the set's shards
        self.url_weights = ([1.0] * len(self.urls) if weights is None else
                            [w / len(s) for w, s in zip(weights, self.shard_sets) for _ in s])
        self.processor, self.batch_size, self.resampled = processor, batch_size, resampled
        self.epoch_batches, self.shuffle_buffer, self.seed = epoch_batches, shuffle_buffer, seed
        self.log_interval, self.max_skipped_in_a_row = log_interval, max_skipped_in_a_row
        self.num_workers = 1
        self.start: dict[int, _Position] = {}  # logical worker -> where to start
        self.worker_offset = 0  # rotates logical worker ids so a resumed loader keeps the batch order

    def _raw_samples(self, rank: int, world: int, worker: int, workers: int, epoch: int,
                     skips: SkipCounter, read: list[int]) -> Iterator[dict]:
        """The raw samples of this worker's share; ``read[0]`` counts those read from the tars
        (in evaluation mode, before the split: all slots' samples)."""
        fruitless = [0]  # shards opened since the last sample came out of one

        if self.resampled:
            rng = random.Random(derive_seed(self.seed, epoch, rank, worker, 0))
            patience = max(100, 10 * len(self.urls))

            def urls():
                while True:
                    if fruitless[0] > patience:
                        raise UnusableShards(f"the last {fruitless[0]} shards drawn from {_shard_list(self.urls)} "
                                             f"gave no sample (skipped so far: {_counts(skips.counts)}); are they "
                                             f"webdataset tars?")
                    fruitless[0] += 1
                    yield rng.choices(self.urls, weights=self.url_weights)[0]
        else:
            def urls():
                yield from self.urls

        def counted(samples):
            for sample in samples:
                fruitless[0] = 0
                read[0] += 1
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
            samples = counted(tar_samples(urls(), skips if slot == 0 else SkipCounter(muted=True)))
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
        skips, run = SkipCounter(self.log_interval), _SkipRun()
        try:
            while True:
                yield from self._epoch(rank, world, worker, workers, pos, skips, run)
                if not self.resampled:
                    return
                pos = _Position(epoch=pos.epoch + 1)
        except UnusableShards as stop:  # StreamLoader raises it (see the module docstring)
            yield _Stopped(str(stop))

    def _epoch_done(self, pos: _Position) -> bool:
        return self.resampled and pos.batches >= self.epoch_batches

    def _epoch(self, rank, world, worker, workers, pos: _Position, skips: SkipCounter, run: _SkipRun) -> Iterator:
        if self._epoch_done(pos):  # resumed at the end of an epoch
            return
        read = [0]
        raw = self._raw_samples(rank, world, worker, workers, pos.epoch, skips, read)
        skips.muted = True  # resume: pass over what was drawn before, without decoding or counting again
        try:
            for _ in range(pos.drawn):
                if next(raw, None) is None:
                    return
        finally:
            skips.muted = False
        yield from _carrying_skips(self._batches(raw, rank, worker, pos, skips, run), skips)
        if not self.resampled and not pos.batches:  # whether the whole pass made nothing, StreamLoader says
            yield _PassEnd(drawn=pos.drawn, read=read[0], run=run, skipped=dict(skips.counts), new=skips.take_new())

    def _batches(self, raw: Iterator[dict], rank: int, worker: int, pos: _Position, skips: SkipCounter,
                 run: _SkipRun) -> Iterator:
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
                run.add(sample, skip)
                if run.samples >= self.max_skipped_in_a_row:
                    raise UnusableShards(f"no usable sample in the last {run.samples} samples read {run.describe()}; "
                                         f"skipped so far in this worker: {_counts(skips.counts)}. {_LIMIT}") from None
                continue
            if run.samples:
                run.clear()
            for items, next_index, offset in batcher.add(index, item):
                if self._epoch_done(pos):  # a long document can fill more batches than the epoch has left
                    break
                yield self._batch(items, rank, worker, pos, next_index, offset)
        if not self._epoch_done(pos) and (rest := batcher.rest()):  # evaluation's last, short batch
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


_LIMIT = ("A stream stops after max_skipped_in_a_row unusable samples in a row; `mmoe data inspect SHARDS --kind "
          "KIND` counts what every sample lacks")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _shard_list(urls: Iterable[str], most: int = 4) -> str:
    """Shards for a message, folder by folder (``/data/{00000.tar, 00001.tar}``), at most ``most``."""
    urls = sorted(set(urls))
    folders: dict[Path, list[str]] = {}
    for url in urls[:most]:
        folders.setdefault(Path(url).parent, []).append(Path(url).name)
    text = ", ".join(str(folder / names[0]) if len(names) == 1 else f"{folder}/{{{', '.join(names)}}}"
                     for folder, names in folders.items())
    return text + (f" and {len(urls) - most} more" if len(urls) > most else "")


class _SkipRun:
    """The samples skipped since the last usable one: how many, from which shards, holding which
    fields, for which reasons (the first detail of each): what :class:`UnusableShards` reports."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.samples, self.shards, self.fields, self.reasons, self.details = 0, {}, Counter(), Counter(), {}

    def add(self, sample: dict, skip: SkipSample) -> None:
        self.samples += 1
        self.shards.setdefault(sample.get("__url__", "?"), None)
        self.fields.update(k for k in sample if not k.startswith("__"))
        self.reasons[skip.reason] += 1
        self.details.setdefault(skip.reason, skip.detail)

    def merge(self, other: _SkipRun) -> None:
        self.samples += other.samples
        self.shards.update(other.shards)
        self.fields.update(other.fields)
        self.reasons.update(other.reasons)
        for reason, detail in other.details.items():
            self.details.setdefault(reason, detail)

    def describe(self) -> str:
        why = ", ".join(f"{reason} {n}" + (f" (e.g. {self.details[reason]})" if self.details[reason] else "")
                        for reason, n in self.reasons.most_common())
        fields = ", ".join(f".{f} {n}" for f, n in sorted(self.fields.items())) or "none"
        return f"from {_shard_list(self.shards)}, skipped for {why}; the fields they hold: {fields}"


@dataclasses.dataclass
class _Stopped:
    """A worker's :class:`UnusableShards` on its way to the main process (see the module docstring)."""
    message: str


@dataclasses.dataclass
class _PassEnd:
    """The end of a worker's evaluation pass that made no batch: its samples drawn, the samples
    read from the tars (all slots'), what it skipped, and the skips no batch carried."""
    drawn: int
    read: int
    run: _SkipRun
    skipped: dict[str, int]
    new: dict[str, int]


def _empty_pass(urls: list[str], ends: list[_PassEnd]) -> str | None:
    """Why an evaluation pass in which no worker of this rank made a batch is an error, or None
    when it is not (the rank's share of a small set is empty, or documents too short for one
    packed row)."""
    skipped = _counts(sum((Counter(end.skipped) for end in ends), Counter()))
    if not any(end.read for end in ends):
        return f"the shards {_shard_list(urls)} hold no sample (skipped: {skipped}); are they webdataset tars?"
    if not any(end.drawn for end in ends) or any(end.run.samples < end.drawn for end in ends):
        return None
    run = _SkipRun()
    for end in ends:
        run.merge(end.run)
    return (f"no usable sample in an evaluation pass: all {run.samples} samples read {run.describe()}; skipped: "
            f"{skipped}")


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
    workers when it is done; a worker whose parent died exits by itself when it next hands over
    a batch (DataLoader checks only then, which ``max_skipped_in_a_row`` keeps from waiting forever)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StreamLoader:
    """A ``DataLoader`` over a :class:`ShardStream` that can save and restore its position.

    Iterating yields batches forever in resampled mode (epoch after epoch) and one pass in
    evaluation mode, or raises :class:`~data_pipelines.skips.UnusableShards` when the shards
    give no usable sample (see the module docstring). ``state_dict()`` after n batches, loaded
    into a new loader over the same shards and settings, makes it yield exactly batch n+1,
    n+2, ... of the original run.
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
        delivered, ends = 0, []
        for batch in DataLoader(self.stream, **self._loader_kwargs):
            if isinstance(batch, _Stopped):
                raise UnusableShards(batch.message)
            if isinstance(batch, _PassEnd):
                ends.append(batch)
                self._count(batch.new)
                continue
            worker, *where = batch.position
            self._positions[worker] = _Position(*where)
            self._delivered += 1
            delivered += 1
            self._count(batch.skipped)
            yield batch
        if ends and not delivered and (why := _empty_pass(self.stream.urls, ends)):
            raise UnusableShards(why)

    def _count(self, skipped: dict[str, int]) -> None:
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

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
