"""A one-command acceptance run on a GPU (``mmoe bench gpu``): does the toolkit work on CUDA, and how fast?

    mmoe bench gpu [--out gpu.json] [--quick] [--sections presets,grouped_mm,distributed,throughput]
    mmoe bench gpu --device cpu --quick        the same checks on a CPU, at debug sizes (a smoke run)

It prints one JSON object (and writes it to ``--out``): ``device`` (name, compute capability,
torch and CUDA versions, bf16 support, whether xformers imports), one entry per section, each
with its own ``ok``, and a top-level ``ok`` that is true when every requested section ran and
passed (the exit status is then 0, else 1). The sections:

- ``presets``: every ``*debug*`` preset trains 20 steps on the bundled data in bf16 autocast
  through :meth:`Trainer.fit <multimodal_moe.training.Trainer.fit>` (metrics and the final
  checkpoint included): every loss finite, no step skipped, the mean of the last 5 losses below
  that of the first 5, and the checkpoint loads. Then a few fp32 steps from the same seed: the
  first loss (same weights, same batch) must match bf16's within 2e-2, relative.
- ``grouped_mm``: :func:`~multimodal_moe.layers.moe.grouped_matmul` and
  :class:`~multimodal_moe.layers.moe.GroupedExperts` in bf16 against a loop over experts of
  ``torch.mm`` in fp32 on the same values, experts with zero rows included: forward and input and
  weight gradients; the experts also with fp32 weights under bf16 autocast, as the trainer runs
  them; and rows/s of the grouped path against the loop at a realistic shape.
- ``distributed``: ``torchrun --standalone`` runs of ``mmoe pretrain`` (an LM MoE debug preset)
  with ``train.data_parallel`` ddp and fsdp and with ``train.expert_parallel`` (one process per
  GPU, at most two by default; a single process starts no process group, which the JSON says).
- ``throughput``: the trainer's whole step (heads, losses, backward, clipping, AdamW) of base-size
  presets on synthetic batches of their task's batch types, bf16 autocast: s/step, tokens/s, peak
  memory, active parameters per token and model FLOPs utilisation (:mod:`multimodal_moe.flops`);
  with xformers installed, ``beit3/base`` again on its attention.

Each section runs in a process of its own, so that a CUDA error or a hang in one cannot take the
others with it. A section not started when ``--budget-s`` is spent is skipped, and so is every
preset of a section not started by then.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipelines.batches import ImageBatch, ImageTextBatch, LMBatch, TextBatch
from data_pipelines.mixer import PretrainStep

from . import load_checkpoint, load_config
from .config import Config, list_presets
from .flops import active_parameters, model_flops_per_step, peak_bf16_tflops
from .layers.moe import GroupedExperts, grouped_matmul
from .models import DecoderLMConfig
from .tasks import LanguageModelingConfig, MaskedDataModelingConfig
from .training import Trainer

__all__ = ["device_info", "loop_experts", "loop_matmul", "main", "synthetic_step"]

SECTIONS = ("presets", "grouped_mm", "distributed", "throughput")
THROUGHPUT_PRESETS = ("beit3/base", "beit3/base_xmoe_8e", "beit3/base_mhmoe_8e", "lm/mot_base_32e", "lm/mot_base")
CPU_THROUGHPUT_PRESETS = ("beit3/debug", "beit3/xmoe_debug", "beit3/mhmoe_debug", "lm/mot_debug", "lm/debug")
DISTRIBUTED_PRESET = "lm/xmoe_debug"  # top-1 of 4 X-MoE experts: something for expert parallelism to split
LOSS_RTOL = 2e-2  # bf16 vs fp32 first-step loss
GROUPED_RTOL = 2e-2  # bf16 grouped matmul vs the fp32 loop, relative to the largest reference value
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


def _log(message: str, deadline: float) -> None:
    print(f"[bench gpu, {max(deadline - time.time(), 0):.0f} s of budget left] {message}", file=sys.stderr, flush=True)


def _error(e: BaseException) -> dict[str, Any]:
    """An exception as JSON: type and message, and where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
            "where": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], Any], device: torch.device, warmup: int, timed: int) -> float:
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


