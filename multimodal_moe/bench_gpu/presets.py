"""The ``presets`` section of ``mmoe bench gpu``: every ``*debug*`` preset trains a few steps in
bf16 autocast through :meth:`Trainer.fit <multimodal_moe.training.Trainer.fit>`, its checkpoint
loads, and its first loss matches an fp32 run's from the same seed."""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import load_checkpoint, load_config
from ..config import list_presets
from ..training import Trainer
from .harness import Plan, each

__all__ = ["debug_presets", "section"]

LOSS_RTOL = 2e-2  # bf16 vs fp32 first-step loss


def debug_presets() -> list[str]:
    """Every preset whose name says debug: the ones this section trains by default."""
    return [name for name in list_presets() if "debug" in name]


def _fit(preset: str, device: str, precision: str, steps: int, warmup: int, run_dir: Path) -> dict[str, Any]:
    """Train ``preset`` for ``steps`` steps into ``run_dir``: every step's loss, bad steps, seconds."""
    cfg = load_config(preset, [f"train.device={device}", f"train.precision={precision}", f"train.steps={steps}",
                               f"train.warmup_steps={min(warmup, steps - 1)}", "train.num_workers=0",
                               "train.log_every=1", f"train.checkpoint_every={steps}"])
    start = time.perf_counter()
    records = Trainer(cfg, run_dir, progress=False).fit().records
    return {"losses": [float(r.get("loss", math.nan)) for r in records], "bad_steps": records[-1]["bad_steps"],
            "seconds": round(time.perf_counter() - start, 2)}


def _check_preset(preset: str, device: str, plan: Plan) -> dict[str, Any]:
    """One preset's bf16 run, its checkpoint, and the fp32 run's first loss."""
    w = plan.loss_window
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        bf16 = _fit(preset, device, "bf16", plan.train_steps, plan.warmup_steps, Path(tmp) / "bf16")
        losses = bf16.pop("losses")
        first, last = statistics.fmean(losses[:w]), statistics.fmean(losses[-w:])
        entry: dict[str, Any] = {
            "ok": False, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            f"mean_first_{w}": first, f"mean_last_{w}": last, **bf16,
            "finite": all(math.isfinite(x) for x in losses), "decreased": last < first}
        load_checkpoint(Path(tmp) / "bf16")
        entry["checkpoint_loads"] = True
        fp32 = _fit(preset, device, "fp32", plan.fp32_steps, 0, Path(tmp) / "fp32")  # its first loss: before any update
    entry["fp32_first_loss"], entry["fp32_seconds"] = fp32["losses"][0], fp32["seconds"]
    entry["first_loss_rel_diff"] = abs(losses[0] - fp32["losses"][0]) / max(abs(fp32["losses"][0]), 1e-12)
    entry["ok"] = (entry["finite"] and entry["decreased"] and entry["bad_steps"] == 0
                   and entry["first_loss_rel_diff"] <= LOSS_RTOL)
    return entry


def section(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    jobs = {preset: lambda preset=preset: _check_preset(preset, args.device, plan)
            for preset in args.presets or debug_presets()}
    results = each("presets", jobs, deadline, lambda r: f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, "
                                                         f"bf16/fp32 first loss {r['first_loss_rel_diff']:.1e}")
    return {"ok": all(r["ok"] for r in results.values()), "steps": plan.train_steps, "precision": "bf16 autocast",
            "decrease_rule": f"mean of the last {plan.loss_window} losses below the mean of the first "
                             f"{plan.loss_window}",
            "fp32_steps": plan.fp32_steps, "first_loss_rtol": LOSS_RTOL, "results": results}

