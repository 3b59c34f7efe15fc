"""The seed papers' claims, measured here at debug size: dense vs X-MoE vs MH-MoE vs Mixture of
Tokens at equal expert FLOPs, for language modeling and for masked data modeling; prints JSON.

    python benchmarks/fidelity.py [--families lm beit3] [--methods dense xmoe mhmoe mot]
                                  [--seeds 0 1] [--steps N] [--out fidelity]

For every family, method and seed, in this process and one after another: ``mmoe pretrain`` of
the family's debug preset (``<family>/debug`` for dense, ``<family>/<method>_debug`` else; every
MoE one does the dense FFN's expert multiply-adds per token with 8 experts, as
``tests/test_preset_fidelity.py`` checks) with ``seed`` set, then ``mmoe evaluate`` of its last
checkpoint: held-out perplexity (LM) or masked data modeling loss (BEiT-3) and the expert
activation ratio over the held-out data. Each family's runs are then put side by side by ``mmoe
compare`` (``OUT/<family>/compare/``: ``compare.json`` and the loss and MoE-statistic plots).

The JSON holds, per family and method, the preset, its expert multiply-adds per token, each
seed's numbers and their mean and standard deviation over seeds; and ``claims``, per family, the
two numbers MH-MoE (arXiv 2404.15045) reports against X-MoE: the held-out expert activation
(MH-MoE above X-MoE) and the held-out loss (MH-MoE below X-MoE), each as MH-MoE's mean, X-MoE's
mean and the difference. With two seeds the spread says how much of a difference is noise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import multimodal_moe as mm
from eval_tasks.evaluate import evaluate_checkpoint
from multimodal_moe.bench import expert_macs_per_token
from multimodal_moe.compare import compare_runs, format_table
from multimodal_moe.runtime import keep_freed_memory
from multimodal_moe.training import Checkpoint, train

FAMILIES = ("lm", "beit3")
METHODS = ("dense", "xmoe", "mhmoe", "mot")
NUMBERS = ("heldout_loss", "perplexity", "heldout_activation", "train_loss", "seconds")


def preset(family: str, method: str) -> str:
    return f"{family}/debug" if method == "dense" else f"{family}/{method}_debug"


def expert_macs(cfg: mm.Config) -> float:
    """Expert multiply-adds per token of the preset's sparse FFN (of its dense FFN without one)."""
    ffn = getattr(cfg.model, "moe_ffn", None) or cfg.model.ffn
    return expert_macs_per_token(ffn, cfg.model.dim)


def run_one(family: str, method: str, seed: int, steps: int | None, out: Path) -> tuple[Path, dict]:
    """Train and evaluate one run; its folder and the numbers it adds to the compare table."""
    overrides = [f"seed={seed}", "train.num_workers=0"] + ([f"train.steps={steps}"] if steps else [])
    cfg = mm.load_config(preset(family, method), overrides)
    run_dir = out / family / f"{method}-seed{seed}"
    start = time.perf_counter()
    train(cfg, run_dir, progress=False)
    checkpoint = Checkpoint.open(run_dir)
    evaluate_checkpoint(checkpoint, checkpoint.config, run_dir)
    return run_dir, {"seconds": time.perf_counter() - start}


def spread(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def claims(methods: dict[str, dict]) -> dict[str, dict]:
    """MH-MoE's two claims against X-MoE, from the per-method means."""
    if "xmoe" not in methods or "mhmoe" not in methods:
        return {}
    found = {}
    for number, direction in (("heldout_activation", "higher"), ("heldout_loss", "lower")):
        ours, theirs = methods["mhmoe"][number]["mean"], methods["xmoe"][number]["mean"]
        found[number] = {"mhmoe": ours, "xmoe": theirs, "mhmoe_minus_xmoe": None if None in (ours, theirs)
                         else ours - theirs, "paper": f"MH-MoE {direction}"}
    return found


def bench_family(family: str, methods: list[str], seeds: list[int], steps: int | None, out: Path) -> dict:
    runs, extra, labels = [], {}, []
    for method in methods:
        for seed in seeds:
            print(f"fidelity: {preset(family, method)} seed {seed}", file=sys.stderr)
            run_dir, numbers = run_one(family, method, seed, steps, out)
            runs.append(run_dir)
            labels.append(run_dir.name)
            extra[run_dir.name] = numbers
    summary = compare_runs(runs, out / family / "compare", labels=labels)
    print(format_table(summary), file=sys.stderr)
    rows = {row["label"]: {**row, **extra[row["label"]]} for row in summary["runs"]}
    result = {}
    for method in methods:
        cfg = mm.load_config(preset(family, method))
        mine = [rows[f"{method}-seed{seed}"] for seed in seeds]
        result[method] = {"preset": preset(family, method), "expert_macs_per_token": expert_macs(cfg),
                          "steps": mine[0]["steps"],
                          "runs": [{"seed": seed, **{n: row[n] for n in NUMBERS}} for seed, row in zip(seeds, mine)],
                          **{n: spread([row[n] for row in mine]) for n in NUMBERS}}
    return {"methods": result, "claims": claims(result), "compare": summary["plots"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="optimizer updates per run (default: the preset's)")
    p.add_argument("--out", default="fidelity", help="folder of the runs and compare plots")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    out = Path(args.out)
    result = {"threads": args.threads, "seeds": args.seeds,
              "families": {family: bench_family(family, args.methods, args.seeds, args.steps, out)
                           for family in args.families}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
