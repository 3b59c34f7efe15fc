"""The seed papers' claims, measured here at debug size: dense vs X-MoE vs MH-MoE vs Mixture of
Tokens at equal expert FLOPs, for language modeling and for masked data modeling; prints JSON.

    python benchmarks/fidelity.py [--families lm beit3]
                                  [--methods dense xmoe mhmoe mot xmoe_32e mhmoe_32e deepseekmoe ec lossfree
                                             lossfree_aux]
                                  [--seeds 0 1] [--steps N] [--out fidelity]

For every family, method and seed, in this process and one after another: ``mmoe pretrain`` of
the family's debug preset (``<family>/debug`` for dense, ``<family>/<method>_debug`` else; every
MoE one does the dense FFN's expert multiply-adds per token (with 8 experts, or 64 of an eighth of
the width), as
``tests/test_preset_fidelity.py`` checks; ``xmoe_32e`` and ``mhmoe_32e`` are those presets with
32 of the same experts, the papers' other setting; ``deepseekmoe``, ``ec`` and ``lossfree`` are
DeepSeekMoE's fine-grained and shared experts, expert-choice routing (BEiT-3 only: a causal LM
refuses it) and auxiliary-loss-free balancing with DeepSeek-V3's sigmoid router, ``lossfree_aux``
the same layer balanced by the balance loss (0.01) instead of the bias) with ``seed`` set, then ``mmoe evaluate`` of
its last checkpoint: held-out perplexity (LM) or masked data modeling loss (BEiT-3) and the expert
activation ratio over the held-out data. Each family's runs are then put side by side by ``mmoe
compare`` (``OUT/<family>/compare/``: ``compare.json`` and the loss and MoE-statistic plots). A
run evaluated before under the same config (``OUT/<family>/<method>-seed<S>/fidelity.json``) is
read back, and one interrupted mid-way resumes from its last checkpoint, so methods can be added
to an earlier invocation's folder at the cost of the new runs alone.

The JSON holds, per family and method, the preset, its expert multiply-adds per token, each
seed's numbers (with the training-time max load and dropped fraction of the last log interval,
for top-k routers) and their mean and standard deviation over seeds; and ``claims``, per family: the
two numbers MH-MoE (arXiv 2404.15045) reports against X-MoE, the held-out expert activation
(MH-MoE above X-MoE) and the held-out loss (MH-MoE below X-MoE), at 8 experts and (``_32e``) at
32, loss-free balancing's against the balance loss in the same layer (a lower max load at a
held-out loss no higher, arXiv 2408.15664), and every method's held-out loss against the dense
model's. Each is a difference of means and, seed by seed, of runs that saw the same data in the
same order (``per_seed``), with ``every_seed_agrees``: a difference whose sign flips between seeds
is within the noise.
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
from multimodal_moe.config import dump_config
from multimodal_moe.runtime import keep_freed_memory
from multimodal_moe.training import Checkpoint, train

FAMILIES = ("lm", "beit3")
METHODS = ("dense", "xmoe", "mhmoe", "mot", "xmoe_32e", "mhmoe_32e", "deepseekmoe", "ec", "lossfree", "lossfree_aux")
ENCODER_ONLY = {"ec": "expert choice lets a token's experts depend on later tokens: a causal LM refuses it"}
EXPERTS_32 = "model.moe_ffn.num_experts=32"  # the same experts, 4x as many: the papers' 32-expert setting
# a method that is another's preset with other settings
VARIANTS = {"xmoe_32e": ("xmoe", [EXPERTS_32]), "mhmoe_32e": ("mhmoe", [EXPERTS_32]),
            # the loss-free preset balanced by the balance loss instead of the bias (arXiv 2408.15664's baseline)
            "lossfree_aux": ("lossfree", ["model.moe_ffn.bias_update_rate=0.0",
                                          "model.moe_ffn.balance_loss_weight=0.01"])}
NUMBERS = ("heldout_loss", "perplexity", "heldout_activation", "train_loss", "max_load", "dropped_fraction", "seconds")


def preset(family: str, method: str) -> str:
    return f"{family}/debug" if method == "dense" else f"{family}/{VARIANTS.get(method, (method,))[0]}_debug"


def overrides(method: str) -> list[str]:
    return VARIANTS.get(method, (method, []))[1]


def expert_macs(cfg: mm.Config) -> float:
    """Expert multiply-adds per token of the preset's sparse FFN (of its dense FFN without one)."""
    ffn = getattr(cfg.model, "moe_ffn", None) or cfg.model.ffn
    return expert_macs_per_token(ffn, cfg.model.dim)


