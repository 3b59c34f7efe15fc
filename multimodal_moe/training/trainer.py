"""The training loop: any task, one process or many (torchrun), resumable exactly.

    mmoe pretrain --config configs/pretrain/debug.yaml --run-dir runs/x [--resume]
    torchrun --nproc_per_node 2 -m multimodal_moe.cli pretrain ... [--set train.data_parallel=fsdp]

One step = ``grad_accum`` micro-batches -> (DDP / FSDP2 gradient sync on the last) -> clip ->
the optimizer (AdamW, Adam or Adafactor from timm's factory: no decay on biases, norms,
positions and CLS/mask tokens; optional layer-wise lr decay) at the schedule's lr for the
update (:mod:`.optim`) -> optional weight EMA. A step whose loss or gradient is not finite on
any rank is skipped by every rank and counted; ``max_bad_steps`` in a row stop the run with its
last good checkpoint intact. Every ``log_every`` steps rank 0 appends the ranks' mean values to
``metrics.jsonl`` (:mod:`.metrics`); every ``checkpoint_every`` steps and at the end a
checkpoint is written (:mod:`.checkpoint`, in whatever layout the parallelism has:
:meth:`~multimodal_moe.distributed.Parallel.full_state`). A resumed run restores weights,
optimizer, and each rank's RNG, data-reader position and current log interval, so it continues
exactly as the uninterrupted run would have (bitwise on CPU with the same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3

from ..config import Config, dump_config
from ..configurable import to_dict
from ..distributed import init_distributed, parallelize
from ..layers.moe import discard_expert_loads, update_expert_biases
from ..runtime import autocast_dtype, keep_freed_memory, rng_state, set_rng_state, sigterm_flag
from ..tasks import build_task
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    config_differences,
    latest_target,
    load_weights,
    step_dir_name,
    task_states,
)
from .metrics import MetricsLog, StepMeter, add_scalars, merged_counts, tensorboard
from .optim import LRSchedule, build_optimizer
from .run_lock import RunDirLocked, RunLock

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "TrainingStopped", "build_task", "train"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainingStopped(RuntimeError):
    """SIGTERM (a scheduler's preemption) arrived: the run stopped after the step it was in and
    wrote a checkpoint of that step to resume from (inside a bad streak: named the last good one)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint}; continue with --resume"
                         if checkpoint is not None else f"stopped by SIGTERM after step {step}, inside a streak of "
                         f"non-finite steps before any checkpoint: none written; start the run again")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepInfo:
    """One optimizer step on this rank: its mean micro-batch loss, the global grad norm, and
    whether the update was applied."""

    loss: float
    grad_norm: float
    applied: bool


