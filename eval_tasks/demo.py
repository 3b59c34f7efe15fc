"""``mmoe demo``: the whole pipeline on the bundled data, on a laptop CPU.

1. pretrain the default preset (``configs/pretrain/debug.yaml``: BEiT-3 masked data modeling of
   a debug-size Multiway encoder with an X-MoE layer);
2. fine-tune each of BEiT-3's five downstream tasks (:data:`TASKS`: VQA, NLVR2, retrieval,
   captioning, classification; their ``configs/finetune/*_debug.yaml`` presets) from that
   checkpoint, and again from random weights (``--no-random-init`` skips these);
3. evaluate each on its held-out split and print one table: each task's headline metric
   (``TaskConfig.headline``) from the pretrained and the random start, beside its baselines.

Everything lands in one run directory: ``pretrain/``, ``<task>/`` and ``<task>_random_init/`` (each
a run dir with its checkpoints, metrics and ``results.json``) and ``demo.json`` with the table's
numbers and the seconds each stage took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from multimodal_moe import load_config
from multimodal_moe.training import Checkpoint, train

from .evaluate import evaluate_checkpoint

__all__ = ["TASKS", "run_demo", "table"]

PRETRAIN = "pretrain/debug"
TASKS = {"vqa": "finetune/vqa_debug", "nlvr2": "finetune/nlvr2_debug", "retrieval": "finetune/retrieval_debug",
         "captioning": "finetune/captioning_debug", "classification": "finetune/classification_debug"}
RANDOM_INIT = "_random_init"  # the suffix of a task's run from random weights


def _schedule(steps: int) -> list[str]:
    """Overrides for a run of ``steps`` steps: warmup a tenth of them (at most 20), one checkpoint."""
    return [f"train.steps={steps}", f"train.warmup_steps={min(20, steps // 10)}", f"train.checkpoint_every={steps}",
            f"train.log_every={min(10, steps)}"]


def _finetune(preset: str, init: Path | None, run_dir: Path, steps: int, progress: bool, extra: list[str]) -> dict:
    train(load_config(preset, [*_schedule(steps), *extra]), run_dir, progress=progress, init=init)
    trained = Checkpoint.open(run_dir)
    return evaluate_checkpoint(trained, trained.config, run_dir, progress=progress)


def run_demo(run_dir: str | Path, *, pretrain_steps: int = 2000, finetune_steps: int = 1000,
             tasks: Sequence[str] = tuple(TASKS), random_init: bool = True, progress: bool = True,
             num_workers: int = 2) -> dict:
    """Pretrain, fine-tune each of ``tasks`` from the pretrained weights (and, with
    ``random_init``, from random ones), evaluate; returns (and writes to ``demo.json``) the
    results, the table's rows and the seconds each stage took."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown demo tasks {unknown or list(tasks)}; choose among {', '.join(TASKS)}")
    if len(set(tasks)) < len(tasks):
        raise ValueError(f"demo tasks named twice: {sorted({t for t in tasks if list(tasks).count(t) > 1})}")
    run_dir = Path(run_dir)
    workers = [f"train.num_workers={num_workers}"]
    seconds = {}
    start = time.perf_counter()
    cfg = load_config(PRETRAIN, [*_schedule(pretrain_steps), *workers])
    pretrain = train(cfg, run_dir / "pretrain", progress=progress)
    seconds["pretrain"] = time.perf_counter() - start
    out: dict = {"pretrain_loss": [pretrain.records[0]["loss"], pretrain.records[-1]["loss"]],
                 "finetune_steps": finetune_steps, "rows": []}
    for name in tasks:
        starts = {name: run_dir / "pretrain"} | ({name + RANDOM_INIT: None} if random_init else {})
        for run, init in starts.items():
            start = time.perf_counter()
            out[run] = _finetune(TASKS[name], init, run_dir / run, finetune_steps, progress, workers)
            seconds[run] = time.perf_counter() - start
        headline = load_config(TASKS[name]).task.headline
        metric, value, baselines = headline(out[name])
        random_value = headline(out[name + RANDOM_INIT])[1] if random_init else None
        out["rows"].append({"task": name, "metric": metric, "pretrained": value, "random_init": random_value,
                            "baselines": baselines})
    out["seconds"] = seconds
    (run_dir / "demo.json").write_text(json.dumps(out, indent=1))
    return out


def table(results: dict) -> str:
    """The demo's headline metrics next to their baselines, as a Markdown table."""
    lines = ["| metric | pretrained | random init | baselines |", "|---|---|---|---|"]
    for row in results["rows"]:
        random_init = "" if row["random_init"] is None else f"{row['random_init']:.1f}"
        baselines = ", ".join(f"{name} {value:.1f}" for name, value in row["baselines"].items())
        lines.append(f"| {row['metric']} | {row['pretrained']:.1f} | {random_init} | {baselines} |")
    loss = results["pretrain_loss"]
    lines.append(f"\n(pretraining loss {loss[0]:.2f} -> {loss[1]:.2f}; {results['finetune_steps']} fine-tuning steps "
                 "per run; minutes: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in results["seconds"].items()) + ")")
    return "\n".join(lines)
