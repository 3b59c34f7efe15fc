"""``mmoe demo``: the whole pipeline on the bundled data, on a laptop CPU.

1. pretrain the default preset (``configs/pretrain/debug.yaml``: BEiT-3 masked data modeling of
   a debug-size Multiway encoder with an X-MoE layer);
2. fine-tune VQA (``configs/finetune/vqa_debug.yaml``) and image-text retrieval
   (``configs/finetune/retrieval_debug.yaml``) from that checkpoint;
3. evaluate both on the held-out splits and print them next to their baselines (majority
   answer and chance for VQA, a random ranking for retrieval).

Everything lands in one run directory: ``pretrain/``, ``vqa/``, ``retrieval/`` (each a run dir
with its checkpoints, metrics and ``results.json``) and ``demo.json`` with the table's numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from multimodal_moe import load_config
from multimodal_moe.training import Checkpoint, train

from .evaluate import evaluate_checkpoint

__all__ = ["run_demo"]

PRETRAIN, VQA, RETRIEVAL = "pretrain/debug", "finetune/vqa_debug", "finetune/retrieval_debug"


def _schedule(steps: int) -> list[str]:
    """Overrides for a run of ``steps`` steps: warmup a tenth of them (at most 20), one checkpoint."""
    return [f"train.steps={steps}", f"train.warmup_steps={min(20, steps // 10)}", f"train.checkpoint_every={steps}",
            f"train.log_every={min(10, steps)}"]


def _finetune(preset: str, init: Path, run_dir: Path, steps: int, progress: bool, extra: list[str]) -> dict:
    train(load_config(preset, [*_schedule(steps), *extra]), run_dir, progress=progress, init=init)
    trained = Checkpoint.open(run_dir)
    return evaluate_checkpoint(trained, trained.config, run_dir, progress=progress)


def run_demo(run_dir: str | Path, *, pretrain_steps: int = 2000, finetune_steps: int = 1500, progress: bool = True,
             num_workers: int = 2) -> dict:
    """Pretrain, fine-tune VQA and retrieval, evaluate; returns (and writes to ``demo.json``)
    the results with their baselines and the seconds each stage took."""
    run_dir = Path(run_dir)
    workers = [f"train.num_workers={num_workers}"]
    seconds = {}
    start = time.perf_counter()
    cfg = load_config(PRETRAIN, [*_schedule(pretrain_steps), *workers])
    pretrain = train(cfg, run_dir / "pretrain", progress=progress)
    seconds["pretrain"] = time.perf_counter() - start
    init = run_dir / "pretrain"
    out = {"pretrain_loss": [pretrain.records[0]["loss"], pretrain.records[-1]["loss"]]}
    for name, preset in (("vqa", VQA), ("retrieval", RETRIEVAL)):
        start = time.perf_counter()
        out[name] = _finetune(preset, init, run_dir / name, finetune_steps, progress, workers)
        seconds[name] = time.perf_counter() - start
    out["seconds"] = seconds
    (run_dir / "demo.json").write_text(json.dumps(out, indent=1))
    return out


def table(results: dict) -> str:
    """The demo's results next to their baselines, as text."""
    vqa, ret = results["vqa"], results["retrieval"]
    chance = ret["baselines"]["chance"]
    rows = [("VQA accuracy", vqa["vqa_accuracy"], vqa["baselines"]["majority_vqa_accuracy"],
             vqa["baselines"]["chance_vqa_accuracy"])]
    rows += [(f"retrieval {k}", ret[k], None, chance[k]) for k in ("i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10", "r_mean")]
    lines = [f"{'metric':<22}{'model':>8}{'majority':>10}{'chance':>8}"]
    for name, model, majority, rand in rows:
        lines.append(f"{name:<22}{model:>8.1f}{'' if majority is None else f'{majority:.1f}':>10}{rand:>8.1f}")
    loss = results["pretrain_loss"]
    lines.append(f"(pretraining loss {loss[0]:.2f} -> {loss[1]:.2f}; minutes: "
                 + ", ".join(f"{k} {v / 60:.1f}" for k, v in results["seconds"].items()) + ")")
    return "\n".join(lines)
