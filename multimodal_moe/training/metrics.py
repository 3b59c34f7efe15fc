"""What goes into ``metrics.jsonl``: task parts averaged over the log interval, and MoE statistics
aggregated per layer and FFN branch.

A line looks like::

    {"step": 100, "loss": 5.1, "image_mim_loss": 4.9, ..., "lr": 0.00098, "grad_norm": 1.3,
     "samples_per_s": 610.2, "tokens_per_s": 21044.0, "bad_steps": 0,
     "skipped_samples": {"image_text": {"corrupt_image": 1}},
     "moe": {"layer2.vision": {"load": [0.27, 0.24, 0.26, 0.23], "max_load": 1.08,
                               "dropped_fraction": 0.02, "activation_ratio": 1.0, ...}}}

An interval whose every step was skipped (a non-finite loss or gradient) logs ``null`` for the
loss, gradient norm and lr. ``load`` is each expert's share of the routed assignments over the interval and ``max_load``
the busiest expert's share times E (1 = perfectly balanced). Other MoE statistics (dropped
fraction, activation ratio, router entropy, MoT mixing entropy, ...) are averages weighted by
the tokens each pass routed.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from data_pipelines.atomic import atomic_write

from ..tasks.base import TaskOutput

__all__ = ["MetricsLog", "StepMeter", "add_scalars", "merged_counts", "tensorboard"]


class StepMeter:
    """Sums of a log interval's values; ``summary()`` averages them. Values from the device are
    summed on the device and read in one transfer when a summary or a checkpoint needs them,
    so an ordinary step makes no host sync here. Its state is plain data, saved in checkpoints
    so an interval cut by a resume logs what it would have."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.steps = 0
        self.samples = 0
        self.tokens: int | float | torch.Tensor = 0
        self.moe_load: dict[str, list[float] | torch.Tensor] = {}
        self.moe_sums: dict[str, dict[str, float | torch.Tensor]] = defaultdict(lambda: defaultdict(float))
        self.moe_weight: dict[str, float | torch.Tensor] = defaultdict(float)

    def add_step(self, loss: float, grad_norm: float, lr: float) -> None:
        self.steps += 1
        self.sums["loss"] += loss
        self.sums["grad_norm"] += grad_norm
        self.sums["lr"] += lr

    def add_output(self, out: TaskOutput, micro_batches: int) -> None:
        """One micro-batch's output (its parts count 1/``micro_batches`` of a step)."""
        for name, value in out.parts.items():
            self.sums[name] = self.sums[name] + _detached(value) / micro_batches
        self.samples += out.samples
        self.tokens = self.tokens + _detached(out.tokens)
        for layers in out.moe_stats:
            for layer, branches in enumerate(layers):
                for branch, stats in branches.items():
                    self._add_moe(f"layer{layer}.{branch}", stats)

    def _add_moe(self, key: str, stats: dict[str, torch.Tensor]) -> None:
        weight = _detached(stats["routed_tokens"]) if "routed_tokens" in stats else 1.0
        self.moe_weight[key] = self.moe_weight[key] + weight
        for name, value in stats.items():
            if name == "tokens_per_expert":
                counts, old = _detached(value), self.moe_load.get(key)
                if isinstance(old, list):  # settled by a checkpoint within this interval: one copy back
                    old = counts.new_tensor(old)
                self.moe_load[key] = counts if old is None else old + counts
            elif name != "routed_tokens" and value.numel() == 1:
                self.moe_sums[key][name] = self.moe_sums[key][name] + _detached(value).reshape(()) * weight

    def _settle(self) -> None:
        """Every tensor summed so far replaced by its value (numbers; lists for expert loads),
        read from the device in one transfer."""
        slots = [(self.sums, k) for k in self.sums] + [(self.moe_weight, k) for k in self.moe_weight]
        slots += [(self.moe_load, k) for k in self.moe_load] + [(self, "tokens")]
        slots += [(sums, k) for sums in self.moe_sums.values() for k in sums]
        slots = [(owner, k) for owner, k in slots if isinstance(_get(owner, k), torch.Tensor)]
        if not slots:
            return
        tensors = [_get(owner, k) for owner, k in slots]
        values = torch.cat([t.reshape(-1) for t in tensors]).tolist()
        at = 0
        for (owner, k), t in zip(slots, tensors):
            n = t.numel()
            _set(owner, k, values[at:at + n] if owner is self.moe_load else values[at])
            at += n

    def summary(self) -> dict[str, Any]:
        self._settle()
        if not self.steps:  # every step of the interval was skipped: nothing to average
            return {"loss": None, "grad_norm": None, "lr": None}
        out: dict[str, Any] = {"loss": self.sums["loss"] / self.steps}
        out.update({k: v / self.steps for k, v in self.sums.items() if k != "loss"})
        moe = {}
        for key in sorted(self.moe_weight, key=_layer_order):
            entry: dict[str, Any] = {}
            if key in self.moe_load:
                counts = self.moe_load[key]
                total = sum(counts) or 1.0
                entry["load"] = [round(c / total, 5) for c in counts]
                entry["max_load"] = round(max(counts) / total * len(counts), 5)
            weight = self.moe_weight[key] or 1.0
            entry.update({name: v / weight for name, v in self.moe_sums[key].items()})
            moe[key] = entry
        if moe:
            out["moe"] = moe
        return out

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {"sums": dict(self.sums), "steps": self.steps, "samples": self.samples, "tokens": self.tokens,
                "moe_load": dict(self.moe_load), "moe_sums": {k: dict(v) for k, v in self.moe_sums.items()},
                "moe_weight": dict(self.moe_weight)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.sums.update(state["sums"])
        self.steps, self.samples, self.tokens = state["steps"], state["samples"], state["tokens"]
        self.moe_load = {k: list(v) for k, v in state["moe_load"].items()}
        for key, sums in state["moe_sums"].items():
            self.moe_sums[key].update(sums)
        self.moe_weight.update(state["moe_weight"])


def _detached(value):
    """A value to sum: a device tensor detached in float64 (sums in fp32 would lose the last
    digits, and token counts past 2^24 per interval), a number as it is."""
    return value.detach().double() if isinstance(value, torch.Tensor) else value


def _get(owner, key):
    return getattr(owner, key) if isinstance(owner, StepMeter) else owner[key]


def _set(owner, key, value) -> None:
    if isinstance(owner, StepMeter):
        setattr(owner, key, value)
    else:
        owner[key] = value


def _layer_order(key: str) -> tuple[int, str]:
    layer, _, branch = key.partition(".")
    return int(layer.removeprefix("layer")), branch


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class MetricsLog:
    """``metrics.jsonl``, one object per line, each appended by a single ``write``.

    On resume, :meth:`truncate` drops the lines of steps after the checkpoint (logged before
    the crash, and about to be logged again) and a torn last line; a line that is not JSON
    anywhere else stops it with the line's number (dropping what follows would lose data).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate(self, after_step: int) -> None:
        if not self.path.exists():
            return
        lines, kept = self.path.read_text().splitlines(), []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(lines):
                    break  # the last line, cut by the crash
                raise ValueError(f"{self.path} line {number} is not JSON ({e.msg}); repair or delete that line, "
                                 f"then resume") from None
            if record.get("step", 0) > after_step:
                break
            kept.append(line)
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))

    def clear(self) -> None:
        """An empty log, for a fresh run."""
        self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(_finite(record), allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)  # one append: a reader never sees half a line but at a crash
            while written < len(line):  # a short write (a full disk, a signal): the rest, or OSError
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)


def merged_counts(dicts: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Skip counts ``{stream: {reason: n}}`` of several ranks, summed."""
    out: dict[str, dict[str, int]] = {}
    for d in dicts:
        for stream, reasons in d.items():
            merged = out.setdefault(stream, {})
            for reason, n in reasons.items():
                merged[reason] = merged.get(reason, 0) + n
    return out


def tensorboard(run_dir: Path):
    """A TensorBoard writer into ``run_dir/tensorboard`` (``train.tensorboard``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(run_dir / "tensorboard")


def add_scalars(writer, record: dict[str, Any]) -> None:
    """Every number of a log line as a TensorBoard scalar at its step."""
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step":
            writer.add_scalar(key, value, record["step"])
