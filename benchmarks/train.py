"""Training-step throughput and memory per preset, and our BEiT-3 encoder against torchscale's;
prints JSON.

    python benchmarks/train.py [--sizes debug base] [--rounds 5] [--no-torchscale] [--no-memory]

1. ``presets``: for each preset, the trainer's full step (its default task on the bundled data:
   forward of every stream, heads, losses, backward, clipping, AdamW) on pre-loaded batches;
   tokens/s and samples/s (median of interleaved rounds), the expert multiply-adds per token of
   its MoE layers next to the dense FFN's (the base MoE presets match them; the debug ones are
   half-width), and the rise of the peak resident set during one step in a fresh process.
2. ``torchscale``: the dense BEiT-3 base encoder built by torchscale 0.3.0 (``pip install
   --no-deps torchscale==0.3.0 fairscale==0.4.0``, benchmark-only) and ours, forward+backward
   of the same image-text batch: seconds and peak step memory, ours / theirs (target <= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

import multimodal_moe as mm
from multimodal_moe.bench import expert_macs_per_token
from multimodal_moe.runtime import keep_freed_memory
from multimodal_moe.training import Trainer

SIZES = {
    "debug": ["beit3/debug", "beit3/xmoe_debug", "beit3/mhmoe_debug", "beit3/mot_debug",
              "lm/debug", "lm/xmoe_debug", "lm/mhmoe_debug", "lm/mot_debug"],
    "base": ["beit3/base", "beit3/base_xmoe_8e", "beit3/base_mhmoe_8e"],
}
BATCH = {"debug": 32, "base": 4}  # per stream


def _overrides(preset: str, batch: int) -> list[str]:
    streams = ["text"] if preset.startswith("lm/") else ["image", "text", "image_text"]
    return ["train.num_workers=0", *[f"task.{s}.batch_size={batch}" for s in streams]]


def preset_step(preset: str, batch: int) -> tuple[Callable[[], None], Trainer]:
    """A closure doing one training step of ``preset`` on two alternating pre-loaded batches."""
    cfg = mm.load_config(preset, _overrides(preset, batch))
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="bench-train-"), progress=False)
    data = iter(trainer.data)
    batches = [next(data) for _ in range(2)]
    count = [0]

    def step() -> None:
        trainer.train_step([batches[count[0] % 2]])
        count[0] += 1

    return step, trainer


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def _peak_rise_mb(step: Callable[[], None]) -> float:
    """Rise of the peak resident set during one call of ``step`` (after a warm-up call)."""
    step()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step()
    return round(_status_mb("VmHWM") - before, 1)


def _in_child(kind: str, name: str, batch: int) -> float | None:
    """Peak step memory measured in a fresh process (None if it fails, e.g. not Linux)."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, name, str(batch)], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def _rounds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_presets(sizes: list[str], rounds: int, memory: bool) -> dict:
    results = {}
    for size in sizes:
        steps, info = {}, {}
        for preset in SIZES[size]:
            step, trainer = preset_step(preset, BATCH[size])
            before = (trainer.meter.samples, trainer.meter.tokens)
            step()
            info[preset] = {"samples": trainer.meter.samples - before[0], "tokens": trainer.meter.tokens - before[1],
                            "parameters": sum(p.numel() for p in trainer.task.parameters())}
            model_cfg = trainer.cfg.model
            info[preset]["ffn_macs_per_token"] = expert_macs_per_token(model_cfg.ffn, model_cfg.dim)
            if model_cfg.moe_ffn is not None:
                info[preset]["moe_expert_macs_per_token"] = expert_macs_per_token(model_cfg.moe_ffn, model_cfg.dim)
            steps[preset] = step
        seconds = _rounds(steps, rounds)
        for preset, s in seconds.items():
            entry = info[preset]
            entry.update(seconds_per_step=round(s, 4), samples_per_s=round(entry["samples"] / s, 1),
                         tokens_per_s=round(entry["tokens"] / s, 1))
            if memory:
                entry["peak_step_memory_mb"] = _in_child("preset", preset, BATCH[size])
        dense = {"beit3": seconds[SIZES[size][0]]}
        if size == "debug":
            dense["lm"] = seconds["lm/debug"]
        for preset in SIZES[size]:
            info[preset]["time_vs_dense"] = round(seconds[preset] / dense[preset.split("/")[0]], 3)
        results[size] = info
    return results


# -- ours vs torchscale -------------------------------------------------------------------------

def _base_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 224, 224, generator=g), torch.randint(4, 64000, (batch, 64), generator=g)


def ours_step(batch: int) -> Callable[[], None]:
    model = mm.build_model(mm.load_config("beit3/base")).train()
    images, ids = _base_inputs(batch)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images=images, text_ids=ids).hidden.float().pow(2).mean().backward()

    return step


def torchscale_step(batch: int) -> Callable[[], None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    args = EncoderConfig(multiway=True, vocab_size=64010, img_size=224, patch_size=16, encoder_layers=12,
                         encoder_embed_dim=768, encoder_attention_heads=12, encoder_ffn_embed_dim=3072,
                         normalize_output=True, no_output_layer=True, subln=True)
    torch.manual_seed(0)
    model = BEiT3(args).train()
    images, ids = _base_inputs(batch)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(textual_tokens=ids, visual_tokens=images)["encoder_out"].float().pow(2).mean().backward()

    return step


def bench_torchscale(batch: int, rounds: int, memory: bool) -> dict:
    try:
        theirs = torchscale_step(batch)
    except ImportError as e:
        return {"skipped": f"torchscale is not installed ({e}); pip install --no-deps torchscale==0.3.0 "
                           f"fairscale==0.4.0"}
    seconds = _rounds({"ours": ours_step(batch), "torchscale": theirs}, rounds)
    out = {"batch": batch, "tokens": 197 + 64, "seconds": {k: round(v, 4) for k, v in seconds.items()},
           "time_ours_over_theirs": round(seconds["ours"] / seconds["torchscale"], 3)}
    if memory:
        mem = {name: _in_child(name, "beit3/base", batch) for name in ("ours", "torchscale")}
        out["peak_step_memory_mb"] = mem
        if None not in mem.values():
            out["memory_ours_over_theirs"] = round(mem["ours"] / mem["torchscale"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["debug", "base"], choices=sorted(SIZES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--torchscale-batch", type=int, default=4)
    p.add_argument("--no-torchscale", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if args.child:
        kind, name, batch = args.child
        make = {"preset": lambda: preset_step(name, int(batch))[0], "ours": lambda: ours_step(int(batch)),
                "torchscale": lambda: torchscale_step(int(batch))}[kind]
        print(_peak_rise_mb(make()))
        return 0
    result = {"threads": args.threads, "presets": bench_presets(args.sizes, args.rounds, not args.no_memory)}
    if not args.no_torchscale:
        result["torchscale_beit3_base"] = bench_torchscale(args.torchscale_batch, args.rounds, not args.no_memory)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
