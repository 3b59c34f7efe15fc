"""Where a trainer step's time goes: the step of ``mmoe bench gpu``'s throughput section under
``torch.profiler``, as JSON.

For each preset and batch size: seconds per step, the device's busy time per step (the sum of its
kernels' times: far below the step's time means the step waits on the host, launching kernels or
syncing), kernel launches per step, host syncs per step as CUDA's sync debug mode counts them, and
the operators and kernels that take the most time.

    python benchmarks/profile_step.py --presets beit3/base,beit3/base_xmoe_8e --batches 32,128
    python benchmarks/profile_step.py --device cpu --presets beit3/debug --batches 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ..training import Trainer
from .harness import Plan, Sizes, each, median_seconds
from .throughput import _throughput_config, synthetic_step

__all__ = ["PROFILE_PRESETS", "main", "profile_one", "section"]

# the dense encoder and its slowest MoE twin in the throughput section (at half the dense speed)
PROFILE_PRESETS = ("beit3/base", "beit3/base_xmoe_8e")
CPU_PROFILE_PRESETS = ("beit3/debug", "beit3/xmoe_debug")


def _count_syncs(step, device: torch.device) -> int | None:
    """Host syncs in one call of ``step``, from CUDA's sync debug mode (one warning each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _top(events, key: str, n: int) -> list[dict[str, Any]]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key[:90], "calls": e.count, "ms_total": round(getattr(e, key) / 1e3, 2)} for e in rows]


def profile_one(preset: str, batch: int, device: torch.device, steps: int, top: int) -> dict[str, Any]:
    """The trainer step of ``preset`` (bf16 autocast, synthetic batches of ``batch`` per stream)
    timed, then profiled over ``steps`` steps; see the module docstring."""
    sizes = Sizes.resolve(argparse.Namespace(quick=False, encoder_batch=batch, text_len=None, lm_batch=batch,
                                             lm_seq=None), device)
    cfg = _throughput_config(preset, str(device), sizes, "sdpa")
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        batch_cpu, sequences = synthetic_step(trainer.cfg, torch.device("cpu"))

        def step():
            return trainer.train_step([batch_cpu])

        seconds = median_seconds(step, device, 3, steps)
        syncs = _count_syncs(step, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                            "cuLaunchKernelEx"))
        trainer.close()
    tokens = sum(n * t for n, t in sequences)
    return {"preset": preset, "batch": batch, "tokens_per_step": tokens, "seconds_per_step": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds), "device_busy_s_per_step": round(device_us / 1e6 / steps, 4),
            "device_busy_fraction": round(device_us / 1e6 / steps / seconds, 3) if device.type == "cuda" else None,
            "kernel_launches_per_step": launches // steps, "host_syncs_per_step": syncs,
            "top_device_ops": _top([e for e in events if e.self_device_time_total > 0], "self_device_time_total", top)
            if device.type == "cuda" else [],
            "top_cpu_ops": _top(events, "self_cpu_time_total", top)}


def section(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    """The ``profile`` section of ``mmoe bench gpu``: :func:`profile_one` of
    :data:`PROFILE_PRESETS` (on a CPU their debug twins) at the throughput section's batch per
    stream and at twice it (within an 80 GB GPU's memory), so that a step bound by the host shows
    as a busy fraction that grows with the batch."""
    batch = Sizes.resolve(args, device).encoder_batch
    presets = PROFILE_PRESETS if device.type == "cuda" else CPU_PROFILE_PRESETS
    jobs = {f"{preset} x{b}": lambda preset=preset, b=b: {"ok": True, **profile_one(preset, b, device, plan.bench_steps,
                                                                                     15)}
            for preset in presets for b in (batch, 2 * batch)}
    results = each("profile", jobs, deadline, lambda r: f"device busy {r.get('device_busy_fraction')}")
    return {"ok": all(r["ok"] for r in results.values()),
            "what": "the throughput section's trainer step under torch.profiler: device busy time and kernel launches "
                    "per step, host syncs (CUDA's sync debug mode), the top operators by device and host time",
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", default="beit3/base,beit3/base_xmoe_8e")
    p.add_argument("--batches", default="32,128", help="samples per stream (encoder) or sequences (LM)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    runs = [(preset, int(b)) for preset in args.presets.split(",") for b in args.batches.split(",")]
    # one preset's failure (out of memory, say) is its entry and does not lose the others
    entries = each("profile", {f"{p} x{b}": lambda p=p, b=b: {"ok": True, **profile_one(p, b, device, args.steps,
                                                                                         args.top)} for p, b in runs},
                   deadline=math.inf)
    results = [{"preset": p, "batch": b, **entry} for (p, b), entry in zip(runs, entries.values())]
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
