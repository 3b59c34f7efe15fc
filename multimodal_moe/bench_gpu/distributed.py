"""The ``distributed`` section of ``mmoe bench gpu``: everything here runs under
``torchrun --standalone``.

- ``process_group``: :mod:`multimodal_moe.bench_gpu.process_group` on one process, which starts a
  process group of one itself (NCCL on a GPU) and checks collectives and DDP, FSDP2 and expert
  parallelism against the plain model; at world size 1 the trainer starts none, so this is what
  runs NCCL on a one-GPU machine.
- ``ddp``, ``fsdp``, ``expert_parallel``: ``mmoe pretrain`` of :data:`DISTRIBUTED_PRESET` with
  ``train.data_parallel`` ddp and fsdp and with ``train.expert_parallel``, one process per GPU (at
  most two by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .harness import CHILD_GRACE_S, Plan, each

__all__ = ["DISTRIBUTED_PRESET", "section"]

DISTRIBUTED_PRESET = "lm/xmoe_debug"  # top-1 of 4 X-MoE experts: something for expert parallelism to split


def _torchrun(nproc: int, module_argv: list[str], timeout: float) -> dict[str, Any]:
    """``python -m MODULE ...`` (``module_argv``) under ``torchrun --standalone`` with ``nproc``
    processes: its exit status, seconds, output and whether NCCL started; or, past ``timeout``
    seconds, why not."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", *module_argv]
    env = {**os.environ, "NCCL_DEBUG": "VERSION"}  # NCCL prints its version once it starts
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun hands SIGTERM to its ranks and kills those that do not stop
            stdout, stderr = proc.communicate()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd),
                    "stderr_tail": stderr[-3000:]}
    nccl = next((line.strip() for line in (stdout + stderr).splitlines() if "NCCL version" in line), None)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 2), "nccl": nccl,
            "command": " ".join(cmd), "stderr_tail": stderr[-3000:]}


def _entry(run: dict[str, Any], ok: bool, fields: dict[str, Any]) -> dict[str, Any]:
    """A finished launch's JSON entry: ``fields`` with its exit status, seconds and NCCL line, and
    the command and its stderr where it failed."""
    out = {"ok": ok, "returncode": run["returncode"], "seconds": run["seconds"], **fields, "nccl": run["nccl"]}
    if not ok:
        out.update(command=run["command"], stderr_tail=run["stderr_tail"])
    return out


def _pretrain(device: str, nproc: int, overrides: list[str], run_dir: Path, steps: int, timeout: float
              ) -> dict[str, Any]:
    """``mmoe pretrain`` of :data:`DISTRIBUTED_PRESET` under torchrun: exit status, seconds, the
    logged losses, whether a checkpoint was written and whether NCCL started."""
    sets = [f"train.steps={steps}", "train.warmup_steps=1", f"train.device={device}", "train.num_workers=0",
            "train.log_every=1", f"train.checkpoint_every={steps}", *overrides]
    run = _torchrun(nproc, ["multimodal_moe.cli", "pretrain", "--config", DISTRIBUTED_PRESET, "--run-dir",
                            str(run_dir), "--no-progress", *[a for s in sets for a in ("--set", s)]], timeout)
    if "error" in run:
        return run
    metrics = run_dir / "metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    checkpoint = (run_dir / "checkpoints" / "latest").exists()
    ok = run["returncode"] == 0 and len(losses) == steps and all(math.isfinite(x) for x in losses) and checkpoint
    return _entry(run, ok, {"losses": losses, "checkpoint": checkpoint})


def _process_group(device: str, out_file: Path, deadline: float, timeout: float) -> dict[str, Any]:
    """:mod:`multimodal_moe.bench_gpu.process_group` under torchrun with one process: its JSON,
    with the launch's exit status and seconds."""
    run = _torchrun(1, ["multimodal_moe.bench_gpu.process_group", "--device", device, "--out", str(out_file),
                        "--deadline", repr(deadline)], timeout)
    if "error" in run:
        return run
    if run["returncode"] or not out_file.is_file():
        return _entry(run, False, {"error": f"the check's process exited with status {run['returncode']}"})
    result = json.loads(out_file.read_text())
    return _entry(run, result.pop("ok"), result)


def _summary(entry: dict[str, Any]) -> str:
    if "losses" in entry:
        return f"{entry['seconds']} s, losses {entry['losses']}"
    return f"{entry['seconds']} s, backend {entry.get('backend')}"


def section(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if device.type == "cuda" else 1)
    train_device = args.device if nproc == 1 else device.type  # under torchrun each rank takes GPU LOCAL_RANK
    experts = 4 * nproc  # four per rank, so that expert parallelism over every rank divides them
    runs = {"ddp": ["train.data_parallel=ddp"], "fsdp": ["train.data_parallel=fsdp"],
            "expert_parallel": ["train.data_parallel=ddp", f"train.expert_parallel={nproc}",
                                f"model.moe_ffn.num_experts={experts}"]}
    out: dict[str, Any] = {"preset": DISTRIBUTED_PRESET, "nproc": nproc, "steps": plan.distributed_steps}
    if nproc == 1:
        out["launches_note"] = ("at world size 1 the trainer starts no process group "
                                "(multimodal_moe/distributed/env.py) and parallelize() leaves the task unwrapped, so "
                                "the ddp, fsdp and expert_parallel launches check mmoe pretrain under torchrun on "
                                "this device; process_group checks NCCL, DDP, FSDP2 and the expert-parallel "
                                "all-to-all on a process group of one; --nproc 2 on a machine with two GPUs runs "
                                "the launches on two")
        out["expert_parallel_note"] = ("train.expert_parallel=1 is the default (every rank holds every expert): "
                                       "with one process this run is the ddp run again")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-dist-") as tmp:
        def timeout() -> float:
            return deadline - time.time() + CHILD_GRACE_S / 2

        jobs = {"process_group": lambda: _process_group(args.device, Path(tmp) / "process_group.json", deadline,
                                                        timeout())}
        jobs.update({name: lambda name=name, overrides=overrides: _pretrain(
                         train_device, nproc, overrides, Path(tmp) / name, plan.distributed_steps, timeout())
                     for name, overrides in runs.items()})
        results = each("distributed", jobs, deadline, _summary)
    return {"ok": all(r["ok"] for r in results.values()), **out, **results}
