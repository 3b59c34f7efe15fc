"""Is the loader ever the bottleneck? Image-text pretraining pipeline vs the debug model; JSON out.

    python benchmarks/data.py [--shards DIR] [--batches 30] [--preset configs/beit3/debug.yaml]

Measures, on the same machine and in one run:
- the loader: samples/s of the image-text pretraining stream (read tar -> decode -> random
  resized crop + flip -> block mask -> tokenize -> 50% MLM -> collate) with 0 and 2 DataLoader
  workers, over ``--shards`` (default: the bundled image-text training shards);
- the model: samples/s of forward+backward+AdamW of the preset's encoder on those batches.
The ratio loader/model must stay >= 3 for the loader never to be the bottleneck.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import multimodal_moe as mm
from data_pipelines.cli import shard_texts
from data_pipelines.images import pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.processors import ImageTextProcessor
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.tokenizer import train_tokenizer

BUNDLED = Path(__file__).resolve().parents[1] / "data_pipelines" / "bundled" / "image_text" / "train"


def loader_rate(stream_factory, workers: int, batches: int) -> float:
    loader = StreamLoader(stream_factory(), num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker processes, first shard) is not throughput
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(it))
    return samples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default=str(BUNDLED))
    p.add_argument("--preset", default="configs/beit3/debug.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    cfg = mm.load_config(args.preset).model
    texts = list(itertools.islice(shard_texts([args.shards]), 2000))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(texts, Path(tmp) / "t.model", vocab_size=min(cfg.vocab_size, 1000))

    grid = cfg.image_size // cfg.patch_size
    processor = ImageTextProcessor.build(tokenizer, pretrain_transform(cfg.image_size),
                                         mask=BlockMaskGenerator(grid, min_block=max(1, grid * grid // 12)),
                                         max_len=32)

    def stream():
        return ShardStream(args.shards, processor, batch_size=args.batch_size, shuffle_buffer=500)

    rates = {f"loader_{w}_workers": loader_rate(stream, w, args.batches) for w in (0, 2)}

    model = mm.build_model(mm.load_config(args.preset), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [b for _, b in zip(range(args.batches), StreamLoader(stream()))]
    start = time.perf_counter()
    for b in batches:
        out = model(images=b.images_B3HW, image_mask=b.image_mask_BP, text_ids=b.text_ids_BL,
                    text_padding_mask=b.padding_mask_BL)
        loss = out.hidden.float().pow(2).mean() + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    rates["model_fwd_bwd_step"] = sum(len(b) for b in batches) / (time.perf_counter() - start)

    report = {"setup": {"shards": args.shards, "preset": args.preset, "batch_size": args.batch_size,
                        "batches": args.batches, "threads": 2, "unit": "image-text samples/s"},
              "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
              "loader_over_model": {f"{w}_workers": round(rates[f"loader_{w}_workers"] / rates["model_fwd_bwd_step"], 2)
                                    for w in (0, 2)}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