def _each(what: str, jobs: dict[str, Callable[[], dict[str, Any]]], deadline: float,
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
            results[name] = entry = _error(e)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        detail = entry.get("error") or summary(entry)
        _log(f"{what}: {name} {'ok' if entry['ok'] else 'FAILED'}" + (f" ({detail})" if detail else ""), deadline)
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


# -- presets: every debug preset trains, bf16 against fp32 -------------------------------------

def _debug_presets() -> list[str]:
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


def _section_presets(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    jobs = {preset: lambda preset=preset: _check_preset(preset, args.device, plan)
            for preset in args.presets or _debug_presets()}
    results = _each("presets", jobs, deadline, lambda r: f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, "
                                                         f"bf16/fp32 first loss {r['first_loss_rel_diff']:.1e}")
    return {"ok": all(r["ok"] for r in results.values()), "steps": plan.train_steps, "precision": "bf16 autocast",
            "decrease_rule": f"mean of the last {plan.loss_window} losses below the mean of the first "
                             f"{plan.loss_window}",
            "fp32_steps": plan.fp32_steps, "first_loss_rtol": LOSS_RTOL, "results": results}


# -- grouped_mm: the grouped expert matmul against a loop over experts -----------------------

def loop_matmul(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The oracle of :func:`grouped_matmul`: ``counts[e]`` rows at a time times expert e's matrix."""
    rows = x_MK.split(counts)
    return torch.cat([torch.mm(rows[e], w_EKN[e]) for e in range(len(counts))])


def loop_experts(x_MD: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, counts: list[int],
                 scale_M: torch.Tensor) -> torch.Tensor:
    """The oracle of a GELU :class:`GroupedExperts`: each expert's MLP on its rows, times the gates."""
    hidden = F.gelu(loop_matmul(x_MD, w1_EDF, counts))
    return loop_matmul(hidden, w2_EFD, counts) * scale_M[:, None]


def _counts(rows: int, experts: int, generator: torch.Generator) -> list[int]:
    """Rows per expert, at random, with the second and last expert given none."""
    chosen = torch.randint(0, experts - 2, (rows,), generator=generator)
    counts = torch.bincount(chosen, minlength=experts - 2).tolist()
    return [counts[0], 0, *counts[1:], 0]


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """Where each expert's rows end, as :func:`grouped_matmul` takes them (int32)."""
    return torch.tensor(counts).cumsum(0).to(device, torch.int32)


def _compare(run: Callable[..., torch.Tensor], oracle: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
             counts: list[int], dtype: torch.dtype, autocast: bool = False) -> dict[str, Any]:
    """Forward and gradients of ``run`` on ``inputs`` (cast to ``dtype``) against ``oracle`` in fp32
    on the same values: the largest error of each, relative to the largest reference value."""
    device = next(iter(inputs.values())).device
    ours = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    ref = {k: v.detach().float().requires_grad_() for k, v in ours.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run(**ours)
    expected = oracle(**ref)
    upstream = torch.randn(expected.shape, generator=torch.Generator(device).manual_seed(1), device=device)
    (out.float() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    pairs = {"forward": (out, expected), **{f"grad_{k}": (ours[k].grad, ref[k].grad) for k in ours}}
    errors = {name: {"max_abs_error": (a.float() - b).abs().max().item(), "max_abs_reference": b.abs().max().item()}
              for name, (a, b) in pairs.items()}
    empty = [e for e, n in enumerate(counts) if n == 0]
    zero_grads = max((ours[k].grad[empty].abs().max().item() for k in ours if ours[k].ndim == 3), default=0.0)
    ok = all(e["max_abs_error"] <= GROUPED_RTOL * e["max_abs_reference"] for e in errors.values())
    return {"ok": ok and zero_grads == 0.0, "output_dtype": str(out.dtype).removeprefix("torch."), "errors": errors,
            "empty_experts_max_abs_weight_grad": zero_grads}


def _grouped_speed(sizes: Sizes, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Forward+backward rows/s of bf16 :class:`GroupedExperts` and of the same weights in a loop."""
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.randint(0, sizes.grouped_experts, (sizes.grouped_rows,), generator=g),
                            minlength=sizes.grouped_experts)
    experts = GroupedExperts(sizes.grouped_experts, sizes.grouped_dim, sizes.grouped_hidden, "gelu").to(
        device, torch.bfloat16)
    x_MD = torch.randn(sizes.grouped_rows, sizes.grouped_dim, generator=g).to(device, torch.bfloat16)
    x_MD.requires_grad_()
    scale_M = torch.rand(sizes.grouped_rows, generator=g).to(device, torch.bfloat16)
    offsets_E, counts_list = _offsets(counts.tolist(), device), counts.tolist()

    def grouped() -> None:
        experts.zero_grad(set_to_none=True)
        experts(x_MD, offsets_E, scale_M).sum().backward()

    def loop() -> None:
        experts.zero_grad(set_to_none=True)
        loop_experts(x_MD, experts.w1_EDF, experts.w2_EFD, counts_list, scale_M).sum().backward()

    seconds = {name: _median_seconds(step, device, plan.bench_warmup, plan.bench_steps)
               for name, step in (("grouped", grouped), ("loop", loop))}
    return {"ok": True, "rows": sizes.grouped_rows, "dim": sizes.grouped_dim, "hidden": sizes.grouped_hidden,
            "experts": sizes.grouped_experts, "dtype": "bfloat16", "step": "forward + backward",
            "note": "rows are (token, expert) assignments: at top-2, tokens/s is half the rows/s",
            **{f"{name}_rows_per_s": round(sizes.grouped_rows / s) for name, s in seconds.items()},
            "grouped_vs_loop": round(seconds["loop"] / seconds["grouped"], 3)}


def _matmul_case(counts: list[int], K: int, N: int, device: torch.device, g: torch.Generator) -> dict[str, Any]:
    """:func:`grouped_matmul` in bf16 on (M, K) rows and E (K, N) matrices against :func:`loop_matmul`."""
    offsets_E = _offsets(counts, device)
    inputs = {"x_MK": torch.randn(sum(counts), K, generator=g).to(device),
              "w_EKN": (torch.randn(len(counts), K, N, generator=g) / K ** 0.5).to(device)}
    return _compare(lambda x_MK, w_EKN: grouped_matmul(x_MK, w_EKN, offsets_E),
                    lambda **t: loop_matmul(counts=counts, **t), inputs, counts, torch.bfloat16)


def _experts_case(counts: list[int], D: int, hidden: int, dtype: torch.dtype, autocast: bool, device: torch.device,
                  g: torch.Generator) -> dict[str, Any]:
    """A GELU :class:`GroupedExperts` (its weights in ``dtype``, optionally under bf16 autocast)
    with gates against :func:`loop_experts`."""
    module = GroupedExperts(len(counts), D, hidden, "gelu").to(device)
    offsets_E = _offsets(counts, device)
    inputs = {"x_MD": torch.randn(sum(counts), D, generator=g).to(device), "w1_EDF": module.w1_EDF.detach(),
              "w2_EFD": module.w2_EFD.detach(), "scale_M": torch.rand(sum(counts), generator=g).to(device)}

    def ours(x_MD, w1_EDF, w2_EFD, scale_M):  # the module with the compared tensors as its weights
        return torch.func.functional_call(module, {"w1_EDF": w1_EDF, "w2_EFD": w2_EFD}, (x_MD, offsets_E, scale_M))

    return _compare(ours, lambda **t: loop_experts(counts=counts, **t), inputs, counts, dtype, autocast)


def _section_grouped_mm(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    counts = _counts(600, 8, g)
    cases = {  # widths: multiples of 16 bytes in bf16 (torch._grouped_mm's alignment), and not
        "grouped_matmul_bf16": lambda: _matmul_case(counts, 128, 192, device, g),
        "grouped_matmul_bf16_unaligned": lambda: _matmul_case(counts, 60, 90, device, g),
        "grouped_experts_bf16": lambda: _experts_case(counts, 128, 192, torch.bfloat16, False, device, g),
        # the trainer's case: fp32 weights under bf16 autocast (output_dtype says what the experts ran in)
        "grouped_experts_fp32_autocast": lambda: _experts_case(counts, 128, 192, torch.float32, True, device, g),
    }
    out: dict[str, Any] = {"tolerance": f"max abs error <= {GROUPED_RTOL} x max abs reference; the weight "
                                        "gradients of experts without rows exactly 0",
                           "oracle": "loop over experts of torch.mm in fp32 on the same values",
                           "rows_per_expert": counts}
    cases["speed"] = lambda: _grouped_speed(Sizes.resolve(args, device), device, plan)
    results = _each("grouped_mm", cases, deadline, lambda r: f"grouped {r['grouped_vs_loop']}x the loop"
                    if "grouped_vs_loop" in r else f"output {r['output_dtype']}")
    return {"ok": all(r["ok"] for r in results.values()), **out, **results}


# -- distributed: torchrun launches of mmoe pretrain ------------------------------------------

def _torchrun(device: str, nproc: int, overrides: list[str], run_dir: Path, steps: int, timeout: float
              ) -> dict[str, Any]:
    """``mmoe pretrain`` of :data:`DISTRIBUTED_PRESET` under torchrun: exit status, seconds, the
    logged losses, whether a checkpoint was written and whether NCCL started."""
    sets = [f"train.steps={steps}", "train.warmup_steps=1", f"train.device={device}", "train.num_workers=0",
            "train.log_every=1", f"train.checkpoint_every={steps}", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "multimodal_moe.cli", "pretrain", "--config", DISTRIBUTED_PRESET, "--run-dir", str(run_dir),
           "--no-progress", *[a for s in sets for a in ("--set", s)]]
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
    seconds = round(time.perf_counter() - start, 2)
    metrics = run_dir / "metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    nccl = next((line.strip() for line in (stdout + stderr).splitlines() if "NCCL version" in line), None)
    out = {"ok": False, "returncode": proc.returncode, "seconds": seconds, "losses": losses,
           "checkpoint": (run_dir / "checkpoints" / "latest").exists(), "nccl": nccl}
    out["ok"] = (proc.returncode == 0 and len(losses) == steps and all(math.isfinite(x) for x in losses)
                 and out["checkpoint"])
    if not out["ok"]:
        out.update(command=" ".join(cmd), stderr_tail=stderr[-3000:])
    return out


def _section_distributed(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float
                         ) -> dict[str, Any]:
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if device.type == "cuda" else 1)
    train_device = args.device if nproc == 1 else device.type  # under torchrun each rank takes GPU LOCAL_RANK
    experts = 4 * nproc  # four per rank, so that expert parallelism over every rank divides them
    runs = {"ddp": ["train.data_parallel=ddp"], "fsdp": ["train.data_parallel=fsdp"],
            "expert_parallel": ["train.data_parallel=ddp", f"train.expert_parallel={nproc}",
                                f"model.moe_ffn.num_experts={experts}"]}
    out: dict[str, Any] = {"preset": DISTRIBUTED_PRESET, "nproc": nproc, "steps": plan.distributed_steps}
    if nproc == 1:
        out["process_group"] = ("none: at world size 1 the trainer starts no process group "
                                "(multimodal_moe/distributed/env.py) and parallelize() leaves the task unwrapped, so "
                                "these runs check the torchrun launch on this device, not DDP, FSDP2 or NCCL; "
                                "--nproc 2 on a machine with two GPUs runs them")
        out["expert_parallel_note"] = ("train.expert_parallel=1 is the default (every rank holds every expert): "
                                       "with one process this run is the ddp run again")
    else:
        out["process_group"] = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="bench-gpu-dist-") as tmp:
        jobs = {name: lambda name=name, overrides=overrides: _torchrun(
                    train_device, nproc, overrides, Path(tmp) / name, plan.distributed_steps,
                    deadline - time.time() + CHILD_GRACE_S / 2)
                for name, overrides in runs.items()}
        results = _each("distributed", jobs, deadline, lambda r: f"{r['seconds']} s, losses {r['losses']}")
    return {"ok": all(r["ok"] for r in results.values()), **out, **results}


# -- throughput: the trainer's step of base-size presets --------------------------------------

def synthetic_step(cfg: Config, device: torch.device) -> tuple[PretrainStep | LMBatch, list[tuple[int, int]]]:
    """A batch of the type ``cfg.task`` trains on, of its batch sizes and lengths, random, on
    ``device``, without padding; and its sequences as (count, length) pairs."""
    g = torch.Generator(device).manual_seed(0)
    model, task = cfg.model, cfg.task
    if isinstance(task, LanguageModelingConfig):
        B, T = task.text.batch_size, task.text.max_len
        ids_BT = torch.randint(0, model.vocab_size, (B, T + 1), generator=g, device=device)
        return LMBatch(keys=[], ids_BT=ids_BT), [(B, T)]
    if not isinstance(task, MaskedDataModelingConfig):
        raise ValueError(f"no synthetic batches for task kind {task.kind!r}; the throughput section times mmm and lm")
    P, S, C = model.num_patches, model.image_size, model.in_chans

    def images(B: int) -> dict[str, Any]:
        return {"images_B3HW": torch.randn(B, C, S, S, generator=g, device=device),
                "image_mask_BP": torch.rand(B, P, generator=g, device=device) < task.image_mask_ratio}

    def text(B: int, L: int, ratio: float) -> dict[str, Any]:
        ids_BL = torch.randint(4, model.vocab_size, (B, L), generator=g, device=device)
        masked_BL = torch.rand(B, L, generator=g, device=device) < ratio
        return {"text_ids_BL": ids_BL, "padding_mask_BL": torch.zeros(B, L, dtype=torch.bool, device=device),
                "mlm_labels_BL": ids_BL.masked_fill(~masked_BL, -100)}

    step, sequences = PretrainStep(step=0), []
    if (s := task.image) is not None:
        step.image = ImageBatch(keys=[str(i) for i in range(s.batch_size)], **images(s.batch_size))
        sequences.append((s.batch_size, 1 + P))
    if (s := task.text) is not None:
        step.text = TextBatch(keys=[str(i) for i in range(s.batch_size)],
                              **text(s.batch_size, s.max_len, task.text_mask_ratio))
        sequences.append((s.batch_size, s.max_len))
    if (s := task.image_text) is not None:
        step.image_text = ImageTextBatch(keys=[str(i) for i in range(s.batch_size)], **images(s.batch_size),
                                         **text(s.batch_size, s.max_len, task.image_text_mask_ratio))
        sequences.append((s.batch_size, 1 + P + s.max_len))
    return step, sequences


def _throughput_config(preset: str, device: str, sizes: Sizes, backend: str) -> Config:
    """``preset`` with bf16 autocast on ``device``, attention ``backend`` and the timed batch sizes."""
    sets = [f"train.device={device}", "train.precision=bf16", "train.num_workers=0", "train.steps=1000",
            "train.warmup_steps=0", f"model.attention_backend={backend}"]
    model = load_config(preset).model
    if isinstance(model, DecoderLMConfig):
        sets += [f"task.text.batch_size={sizes.lm_batch}", f"task.text.max_len={sizes.lm_seq}"]
        if sizes.lm_seq > model.max_seq_len:
            sets.append(f"model.max_seq_len={sizes.lm_seq}")
    else:
        B, L = sizes.encoder_batch, sizes.text_len
        sets += [f"task.image.batch_size={B}", f"task.text.batch_size={B}", f"task.text.max_len={L}",
                 f"task.image_text.batch_size={B}", f"task.image_text.max_len={L}"]
    return load_config(preset, sets)


def _time_preset(preset: str, device: torch.device, sizes: Sizes, plan: Plan, peak_tflops: float | None,
                 backend: str = "sdpa") -> dict[str, Any]:
    """Median seconds of the trainer's step on one synthetic batch, and what follows from them."""
    cfg = _throughput_config(preset, str(device), sizes, backend)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        batch, sequences = synthetic_step(trainer.cfg, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        seconds = _median_seconds(lambda: losses.append(trainer.train_step([batch]).loss), device,
                                  plan.bench_warmup, plan.bench_steps)
        model = trainer.task.model
        active = active_parameters(model)
        flops = model_flops_per_step(active, cfg.model.depth, cfg.model.dim, sequences)
        entry = {"ok": all(math.isfinite(x) for x in losses), "attention_backend": backend,
                 "sequences": [{"count": n, "length": t} for n, t in sequences], "tokens_per_step": flops["tokens"],
                 "seconds_per_step": round(seconds, 4), "tokens_per_s": round(flops["tokens"] / seconds),
                 "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                     if device.type == "cuda" else None),
                 "parameters": sum(p.numel() for p in trainer.task.parameters()),
                 "backbone_parameters": sum(p.numel() for p in model.parameters()),
                 "active_parameters_per_token": round(active), "first_loss": losses[0], "last_loss": losses[-1]}
        del trainer, model, batch
    total = flops["parameter_flops"] + flops["attention_flops"]
    for name, work in (("mfu", total), ("mfu_without_attention", flops["parameter_flops"])):
        entry[name] = None if peak_tflops is None else round(work / seconds / (peak_tflops * 1e12), 4)
    entry["model_tflop_per_step"] = float(f"{total / 1e12:.4g}")
    return entry


def _section_throughput(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float
                        ) -> dict[str, Any]:
    sizes, info = Sizes.resolve(args, device), device_info(device)
    peak = args.peak_tflops or (peak_bf16_tflops(info["name"]) if device.type == "cuda" else None)
    out: dict[str, Any] = {
        "peak_bf16_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else (f"table ({info['name']})" if peak else
                                                                 f"{info['name']!r} is not in the table, so MFU is "
                                                                 "null (pass --peak-tflops)"),
        "mfu_definition": "(6 x active parameters per token x tokens + attention FLOPs) / s / peak; "
                          "mfu_without_attention leaves attention out; task heads (MIM, MLM) are not counted",
        "batch": {"encoder_per_stream": sizes.encoder_batch, "encoder_text_len": sizes.text_len,
                  "lm": sizes.lm_batch, "lm_seq": sizes.lm_seq},
        "timing": f"median of {plan.bench_steps} steps after {plan.bench_warmup} warmup steps; one synthetic batch "
                  "of the task's batch type, without padding"}
    presets = args.throughput_presets or (THROUGHPUT_PRESETS if device.type == "cuda" else CPU_THROUGHPUT_PRESETS)
    jobs = {preset: lambda preset=preset: _time_preset(preset, device, sizes, plan, peak) for preset in presets}
    results = _each("throughput", jobs, deadline, lambda r: f"{r['tokens_per_s']:,} tokens/s, MFU {r['mfu']}")
    ok = all(r["ok"] for r in results.values())
    if not info["xformers"]["importable"]:
        xformers: Any = "not installed"
    elif device.type != "cuda":
        xformers = "skipped: xformers attention runs on CUDA only"
    else:  # the first preset (beit3/base by default) again, on xformers' attention
        job = {presets[0]: lambda: _time_preset(presets[0], device, sizes, plan, peak, backend="xformers")}
        xformers = _each("throughput on xformers", job, deadline, lambda r: f"{r['tokens_per_s']:,} tokens/s")
        xformers = {"preset": presets[0], **xformers[presets[0]]}
        sdpa = results[presets[0]].get("tokens_per_s")
        if "tokens_per_s" in xformers and sdpa:
            xformers["tokens_per_s_vs_sdpa"] = round(xformers["tokens_per_s"] / sdpa, 3)
        ok = ok and xformers["ok"]
    return {"ok": ok, **out, "results": results, "xformers": xformers}


# -- the run -----------------------------------------------------------------------------------

SECTION_RUNNERS = {"presets": _section_presets, "grouped_mm": _section_grouped_mm, "distributed": _section_distributed,
                   "throughput": _section_throughput}


def _relay(stream, tail: collections.deque) -> None:
    """Copy a child's output lines to our stderr, keeping the last ones."""
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))


def _run_section_process(section: str, argv: list[str], deadline: float) -> dict[str, Any]:
    """A section in a fresh process (``mmoe bench gpu ... --child SECTION``), killed with its own
    children if it runs :data:`CHILD_GRACE_S` past the budget; its JSON, or why there is none."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        result = Path(tmp) / f"{section}.json"
        cmd = [sys.executable, "-m", "multimodal_moe.cli", "bench", "gpu", *argv, "--child", section,
               "--child-out", str(result), "--deadline", repr(deadline)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group, torchrun's ranks included
        tail: collections.deque = collections.deque(maxlen=20)
        relay = threading.Thread(target=_relay, args=(proc.stdout, tail), daemon=True)
        relay.start()
        timeout = max(deadline - time.time(), 0) + CHILD_GRACE_S
        try:
            proc.wait(timeout=timeout)
        except BaseException as e:  # past its grace, or we are interrupted: it goes, and what it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            relay.join(timeout=5)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return {"ok": False, "error": f"killed after {timeout:.0f} s, {CHILD_GRACE_S} s past the time budget",
                    "output_tail": list(tail)}
        relay.join()
        if proc.returncode or not result.is_file():
            return {"ok": False, "error": f"the section's process exited with status {proc.returncode}",
                    "output_tail": list(tail)}
        return json.loads(result.read_text())


def _strict_json(tree: Any) -> Any:
    """``tree`` with non-finite floats as the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(tree, dict):
        return {k: _strict_json(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_strict_json(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return str(tree)
    return tree


def _names(text: str | None, known: list[str] | tuple[str, ...], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--{what}: unknown {unknown or text!r}; choose among {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmoe bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run at debug sizes")
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller batches (a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--presets", default=None, help="comma-separated debug presets for the presets section "
                                                   "(default: every *debug* preset)")
    p.add_argument("--throughput-presets", default=None,
                   help=f"comma-separated presets to time (default: {', '.join(THROUGHPUT_PRESETS)}; on a CPU "
                        f"their debug twins)")
    p.add_argument("--encoder-batch", type=int, default=None,
                   help="throughput: samples per stream (default 32; 8 with --quick, 4 on a CPU)")
    p.add_argument("--text-len", type=int, default=None,
                   help="throughput: encoder text tokens (default 64; 32 with --quick, 16 on a CPU)")
    p.add_argument("--lm-batch", type=int, default=None, help="throughput: LM sequences (default 32; 4 on a CPU)")
    p.add_argument("--lm-seq", type=int, default=None,
                   help="throughput: LM tokens per sequence, raising a preset's max_seq_len if needed (default "
                        "1024; 256 with --quick, 64 on a CPU)")
    p.add_argument("--nproc", type=int, default=None, help="distributed: processes (default: 2 with two GPUs or "
                                                           "more, else 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device for MFU (default: "
                                                                   "from the table of known devices)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no new section or preset after this many "
                                                                 "seconds (default 450)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                             "run it on a machine with a GPU, or pass --device cpu for a CPU smoke run")
        sections = _names(args.sections, SECTIONS, "sections")
        args.presets = _names(args.presets, _debug_presets(), "presets")
        args.throughput_presets = _names(args.throughput_presets, list_presets(), "throughput-presets")
    except (RuntimeError, ValueError) as e:  # torch.device("nope") raises RuntimeError
        print(f"mmoe bench gpu: error: {e}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if args.child:
        try:
            result = SECTION_RUNNERS[args.child](args, device, plan, args.deadline)
        except Exception as e:
            result = _error(e)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    start = time.time()
    deadline = start + args.budget_s
    report: dict[str, Any] = {"ok": False, "device": device_info(device),
                              "options": {"quick": args.quick, "sections": sections, "budget_s": args.budget_s,
                                          "sizes": dataclasses.asdict(Sizes.resolve(args, device))}}
    jobs = {section: lambda section=section: _run_section_process(section, argv, deadline) for section in sections}
    report.update(_each("section", jobs, deadline))
    report["ok"] = all(report[s]["ok"] for s in sections)
    report["seconds"] = round(time.time() - start, 1)
    text = json.dumps(_strict_json(report), indent=2, allow_nan=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
