"""The training loop: any task, one machine or many, resumable exactly.

    mmoe pretrain --config configs/pretrain/debug.yaml --run-dir runs/x [--resume]

One step = ``grad_accum`` micro-batches -> clip -> AdamW (timm's factory: no decay on biases,
norms, positions and CLS/mask tokens; optional layer-wise lr decay) -> cosine schedule with
linear warmup (timm, per step) -> optional weight EMA. A step whose loss or gradient is not
finite is skipped and counted; ``max_bad_steps`` in a row stop the run with its last good
checkpoint intact. Every ``log_every`` steps a line goes to ``metrics.jsonl``
(:mod:`.metrics`); every ``checkpoint_every`` steps and at the end a checkpoint is written
(:mod:`.checkpoint`). A resumed run restores weights, optimizer, scheduler, RNG, data-reader
positions and the current log interval, and so continues exactly as the uninterrupted run would
have (bitwise on CPU with the same thread count).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from .. import build_model
from ..config import Config, dump_config
from ..configurable import to_dict
from ..runtime import keep_freed_memory
from ..tasks import Task, default_task
from .checkpoint import Checkpoint, config_differences, save_checkpoint
from .metrics import MetricsLog, StepMeter

__all__ = ["TrainResult", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    records: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or on ``auto`` on a GPU that supports it; None = fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_task(cfg: Config) -> Task:
    """The backbone (from ``cfg.seed``) and the task's heads around it (from a seed derived from it)."""
    task_cfg = cfg.task or default_task(cfg.model)
    model = build_model(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return task_cfg.build(model)


class _Progress:
    """A tqdm bar on stderr (or nothing), with the loss and throughput."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, record: dict[str, Any] | None) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if record is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.task`` (or the model's default task) for ``cfg.train.steps`` steps.

    Args:
        cfg: the resolved run config.
        run_dir: where ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/`` go.
        resume: continue from ``run_dir/checkpoints/latest`` (whose model and task config must
            match ``cfg``'s); without it, a run dir that already has checkpoints is refused.
        progress: show a progress bar.

    Raises:
        TrainingDiverged: after ``max_bad_steps`` consecutive non-finite steps.
        CheckpointError: ``resume`` without a readable checkpoint, or one that does not fit.
        FileExistsError: a fresh run into a run dir that has checkpoints.
    """
    tc = cfg.train
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = None
    if resume:
        checkpoint = Checkpoint.open(ckpt_dir)
        checkpoint.check_compatible(cfg, sections=("model", "task", "seed"))
    elif any(ckpt_dir.glob("step_*")):
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                              f"or choose a new --run-dir")

    device = resolve_device(tc.device)
    if device.type == "cpu":
        keep_freed_memory()
    amp_dtype = autocast_dtype(tc.precision, device)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg).to(device)
    optimizer = create_optimizer_v2(task, opt="adamw", lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas),
                                    eps=tc.eps, layer_decay=tc.layer_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=tc.steps - tc.warmup_steps, lr_min=tc.min_lr,
                                  warmup_t=tc.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                                  t_in_epochs=False)
    ema = ModelEmaV3(task.model, decay=tc.ema_decay) if tc.ema_decay else None
    data = task.train_data(seed=cfg.seed, num_workers=tc.num_workers)
    meter, log = StepMeter(), MetricsLog(run_dir / "metrics.jsonl")
    step, bad_in_a_row, bad_steps = 0, 0, 0

    if checkpoint is not None:
        state = checkpoint.training_state()
        checkpoint.load_task_into(task)
        optimizer.load_state_dict(state["optimizer"])
        changed = config_differences(to_dict(checkpoint.config.train), to_dict(tc), "train")
        if changed:  # e.g. more steps: the schedule follows the new config from here on
            print(f"resuming with a changed train section: {'; '.join(changed)}", file=sys.stderr)
        else:
            scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        meter.load_state_dict(state["meter"])
        if ema is not None:
            checkpoint.load_ema_into(ema.module)
        step, bad_steps, bad_in_a_row = state["step"], state["bad_steps"], state["bad_in_a_row"]
        set_rng_state(state["rng"])
        log.truncate(after_step=step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.truncate(after_step=0)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    model_step = torch.compile(task) if tc.compile else task
    params = [p for p in task.parameters() if p.requires_grad]
    clip = tc.clip_grad if tc.clip_grad is not None else math.inf
    batches = iter(data)
    bar = _Progress(progress, step, tc.steps)
    interval_start = time.perf_counter()
    writer = _tensorboard(run_dir) if tc.tensorboard else None

    def training_state() -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "data": data.state_dict(),
                "meter": meter.state_dict(), "rng": rng_state(), "bad_steps": bad_steps,
                "bad_in_a_row": bad_in_a_row}

    def checkpoint_now() -> None:
        save_checkpoint(ckpt_dir, step, task=task, state=training_state(), cfg=cfg,
                        ema=None if ema is None else ema.module, keep=tc.keep_checkpoints)

    records = []
    task.train()
    try:
        while step < tc.steps:
            scheduler.step_update(step + 1)  # the lr of update step+1 (update 0 would have lr 0)
            optimizer.zero_grad(set_to_none=True)
            outputs, finite = [], True
            for _ in range(tc.grad_accum):
                batch = next(batches)
                batch = batch.to(device) if hasattr(batch, "to") else batch
                with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
                    out = model_step(batch)
                if not torch.isfinite(out.loss):
                    finite = False
                    continue
                (out.loss / tc.grad_accum).backward()
                outputs.append(out)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if finite else torch.tensor(math.nan)
            if finite and torch.isfinite(grad_norm):
                optimizer.step()
                if ema is not None:
                    ema.update(task.model, step=step)
                bad_in_a_row = 0
                for out in outputs:
                    meter.add_output(out, tc.grad_accum)
                meter.add_step(sum(float(out.loss.detach()) for out in outputs) / tc.grad_accum, float(grad_norm),
                               max(group["lr"] for group in optimizer.param_groups))
            else:
                bad_steps += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_in_a_row >= tc.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_a_row} consecutive steps (up to step {step + 1}) had a non-finite loss or gradient; "
                        f"stopping. The last good checkpoint is {ckpt_dir / 'latest'} (resume with --resume after "
                        f"lowering train.lr or raising train.warmup_steps)")
            step += 1
            record = None
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, **meter.summary(),
                          "samples_per_s": meter.samples / elapsed, "tokens_per_s": meter.tokens / elapsed,
                          "bad_steps": bad_steps, "skipped_samples": data.skipped()}
                log.write(record)
                records.append(record)
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k != "step":
                            writer.add_scalar(k, v, step)
                meter.reset()
                interval_start = time.perf_counter()
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint_now()
            bar.update(record)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return TrainResult(run_dir, step, records)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(run_dir / "tensorboard")

