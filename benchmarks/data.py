"""Is the loader ever the bottleneck? Image-text pretraining pipeline vs the debug model; JSON out.

    python benchmarks/data.py [--shards DIR] [--batches 30] [--preset configs/beit3/debug.yaml]

Measures, on the same machine and in one run:
- the loader: samples/s of the image-text pretraining stream (read tar -> decode -> random
  resized crop + flip -> block mask -> tokenize -> 50% MLM -> collate) with 0 and 2 DataLoader
  workers, over ``--shards`` (default: the bundled image-text training shards);
- the model: samples/s of forward+backward+AdamW of the preset's encoder on those batches.
Measurements alternate, round after round; medians are reported. The ratio loader/model must
stay >= 3 for the loader never to be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import multimodal_moe as mm
from data_pipelines.images import pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.processors import ImageTextProcessor
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.runtime import keep_freed_memory

BUNDLED = Path(__file__).resolve().parents[1] / "data_pipelines" / "bundled"


def loader_rate(stream: ShardStream, workers: int, batches: int) -> float:
    """Samples/s of a fresh loader, after two warm-up batches (worker start-up, first shards)."""
    it = iter(StreamLoader(stream, num_workers=workers))
    next(it), next(it)
    start = time.perf_counter()
    samples = sum(len(next(it)) for _ in range(batches))
    return samples / (time.perf_counter() - start)


def model_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> float:
    """Samples/s of forward + backward + AdamW on the encoder (a stand-in loss on the hidden states)."""
    start = time.perf_counter()
    for b in batches:
        out = model(images=b.images_B3HW, image_mask=b.image_mask_BP, text_ids=b.text_ids_BL,
                    text_padding_mask=b.padding_mask_BL)
        loss = out.hidden.float().pow(2).mean() + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=str(BUNDLED / "image_text" / "train"))
    p.add_argument("--preset", default="configs/beit3/debug.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    keep_freed_memory()

    cfg = mm.load_config(args.preset)
    tokenizer = Tokenizer.load(BUNDLED / "tokenizer.model")
    grid = cfg.model.image_size // cfg.model.patch_size
    processor = ImageTextProcessor.build(tokenizer, pretrain_transform(cfg.model.image_size),
                                         mask=BlockMaskGenerator(grid, min_block=max(1, grid * grid // 12)),
                                         max_len=32)

    def stream(seed: int) -> ShardStream:
        return ShardStream(args.shards, processor, batch_size=args.batch_size, shuffle_buffer=500, seed=seed)

    model = mm.build_model(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [b for _, b in zip(range(args.batches), StreamLoader(stream(0)))]
    model_rate(model, optimizer, batches[:5])  # warm-up
    names = ("loader_0_workers", "loader_2_workers", "model_fwd_bwd_step")
    rounds = []  # interleaved, so that a slow phase of the machine hits all three
    for r in range(args.rounds):
        rounds.append(dict(zip(names, (loader_rate(stream(r), 0, args.batches),
                                       loader_rate(stream(r), 2, args.batches),
                                       model_rate(model, optimizer, batches)))))
    median = {k: statistics.median(r[k] for r in rounds) for k in names}
    report = {"setup": {"shards": args.shards, "preset": args.preset, "batch_size": args.batch_size,
                        "batches": args.batches, "rounds": args.rounds, "threads": 2, "statistic": "median round",
                        "unit": "image-text samples/s"},
              "samples_per_s": {k: round(v, 1) for k, v in median.items()},
              "loader_over_model": {f"{w}_workers": round(statistics.median(
                  r[f"loader_{w}_workers"] / r["model_fwd_bwd_step"] for r in rounds), 2) for w in (0, 2)}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
