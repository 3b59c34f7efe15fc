"""The process group of a torchrun launch, and the few collectives the trainer needs.

Device-agnostic: under torchrun with CUDA each process takes GPU ``LOCAL_RANK`` and NCCL (plus
gloo for CPU-side objects); without CUDA, gloo on the CPU. Started without torchrun, everything
is a no-op on a world of one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "current", "init_distributed"]

CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value across ranks (as given on a world of one)."""
        if not self.distributed or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64)  # CPU: the group always has gloo for these
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def mean_tree(self, tree: Any) -> Any:
        """``tree`` (dicts and lists of numbers and other leaves) with every number replaced by
        its mean across ranks, in one all-reduce; every rank must pass the same structure."""
        numbers: list[float] = []
        _numbers(tree, numbers)
        return _replace_numbers(tree, iter(self.mean(numbers)))

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` across ranks, reduced on its own device (NCCL for a GPU tensor):
        no host sync."""
        if not self.distributed:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place, on every rank (as given on a world of one)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def update_shares(self, counts: list[list[int]]) -> list[list[float]]:
        """Loss weights that make an update's loss the mean over all of its items (masked tokens,
        say), given ``counts[m][p]``, the items of part p in micro-batch m on this rank: each
        micro-batch's share of the part's items over all micro-batches and ranks (summed on the
        CPU: the group always has gloo for it), times the micro-batches and ranks that the trainer
        and DDP average over. A part with no items anywhere weighs 0; in one process with one
        micro-batch every other weight is exactly 1."""
        totals = torch.tensor([sum(parts) for parts in zip(*counts)], dtype=torch.float64)
        totals = self.sum_(totals).tolist()
        scale = self.world * len(counts)
        return [[c * scale / total if total else 0.0 for c, total in zip(parts, totals)] for parts in counts]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _numbers(tree: Any, out: list[float]) -> None:
    if isinstance(tree, dict):
        for v in tree.values():
            _numbers(v, out)
    elif isinstance(tree, list):
        for v in tree:
            _numbers(v, out)
    elif isinstance(tree, (int, float)):
        out.append(float(tree))


def _replace_numbers(tree: Any, values: Iterator[float]) -> Any:
    if isinstance(tree, dict):
        return {k: _replace_numbers(v, values) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace_numbers(v, values) for v in tree]
    if isinstance(tree, (int, float)):
        return next(values)
    return tree


def current() -> DistEnv:
    """This process's place in the process group that its launch initialised (rank 0 of 1
    without one): the one question code below the trainer (a task's reductions, evaluation)
    asks about distribution. Its ``device`` is the CPU, where those collectives run."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group (once) and pick this process's device.

    Args:
        device: ``auto`` (CUDA if available, else CPU), or a device name; under torchrun a bare
            ``cuda`` becomes ``cuda:LOCAL_RANK`` (a numbered one is refused there: it would put
            every rank on that one GPU).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    resolved = torch.device(name)
    if resolved.type == "cuda" and resolved.index is not None and world > 1:
        raise ValueError(f"train.device={name} under torchrun would put all {world} ranks on GPU {resolved.index}; "
                         f"use train.device=cuda (each rank takes GPU LOCAL_RANK) and choose GPUs with "
                         f"CUDA_VISIBLE_DEVICES")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name}, but torch sees no CUDA GPU here (torch {torch.__version__}, CUDA "
                         f"build {torch.version.cuda or 'none'}); use train.device=cpu or auto")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank if world > 1 else 0)
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"train.device={name}: there is no GPU {resolved.index} (this process sees "
                         f"{torch.cuda.device_count()}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    if world > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group("cuda:nccl,cpu:gloo" if resolved.type == "cuda" else "gloo")
    return dataclasses.replace(current(), device=resolved)
