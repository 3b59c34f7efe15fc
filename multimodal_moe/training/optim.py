"""Optimizers and learning-rate schedules, by name (``train.optimizer``, ``train.schedule``).

Optimizers come from timm's factory, which leaves biases, norms, positions and CLS/mask
tokens undecayed and applies layer-wise lr decay through each group's ``lr_scale``:

- ``adamw``: decoupled weight decay (Loshchilov & Hutter). fairseq's ``--optimizer adam``,
  which the MH-MoE and X-MoE papers call Adam, is this one: its weight decay is decoupled too.
- ``adam``: torch's Adam, whose ``weight_decay`` is an L2 term added to the gradient.
- ``adafactor``: factored second moments, no first moment, update clipping at RMS 1 and
  updates scaled by each parameter's RMS (T5X's defaults, which OpenMoE trains with); ``betas``
  and ``eps`` do not apply.

A schedule is a pure function of the update number t = 1, 2, ... (so a resumed run needs no
schedule state): a linear warmup from 0 over ``warmup_steps`` updates, ``constant_steps`` at
the peak, then the decay, up to ``steps``. With W = warmup + constant steps:

- ``cosine``: min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (t - W) / (steps - W)));
- ``linear``: min_lr + (lr - min_lr) * (1 - (t - W) / (steps - W)) (fairseq's
  ``polynomial_decay`` at power 1);
- ``inverse_sqrt``: lr * sqrt(W / t) (fairseq's ``inverse_sqrt`` after a warmup; with no
  warmup and W constant steps, T5's 1 / sqrt(max(t, W)) at lr = 1 / sqrt(W));
- ``constant_with_warmup``: lr.

``min_lr`` is the end of ``cosine`` and ``linear``; the other two do not use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.optim import create_optimizer_v2

__all__ = ["LRSchedule", "OPTIMIZERS", "SCHEDULES", "build_optimizer"]

OPTIMIZERS = ("adamw", "adam", "adafactor")


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """``tc.optimizer`` over ``model``'s parameters (``tc``: a :class:`~multimodal_moe.config.TrainConfig`),
    with a task's ``lr_scales`` (a fine-tuning head's higher rate) in parameter groups of their own."""
    if tc.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    moments = {} if tc.optimizer == "adafactor" else {"betas": tuple(tc.betas), "eps": tc.eps}
    optimizer = create_optimizer_v2(model, opt=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay,
                                    layer_decay=tc.layer_decay, **moments)
    return _scale_lrs(optimizer, model)


def _scale_lrs(optimizer: torch.optim.Optimizer, task: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer with the task's ``lr_scales`` applied: each group split into the scaled
    parameters (``lr_scale`` multiplied, which the lr schedule applies) and the rest."""
    scales = task.lr_scales() if hasattr(task, "lr_scales") else {}
    if not scales:
        return optimizer
    by_id = {id(p): scales[n] for n, p in task.named_parameters() if n in scales}
    groups = []
    for group in optimizer.param_groups:
        split: dict[float, list] = {}
        for p in group["params"]:
            split.setdefault(by_id.get(id(p), 1.0), []).append(p)
        for scale, params in split.items():
            groups.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * scale})
    optimizer.param_groups.clear()  # before any step: there is no state to carry over
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * (1 - progress)


# name -> the decay's factor of the peak lr, given (t, W, steps, min_lr / lr)
SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "cosine": lambda t, start, steps, min_ratio: _cosine((t - start) / (steps - start), min_ratio),
    "linear": lambda t, start, steps, min_ratio: _linear((t - start) / (steps - start), min_ratio),
    "inverse_sqrt": lambda t, start, steps, min_ratio: math.sqrt(start / t),
    "constant_with_warmup": lambda t, start, steps, min_ratio: 1.0,
}


class LRSchedule:
    """Sets each parameter group's lr for update ``t``: peak lr x the schedule's factor x the
    group's ``lr_scale`` (layer-wise decay, a task's scaled parameters)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tc):
        if tc.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {tc.schedule!r}; valid: {', '.join(SCHEDULES)}")
        self.optimizer, self.tc = optimizer, tc
        self.step_update(0)

    def factor(self, t: int) -> float:
        """The multiple of the peak lr that update ``t`` (1-based; 0 is before the first) uses."""
        tc = self.tc
        if t < tc.warmup_steps:
            return t / tc.warmup_steps
        start = tc.warmup_steps + tc.constant_steps
        if t <= start:
            return 1.0
        return SCHEDULES[tc.schedule](min(t, tc.steps), start, tc.steps, tc.min_lr / tc.lr)

    def step_update(self, t: int) -> None:
        lr = self.tc.lr * self.factor(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
