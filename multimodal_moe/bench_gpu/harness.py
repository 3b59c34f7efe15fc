"""What every section of ``mmoe bench gpu`` runs with: its step counts (:class:`Plan`) and sizes
(:class:`Sizes`), device timing, and :func:`each`, which runs a section's jobs one by one, each
exception caught into the job's JSON entry and no job started once the time budget is spent."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CHILD_GRACE_S", "FULL", "QUICK", "Plan", "Sizes", "device_info", "each", "error_entry", "log",
           "median_seconds"]

CHILD_GRACE_S = 120  # how long a section may run past the budget before it is killed


@dataclasses.dataclass(frozen=True)
class Plan:
    """Step counts of one run; ``--quick`` takes :data:`QUICK`."""

    train_steps: int = 20  # bf16 steps per debug preset
    loss_window: int = 5  # how many first and last losses are averaged and compared
    fp32_steps: int = 3
    warmup_steps: int = 2  # lr warmup of those runs (the presets' own is longer than the run)
    distributed_steps: int = 5
    bench_warmup: int = 3  # untimed steps before the timed ones
    bench_steps: int = 10  # timed steps; their median is reported


FULL, QUICK = Plan(), Plan(train_steps=10, loss_window=3, fp32_steps=2, warmup_steps=1, distributed_steps=3,
                           bench_warmup=1, bench_steps=3)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch and matrix sizes of the timed sections (defaults by device and ``--quick``)."""

    encoder_batch: int  # per stream: images, texts and image-text pairs
    text_len: int
    lm_batch: int
    lm_seq: int
    grouped_rows: int  # (token, expert) assignments
    grouped_dim: int
    grouped_hidden: int
    grouped_experts: int = 8

    @classmethod
    def resolve(cls, args: argparse.Namespace, device: torch.device) -> Sizes:
        if device.type == "cpu":
            defaults = cls(4, 16, 4, 64, 1024, 64, 128)
        elif args.quick:
            defaults = cls(8, 32, 32, 256, 4096, 768, 1536)
        else:  # 32 pairs per stream; top-2 of 8 experts at BEiT-3 base width (F = 3072 / K)
            defaults = cls(32, 64, 32, 1024, 16384, 768, 1536)
        given = {f: getattr(args, f) for f in ("encoder_batch", "text_len", "lm_batch", "lm_seq")}
        return dataclasses.replace(defaults, **{f: v for f, v in given.items() if v is not None})


def log(message: str, deadline: float) -> None:
    print(f"[bench gpu, {max(deadline - time.time(), 0):.0f} s of budget left] {message}", file=sys.stderr, flush=True)


def error_entry(e: BaseException) -> dict[str, Any]:
    """An exception as JSON: type and message, and where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
            "where": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], Any], device: torch.device, warmup: int, timed: int) -> float:
    """Median wall time of ``timed`` calls of ``step`` after ``warmup`` untimed ones, the device
    synchronised around each timed call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(timed):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def each(what: str, jobs: dict[str, Callable[[], dict[str, Any]]], deadline: float,
         summary: Callable[[dict[str, Any]], str] = lambda entry: "") -> dict[str, dict[str, Any]]:
    """Each job's entry, in order; an exception becomes the entry, and a job not started by the
    deadline is skipped. Memory is released after each (a GPU's too) and a line logged."""
    results: dict[str, dict[str, Any]] = {}
    for name, job in jobs.items():
        if time.time() >= deadline:
            results[name] = {"ok": False, "skipped": "time budget"}
            continue
        try:
            results[name] = entry = job()
        except Exception as e:
            results[name] = entry = error_entry(e)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        detail = entry.get("error") or summary(entry)
        log(f"{what}: {name} {'ok' if entry['ok'] else 'FAILED'}" + (f" ({detail})" if detail else ""), deadline)
    return results


def device_info(device: torch.device) -> dict[str, Any]:
    """What the run ran on: device name, compute capability, versions, bf16, xformers."""
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "xformers": {"importable": xformers_version is not None, "version": xformers_version}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    bf16_supported=True)  # CPU autocast
    return info