class Trainer:
    """A task, its optimizer, schedule, data and run directory, ready to step.

    Args:
        cfg: the resolved run config.
        run_dir: where ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/`` go.
        resume: continue from ``run_dir/checkpoints/latest`` (True or "latest"), or from the
            newest checkpoint whose files are intact ("latest-intact"); its model and task config must
            match ``cfg``'s, saved at the same world size); without it, a run dir that already
            has checkpoints is refused.
        progress: show a progress bar (rank 0).
        init: a checkpoint to start from (fine-tuning, continued pretraining): the run takes its
            architecture, with ``cfg.model``'s fine-tuning fields (:attr:`ModelConfig.FINETUNE_FIELDS`:
            drop path, checkpointing, attention backend; an encoder's image size, its vision
            position table resized to it), and its backbone weights (its heads too
            when they are this task's); a resumed run takes the architecture alone.

    Raises:
        CheckpointError: ``resume`` without a readable checkpoint, or one that does not fit.
        FileExistsError: a fresh run into a run dir that has checkpoints.
        RunDirLocked: another live process is training into ``run_dir``.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool | str = False, progress: bool = True,
                 init: str | Path | None = None):
        tc = self.tc = cfg.train
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.task is not None:
            cfg.task.check_data()
        self.env = env = init_distributed(tc.device)
        self.lock = self._lock_run_dir()
        try:
            self._set_up(cfg, resume, init)
        except BaseException:  # not held on by a traceback kept alive (a notebook's, say)
            self.close()
            raise

    def _set_up(self, cfg: Config, resume: bool | str, init: str | Path | None) -> None:
        tc, env = self.tc, self.env
        start = None if init is None else Checkpoint.open(init)
        if start is not None:  # the run takes its architecture; drop path and the like stay cfg's
            adopted = start.finetune_config(cfg)
            ignored = [d.split()[0] for d in config_differences(to_dict(adopted.model), to_dict(cfg.model), "model")]
            if ignored and env.is_main:
                print(f"--init: the model is {start.path}'s; the config's {', '.join(ignored)} do not apply",
                      file=sys.stderr)
            cfg = adopted
        checkpoint = None
        if resume:
            checkpoint = Checkpoint.latest_intact(self.ckpt_dir) if resume == "latest-intact" else \
                Checkpoint.open(self.ckpt_dir)
            checkpoint.verify()
            if resume == "latest-intact":
                env.barrier()  # every rank has chosen before rank 0 renames what it passed over
                if env.is_main and (aside := checkpoint.set_aside_newer()):
                    print(f"set aside as corrupt-*: {', '.join(aside)}; continuing from {checkpoint.path.name}",
                          file=sys.stderr)
        if not resume and any(self.ckpt_dir.glob("step_*")):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                                  f"or choose a new --run-dir")

        if env.device.type == "cpu":
            keep_freed_memory()
        self.amp_dtype = autocast_dtype(tc.precision, env.device)
        if env.device.type == "cuda" and self.amp_dtype is None:  # under autocast TF32 would only reach
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32  # the fp32 parts
        self.task = task = build_task(cfg)
        # what the task settled at build time (a VQA answer list) goes into the checkpoints
        self.cfg = cfg = dataclasses.replace(cfg, task=task.resolved_config())
        if checkpoint is not None:
            checkpoint.check_compatible(cfg, sections=("model", "task", "seed"))
        if start is not None and checkpoint is None:
            self._load_init(start)
        task.to(env.device)
        torch.manual_seed(cfg.seed + env.rank)
        self.parallel = parallelize(task, env, data_parallel=tc.data_parallel, expert_parallel=tc.expert_parallel,
                                    find_unused_parameters=not task.uses_every_parameter())
        self.optimizer = build_optimizer(task, tc)
        self.lr_schedule = LRSchedule(self.optimizer, tc)
        self.ema = ModelEmaV3(task.model, decay=tc.ema_decay) if tc.ema_decay else None
        self.data = task.train_data(seed=cfg.seed, num_workers=tc.num_workers, pin_memory=env.device.type == "cuda")
        self.meter, self.log = StepMeter(), MetricsLog(self.run_dir / "metrics.jsonl")
        self.step = self.bad_steps = self.bad_in_a_row = 0
        self.sigterm: list[int] = []  # filled by SIGTERM while fit runs
        self.stop_requested = False  # SIGTERM reached some rank by the end of the last step
        if checkpoint is not None:
            self._restore(checkpoint)
        elif env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log.clear()
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if tc.compile:  # the backbone, in place (parameter names unchanged); heads and losses stay eager
            task.model.compile()
        self.call = self.parallel.module
        self.clip = tc.clip_grad if tc.clip_grad is not None else math.inf

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run dir; every rank raises if it could not (:mod:`.run_lock`)."""
        lock, refused = None, None
        if self.env.is_main:
            try:
                lock = RunLock(self.run_dir)
            except RunDirLocked as e:
                refused = str(e)
        refused = next((r for r in self.env.gather(refused) if r), None)
        if refused:
            raise RunDirLocked(refused)
        return lock

    def close(self) -> None:
        """Release the run dir (also done when the process ends)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, micro_batches: list) -> StepInfo:
        """One optimizer update from ``micro_batches`` (this rank's share of the global batch).

        On a GPU it makes one host sync (reading the update's finite flag, loss and gradient
        norm together): batches are copied asynchronously from page-locked memory, and what is
        logged stays on the device until a logging step reads it."""
        self.task.train()
        self.lr_schedule.step_update(self.step + 1)  # the lr of update step+1 (update 0 would have lr 0)
        self.optimizer.zero_grad(set_to_none=True)
        device, cuda = self.env.device, self.env.device.type == "cuda"
        outputs = []
        finite = torch.ones((), dtype=torch.bool, device=device)
        loss_sum = torch.zeros((), device=device)
        micro_batches = self.task.prepare_step(micro_batches)
        for i, batch in enumerate(micro_batches):
            if hasattr(batch, "to"):
                batch = (batch.pin_memory() if cuda else batch).to(device, non_blocking=cuda)
            last = i == len(micro_batches) - 1
            amp = torch.autocast(self.env.device.type, dtype=self.amp_dtype) if self.amp_dtype \
                else contextlib.nullcontext()
            with self.parallel.sync(last), amp:
                out = self.call(batch)
            with self.parallel.sync(last):
                # every rank runs every backward (collectives must match); a bad step is dropped below
                (out.loss / len(micro_batches)).backward()
            finite &= torch.isfinite(out.loss.detach())
            loss_sum += out.loss.detach().float()
            outputs.append(out)
        self.parallel.finish_grads()
        grad_norm = self.parallel.clip_grad_norm(self.clip)
        # one all-reduce: every rank's step finite, and whether any rank got SIGTERM (see fit)
        flags = torch.stack([finite.float(), torch.full((), float(bool(self.sigterm)), device=device)])
        flags = self.env.mean_tensor(flags)
        all_finite, any_stop, loss, grad_norm_value = torch.cat(
            [flags, torch.stack([loss_sum / len(outputs), grad_norm.float()])]).tolist()  # the step's host sync
        finite = all_finite == 1.0 and math.isfinite(grad_norm_value)
        self.stop_requested = any_stop > 0
        if finite:
            self.optimizer.step()
            update_expert_biases(self.task, self.env.mean_tensor)  # loss-free balancing, from this update's loads
            if self.ema is not None:
                self.ema.update(self.task.model, step=self.step)
            self.bad_in_a_row = 0
            for out in outputs:
                self.meter.add_output(out, len(outputs))
            self.meter.add_step(loss, grad_norm_value,
                                max(g["lr"] / g.get("lr_scale", 1.0) for g in self.optimizer.param_groups))
        else:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            discard_expert_loads(self.task)
        self.step += 1
        return StepInfo(loss, grad_norm_value, finite)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``train.steps``; raises :class:`TrainingDiverged` after ``max_bad_steps``
        consecutive bad steps, and :class:`TrainingStopped` after checkpointing the current step
        when SIGTERM arrives (on any rank: all stop at the same step)."""
        tc, records = self.tc, []
        batches = iter(self.data)
        bar = None
        if self.progress and self.env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        writer = tensorboard(self.run_dir) if tc.tensorboard and self.env.is_main else None
        interval_start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            self.sigterm = stack.enter_context(sigterm_flag())
            for closable in (bar, writer):
                if closable is not None:
                    stack.callback(closable.close)
            while self.step < tc.steps:
                self.train_step([next(batches) for _ in range(tc.grad_accum)])
                if self.bad_in_a_row >= tc.max_bad_steps:
                    raise TrainingDiverged(
                        f"{self.bad_in_a_row} consecutive steps (up to step {self.step}) had a non-finite loss or "
                        f"gradient; stopping. The last good checkpoint is {self.ckpt_dir / 'latest'} (resume with "
                        f"--resume after lowering train.lr or raising train.warmup_steps)")
                record = None
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    record = self._record(time.perf_counter() - interval_start)
                    if self.env.is_main:
                        self.log.write(record)
                        if writer is not None:
                            add_scalars(writer, record)
                    records.append(record)
                    self.meter.reset()
                    interval_start = time.perf_counter()
                # inside a bad streak the weights may be what made it: the last good checkpoint stays newest
                saved = (self.step % tc.checkpoint_every == 0 or self.step == tc.steps) and not self.bad_in_a_row
                if saved:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    if record is not None and record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
                if self.stop_requested and self.step < tc.steps:
                    raise TrainingStopped(self.step, self._stop_checkpoint(saved))
        if self.bad_in_a_row and self.env.is_main:
            print(f"mmoe: the last {self.bad_in_a_row} steps had a non-finite loss or gradient, so no checkpoint "
                  f"was written after them; the newest is {latest_target(self.ckpt_dir)}", file=sys.stderr)
        return TrainResult(self.run_dir, self.step, records)

    def _stop_checkpoint(self, saved: bool) -> Path | None:
        """The checkpoint a SIGTERM-stopped run resumes from: this step's, unless the step is in a
        bad streak (then the last good one, if any)."""
        if saved:
            return self.ckpt_dir / step_dir_name(self.step)
        return latest_target(self.ckpt_dir) if self.bad_in_a_row else self.save()

    def _record(self, elapsed: float) -> dict[str, Any]:
        """This log interval's line: the mean over ranks of every number, summed throughput."""
        summary = {**self.meter.summary(), "samples_per_s": self.meter.samples / elapsed,
                   "tokens_per_s": self.meter.tokens / elapsed}
        summary = self.env.mean_tree(summary)
        summary["samples_per_s"] *= self.env.world
        summary["tokens_per_s"] *= self.env.world
        skipped = merged_counts(self.env.gather(self.data.skipped()))
        return {"step": self.step, **summary, "bad_steps": self.bad_steps, "skipped_samples": skipped}

    # -- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint of the current step (every rank calls it)."""
        env, parallel = self.env, self.parallel
        writer = CheckpointWriter(self.ckpt_dir, self.step, is_main=env.is_main, barrier=env.barrier,
                                  keep=self.tc.keep_checkpoints)
        per_rank = env.gather({"data": self.data.state_dict(), "rng": rng_state(env.device),
                               "meter": self.meter.state_dict()})
        full, optimizer_state = parallel.full_state(self.optimizer, writer.tmp / "sharded")
        if env.is_main:
            model, heads = task_states(self.task, full)
            state = {"optimizer": optimizer_state, "per_rank": per_rank,
                     "world": env.world, "bad_steps": self.bad_steps}
            writer.write(model=model, heads=heads, state=state, cfg=self.cfg,
                         ema=None if self.ema is None else self.ema.module.state_dict())
        return writer.commit(self.tc.keep_checkpoints)

    def _load_init(self, start: Checkpoint) -> None:
        """A new run's weights from ``start``: its backbone, and its heads too when they are this
        task's (the same kind, names and shapes, and the same meaning, such as a VQA head's answer
        list: continued pretraining, a converted model)."""
        same = start.heads_fit(self.task)
        if same:
            start.load_task_weights(self.task, resize_positions=True)
        else:
            start.load_model_into(self.task.model, resize_positions=True)
        if self.env.is_main:
            print(f"--init: {'backbone and heads' if same else 'backbone'} from {start.path}", file=sys.stderr)
            trained, now = start.config.model, self.cfg.model
            if getattr(trained, "image_size", None) != getattr(now, "image_size", None):
                print(f"--init: training at {now.image_size} px what {start.path} trained at {trained.image_size} "
                      f"px: its vision position table resized from {trained.image_size // trained.patch_size}^2 to "
                      f"{now.image_size // now.patch_size}^2 patches", file=sys.stderr)

    def _restore(self, checkpoint: Checkpoint) -> None:
        env, parallel = self.env, self.parallel
        state = checkpoint.training_state()
        if "conversion" in state:
            raise CheckpointError(f"{checkpoint.path} was written by a conversion ({state['conversion']}) and holds "
                                  f"no training state to resume; start a new run from it with --init")
        if state["world"] != env.world:
            raise CheckpointError(f"{checkpoint.path} was saved by {state['world']} process(es), this run has "
                                  f"{env.world}; data-reader positions are per rank, so resume at the same world size")
        def full() -> dict:
            return {**{f"model.{k}": v for k, v in checkpoint.weights().items()},
                    **checkpoint.weights("heads.safetensors")}

        parallel.load_state(self.optimizer, sharded_dir=checkpoint.sharded, full=full,
                            optimizer_state=state["optimizer"],
                            load=lambda weights: load_weights(self.task, weights, str(checkpoint.path)))
        if self.ema is not None:
            load_weights(self.ema.module, checkpoint.weights("ema.safetensors"), str(checkpoint.path))
        changed = config_differences(to_dict(checkpoint.config.train), to_dict(self.tc), "train")
        if changed and env.is_main:  # e.g. more steps: the schedule follows the new config from here on
            print(f"resuming with a changed train section: {'; '.join(changed)}", file=sys.stderr)
        mine = state["per_rank"][env.rank]
        self.data.load_state_dict(mine["data"])
        self.meter.load_state_dict(mine["meter"])
        set_rng_state(mine["rng"], env.device)
        # the streak is not restored: a resume (after lowering train.lr, say) gets max_bad_steps anew
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        if env.is_main:
            self.log.truncate(after_step=self.step)


def train(cfg: Config, run_dir: str | Path, *, resume: bool | str = False, progress: bool = True,
          init: str | Path | None = None) -> TrainResult:
    """Train ``cfg.task`` (or the model's default task) for ``cfg.train.steps`` steps; see
    :class:`Trainer` for the arguments and errors."""
    with Trainer(cfg, run_dir, resume=resume, progress=progress, init=init) as trainer:
        return trainer.fit()
