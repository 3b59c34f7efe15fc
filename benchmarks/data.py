"""Is the loader ever the bottleneck? The pretraining data pipeline vs the training step; JSON out.

    python benchmarks/data.py [--preset configs/pretrain/debug.yaml] [--steps 30] [--rounds 3]

Measures, on the same machine and in one run:
- the loader: samples/s of the preset's whole pretraining input (image, text and image-text
  streams through the mixer: read tar -> decode -> random resized crop + flip -> block mask ->
  tokenize -> MLM masking -> collate) with 0 and 2 DataLoader workers per stream;
- the model: samples/s of the preset's full training step (forward of every stream, MIM and
  MLM heads, losses, backward, clipping, AdamW) on batches loaded beforehand.
Measurements alternate, round after round; medians are reported. The ratio loader/model must
stay >= 3 for the loader never to be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import multimodal_moe as mm
from multimodal_moe.runtime import keep_freed_memory
from multimodal_moe.training import Trainer, build_task


def loader_rate(cfg: mm.Config, workers: int, steps: int, seed: int) -> float:
    """Samples/s of a fresh pretraining mixer, after two warm-up steps (worker start-up, first shards)."""
    it = iter(build_task(cfg).train_data(seed=seed, num_workers=workers))
    next(it), next(it)
    start = time.perf_counter()
    samples = sum(sum(len(b) for b in next(it).batches().values()) for _ in range(steps))
    return samples / (time.perf_counter() - start)


def model_rate(trainer: Trainer, batches: list) -> float:
    """Samples/s of the full training step on pre-loaded batches."""
    start = time.perf_counter()
    for b in batches:
        trainer.train_step([b])
    return sum(sum(len(x) for x in b.batches().values()) for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="configs/pretrain/debug.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    keep_freed_memory()

    cfg = mm.load_config(args.preset, ["train.num_workers=0"])
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="bench-data-"), progress=False)
    data = iter(trainer.data)
    batches = [next(data) for _ in range(args.steps)]
    model_rate(trainer, batches[:3])  # warm-up
    names = ("loader_0_workers", "loader_2_workers", "training_step")
    rounds = []  # interleaved, so that a slow phase of the machine hits all three
    for r in range(args.rounds):
        rounds.append(dict(zip(names, (loader_rate(cfg, 0, args.steps, r + 1), loader_rate(cfg, 2, args.steps, r + 1),
                                       model_rate(trainer, batches)))))
    median = {k: statistics.median(r[k] for r in rounds) for k in names}
    report = {"setup": {"preset": args.preset, "batch_sizes": {s: getattr(cfg.task, s).batch_size
                                                               for s in ("image", "text", "image_text")},
                        "steps": args.steps, "rounds": args.rounds, "threads": 2, "statistic": "median round",
                        "unit": "samples/s (images + texts + image-text pairs)"},
              "samples_per_s": {k: round(v, 1) for k, v in median.items()},
              "loader_over_model": {f"{w}_workers": round(statistics.median(
                  r[f"loader_{w}_workers"] / r["training_step"] for r in rounds), 2) for w in (0, 2)}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
