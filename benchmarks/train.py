"""Training-step throughput and memory per preset, and our BEiT-3 encoder against torchscale's;
prints JSON.

    python benchmarks/train.py [--sizes debug base] [--rounds 5] [--no-torchscale] [--no-memory]

1. ``presets``: for each preset, in a fresh process, the trainer's full step (its default task
   on the bundled data: forward of every stream, heads, losses, backward, clipping, AdamW) on
   pre-loaded batches: tokens/s and samples/s (median step), the expert multiply-adds per token
   of its MoE layers next to the dense FFN's (every MoE preset matches them), and the rise of
   the peak resident set during one step.
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


def measure(step: Callable[[], None], rounds: int, memory: bool) -> dict:
    """The rise of the peak resident set during the first call of ``step`` (Linux: gradients,
    optimizer state and activations; freed memory is kept for reuse afterwards, so later calls
    would show none), then the median seconds of ``rounds`` more calls."""
    out = {}
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step()
    if memory:
        out["peak_step_memory_mb"] = round(_status_mb("VmHWM") - before, 1)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": round(statistics.median(times), 4), **out}


def _child(kind: str, name: str, batch: int, rounds: int, memory: bool) -> dict:
    """:func:`measure` of one model in a fresh process, so that models never share memory or caches."""
    args = [sys.executable, __file__, "--child", kind, name, str(batch), "--rounds", str(rounds)]
    out = subprocess.run(args + ([] if memory else ["--no-memory"]), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {kind} {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def preset_child(name: str, batch: int, rounds: int, memory: bool) -> dict:
    step, trainer = preset_step(name, batch)
    out = measure(step, rounds, memory)
    samples, tokens = trainer.meter.samples // (rounds + 1), trainer.meter.tokens // (rounds + 1)
    model_cfg = trainer.cfg.model
    out.update(parameters=sum(p.numel() for p in trainer.task.parameters()), samples_per_step=samples,
               tokens_per_step=tokens, ffn_macs_per_token=expert_macs_per_token(model_cfg.ffn, model_cfg.dim))
    if model_cfg.moe_ffn is not None:
        out["moe_expert_macs_per_token"] = expert_macs_per_token(model_cfg.moe_ffn, model_cfg.dim)
    out["samples_per_s"] = round(samples / out["seconds_per_step"], 1)
    out["tokens_per_s"] = round(tokens / out["seconds_per_step"], 1)
    return out


def bench_presets(sizes: list[str], rounds: int, memory: bool) -> dict:
    results = {}
    for size in sizes:
        info = {preset: _child("preset", preset, BATCH[size], rounds, memory) for preset in SIZES[size]}
        for preset, entry in info.items():
            dense = info[f"{preset.split('/')[0]}/{'debug' if size == 'debug' else 'base'}"]
            entry["time_vs_dense"] = round(entry["seconds_per_step"] / dense["seconds_per_step"], 3)
        results[size] = {"batch_per_stream": BATCH[size], **info}
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
        import torchscale  # noqa: F401
    except ImportError as e:
        return {"skipped": f"torchscale is not installed ({e}); pip install --no-deps torchscale==0.3.0 "
                           f"fairscale==0.4.0"}
    ours, theirs = (_child(kind, "beit3/base", batch, rounds, memory) for kind in ("ours", "torchscale"))
    out = {"batch": batch, "tokens_per_sample": 197 + 64, "ours": ours, "torchscale": theirs,
           "time_ours_over_theirs": round(ours["seconds_per_step"] / theirs["seconds_per_step"], 3)}
    if memory:
        out["memory_ours_over_theirs"] = round(ours["peak_step_memory_mb"] / theirs["peak_step_memory_mb"], 3)
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
        if kind == "preset":
            print(json.dumps(preset_child(name, int(batch), args.rounds, not args.no_memory)))
        else:
            step = ours_step(int(batch)) if kind == "ours" else torchscale_step(int(batch))
            print(json.dumps(measure(step, args.rounds, not args.no_memory)))
        return 0
    result = {"threads": args.threads, "presets": bench_presets(args.sizes, args.rounds, not args.no_memory)}
    if not args.no_torchscale:
        result["torchscale_beit3_base"] = bench_torchscale(args.torchscale_batch, args.rounds, not args.no_memory)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