def run_one(family: str, method: str, seed: int, steps: int | None, out: Path) -> tuple[Path, dict]:
    """Train and evaluate one run; its folder and the numbers it adds to the compare table. A
    run that has been evaluated under the same config before (an earlier, interrupted or
    narrower invocation) is read back instead of trained again."""
    changes = [*overrides(method), f"seed={seed}", "train.num_workers=0"] + ([f"train.steps={steps}"] if steps else [])
    cfg = mm.load_config(preset(family, method), changes)
    run_dir = out / family / f"{method}-seed{seed}"
    done = run_dir / "fidelity.json"
    earlier = json.loads(done.read_text()) if done.is_file() else {}
    if earlier.get("config") == dump_config(cfg):
        return run_dir, {"seconds": earlier["seconds"]}
    start = time.perf_counter()
    train(cfg, run_dir, progress=False, resume=(run_dir / "checkpoints").is_dir())
    checkpoint = Checkpoint.open(run_dir)
    evaluate_checkpoint(checkpoint, checkpoint.config, run_dir)
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"config": dump_config(cfg), "seconds": seconds}))
    return run_dir, {"seconds": seconds}


def spread(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired(ours: dict, theirs: dict, number: str) -> dict:
    """``ours - theirs`` for ``number``: of the means, and seed by seed (the same seed gives both
    runs the same data order, so its difference carries less noise than either value), and
    whether every seed's difference has the sign of the means'."""
    mean_a, mean_b = ours[number]["mean"], theirs[number]["mean"]
    per_seed = [None if None in (a[number], b[number]) else a[number] - b[number]
                for a, b in zip(ours["runs"], theirs["runs"])]
    difference = None if None in (mean_a, mean_b) else mean_a - mean_b
    same_sign = (difference is not None and None not in per_seed and difference != 0
                 and all(d * difference > 0 for d in per_seed))
    return {"difference": difference, "per_seed": per_seed, "every_seed_agrees": same_sign}


def claims(methods: dict[str, dict]) -> dict[str, dict]:
    """MH-MoE's two claims against X-MoE at each expert count run, and each method's held-out
    loss against the dense model's (the MoE papers' common claim: lower at equal FLOPs)."""
    found = {}
    for suffix in ("", "_32e"):
        ours, theirs = methods.get(f"mhmoe{suffix}"), methods.get(f"xmoe{suffix}")
        if ours is None or theirs is None:
            continue
        for number, direction in (("heldout_activation", "higher"), ("heldout_loss", "lower")):
            found[f"mhmoe_vs_xmoe{suffix}_{number}"] = {
                "mhmoe": ours[number]["mean"], "xmoe": theirs[number]["mean"], "paper": f"MH-MoE {direction}",
                **paired(ours, theirs, number)}
    if "lossfree" in methods and "lossfree_aux" in methods:  # arXiv 2408.15664: better balanced, no worse a loss
        for number, claim in (("max_load", "lower"), ("heldout_loss", "no higher")):
            found[f"lossfree_vs_balance_loss_{number}"] = {"paper": f"loss-free balancing {claim}", **paired(
                methods["lossfree"], methods["lossfree_aux"], number)}
    if "dense" in methods:
        for method, numbers in methods.items():
            if method != "dense":
                found[f"{method}_vs_dense_heldout_loss"] = {"paper": f"{method} lower",
                                                            **paired(numbers, methods["dense"], "heldout_loss")}
    return found


def bench_family(family: str, methods: list[str], seeds: list[int], steps: int | None, out: Path) -> dict:
    skipped = {m: ENCODER_ONLY[m] for m in methods if family == "lm" and m in ENCODER_ONLY}
    methods = [m for m in methods if m not in skipped]
    runs, extra, labels = [], {}, []
    for method in methods:
        for seed in seeds:
            print(f"fidelity: {family} {method} ({preset(family, method)}) seed {seed}", file=sys.stderr)
            run_dir, numbers = run_one(family, method, seed, steps, out)
            runs.append(run_dir)
            labels.append(run_dir.name)
            extra[run_dir.name] = numbers
    summary = compare_runs(runs, out / family / "compare", labels=labels)
    print(format_table(summary), file=sys.stderr)
    rows = {row["label"]: {**row, **extra[row["label"]]} for row in summary["runs"]}
    result = {}
    for method in methods:
        cfg = mm.load_config(preset(family, method), overrides(method))
        mine = [rows[f"{method}-seed{seed}"] for seed in seeds]
        result[method] = {"preset": preset(family, method), "overrides": overrides(method),
                          "expert_macs_per_token": expert_macs(cfg),
                          "steps": mine[0]["steps"],
                          "runs": [{"seed": seed, **{n: row[n] for n in NUMBERS}} for seed, row in zip(seeds, mine)],
                          **{n: spread([row[n] for row in mine]) for n in NUMBERS}}
    return {"methods": result, "claims": claims(result), "compare": summary["plots"], "not_run": skipped}


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
