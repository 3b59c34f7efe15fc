"""The ``throughput`` section of ``mmoe bench gpu``: the trainer's whole step (heads, losses,
backward, clipping, AdamW) of base-size presets on synthetic batches of their task's batch types
in bf16 autocast: s/step, tokens/s, peak memory, active parameters per token and model FLOPs
utilisation (:mod:`multimodal_moe.flops`); with xformers installed, the first preset again on
its attention."""

from __future__ import annotations

import argparse
import math
import tempfile
from typing import Any

import torch

from data_pipelines.batches import ImageBatch, ImageTextBatch, LMBatch, TextBatch
from data_pipelines.mixer import PretrainStep

from .. import load_config
from ..config import Config
from ..flops import active_parameters, model_flops_per_step, peak_bf16_tflops
from ..models import DecoderLMConfig
from ..tasks import LanguageModelingConfig, MaskedDataModelingConfig
from ..training import Trainer
from .harness import Plan, Sizes, device_info, each, median_seconds

__all__ = ["CPU_THROUGHPUT_PRESETS", "THROUGHPUT_PRESETS", "section", "synthetic_step"]

THROUGHPUT_PRESETS = ("beit3/base", "beit3/base_xmoe_8e", "beit3/base_mhmoe_8e", "lm/mot_base_32e", "lm/mot_base")
CPU_THROUGHPUT_PRESETS = ("beit3/debug", "beit3/xmoe_debug", "beit3/mhmoe_debug", "lm/mot_debug", "lm/debug")


def synthetic_step(cfg: Config, device: torch.device) -> tuple[PretrainStep | LMBatch, list[tuple[int, int]]]:
    """A batch of the type ``cfg.task`` trains on, of its batch sizes and lengths, random, on
    ``device``, without padding; and its sequences as (count, length) pairs."""
    g = torch.Generator(device).manual_seed(0)
    model, task = cfg.model, cfg.task
    if isinstance(task, LanguageModelingConfig):
        B, T = task.text.batch_size, task.text.max_len
        ids_BT = torch.randint(0, model.vocab_size, (B, T + 1), generator=g, device=device)
        return LMBatch(keys=[], ids_BT=ids_BT), [(B, T)]
    if not isinstance(task, MaskedDataModelingConfig):
        raise ValueError(f"no synthetic batches for task kind {task.kind!r}; the throughput section times mmm and lm")
    P, S, C = model.num_patches, model.image_size, model.in_chans

    def images(B: int) -> dict[str, Any]:
        return {"images_B3HW": torch.randn(B, C, S, S, generator=g, device=device),
                "image_mask_BP": torch.rand(B, P, generator=g, device=device) < task.image_mask_ratio}

    def text(B: int, L: int, ratio: float) -> dict[str, Any]:
        ids_BL = torch.randint(4, model.vocab_size, (B, L), generator=g, device=device)
        masked_BL = torch.rand(B, L, generator=g, device=device) < ratio
        return {"text_ids_BL": ids_BL, "padding_mask_BL": torch.zeros(B, L, dtype=torch.bool, device=device),
                "mlm_labels_BL": ids_BL.masked_fill(~masked_BL, -100)}

    step, sequences = PretrainStep(step=0), []
    if (s := task.image) is not None:
        step.image = ImageBatch(keys=[str(i) for i in range(s.batch_size)], **images(s.batch_size))
        sequences.append((s.batch_size, 1 + P))
    if (s := task.text) is not None:
        step.text = TextBatch(keys=[str(i) for i in range(s.batch_size)],
                              **text(s.batch_size, s.max_len, task.text_mask_ratio))
        sequences.append((s.batch_size, s.max_len))
    if (s := task.image_text) is not None:
        step.image_text = ImageTextBatch(keys=[str(i) for i in range(s.batch_size)], **images(s.batch_size),
                                         **text(s.batch_size, s.max_len, task.image_text_mask_ratio))
        sequences.append((s.batch_size, 1 + P + s.max_len))
    return step, sequences


def _throughput_config(preset: str, device: str, sizes: Sizes, backend: str) -> Config:
    """``preset`` with bf16 autocast on ``device``, attention ``backend`` and the timed batch sizes."""
    sets = [f"train.device={device}", "train.precision=bf16", "train.num_workers=0", "train.steps=1000",
            "train.warmup_steps=0", f"model.attention_backend={backend}"]
    model = load_config(preset).model
    if isinstance(model, DecoderLMConfig):
        sets += [f"task.text.batch_size={sizes.lm_batch}", f"task.text.max_len={sizes.lm_seq}"]
        if sizes.lm_seq > model.max_seq_len:
            sets.append(f"model.max_seq_len={sizes.lm_seq}")
    else:
        B, L = sizes.encoder_batch, sizes.text_len
        sets += [f"task.image.batch_size={B}", f"task.text.batch_size={B}", f"task.text.max_len={L}",
                 f"task.image_text.batch_size={B}", f"task.image_text.max_len={L}"]
    return load_config(preset, sets)


def _time_preset(preset: str, device: torch.device, sizes: Sizes, plan: Plan, peak_tflops: float | None,
                 backend: str = "sdpa") -> dict[str, Any]:
    """Median seconds of the trainer's step on one synthetic batch, and what follows from them."""
    cfg = _throughput_config(preset, str(device), sizes, backend)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        # built on the CPU, as the loaders yield them: the trainer pins and copies each step
        batch, sequences = synthetic_step(trainer.cfg, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        seconds = median_seconds(lambda: losses.append(trainer.train_step([batch]).loss), device,
                                  plan.bench_warmup, plan.bench_steps)
        model = trainer.task.model
        active = active_parameters(model)
        flops = model_flops_per_step(active, cfg.model.depth, cfg.model.dim, sequences)
        entry = {"ok": all(math.isfinite(x) for x in losses), "attention_backend": backend,
                 "sequences": [{"count": n, "length": t} for n, t in sequences], "tokens_per_step": flops["tokens"],
                 "seconds_per_step": round(seconds, 4), "tokens_per_s": round(flops["tokens"] / seconds),
                 "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                     if device.type == "cuda" else None),
                 "parameters": sum(p.numel() for p in trainer.task.parameters()),
                 "backbone_parameters": sum(p.numel() for p in model.parameters()),
                 "active_parameters_per_token": round(active), "first_loss": losses[0], "last_loss": losses[-1]}
        del trainer, model, batch
    total = flops["parameter_flops"] + flops["attention_flops"]
    for name, work in (("mfu", total), ("mfu_without_attention", flops["parameter_flops"])):
        entry[name] = None if peak_tflops is None else round(work / seconds / (peak_tflops * 1e12), 4)
    entry["model_tflop_per_step"] = float(f"{total / 1e12:.4g}")
    return entry


def section(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float
                        ) -> dict[str, Any]:
    sizes, info = Sizes.resolve(args, device), device_info(device)
    peak = args.peak_tflops or (peak_bf16_tflops(info["name"]) if device.type == "cuda" else None)
    out: dict[str, Any] = {
        "peak_bf16_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else (f"table ({info['name']})" if peak else
                                                                 f"{info['name']!r} is not in the table, so MFU is "
                                                                 "null (pass --peak-tflops)"),
        "mfu_definition": "(6 x active parameters per token x tokens + attention FLOPs) / s / peak; "
                          "mfu_without_attention leaves attention out; task heads (MIM, MLM) are not counted",
        "batch": {"encoder_per_stream": sizes.encoder_batch, "encoder_text_len": sizes.text_len,
                  "lm": sizes.lm_batch, "lm_seq": sizes.lm_seq},
        "timing": f"median of {plan.bench_steps} steps after {plan.bench_warmup} warmup steps; one synthetic batch "
                  "of the task's batch type, without padding"}
    presets = args.throughput_presets or (THROUGHPUT_PRESETS if device.type == "cuda" else CPU_THROUGHPUT_PRESETS)
    jobs = {preset: lambda preset=preset: _time_preset(preset, device, sizes, plan, peak) for preset in presets}
    results = each("throughput", jobs, deadline, lambda r: f"{r['tokens_per_s']:,} tokens/s, MFU {r['mfu']}")
    ok = all(r["ok"] for r in results.values())
    if not info["xformers"]["importable"]:
        xformers: Any = "not installed"
    elif device.type != "cuda":
        xformers = "skipped: xformers attention runs on CUDA only"
    else:  # the first preset (beit3/base by default) again, on xformers' attention
        job = {presets[0]: lambda: _time_preset(presets[0], device, sizes, plan, peak, backend="xformers")}
        xformers = each("throughput on xformers", job, deadline, lambda r: f"{r['tokens_per_s']:,} tokens/s")
        xformers = {"preset": presets[0], **xformers[presets[0]]}
        sdpa = results[presets[0]].get("tokens_per_s")
        if "tokens_per_s" in xformers and sdpa:
            xformers["tokens_per_s_vs_sdpa"] = round(xformers["tokens_per_s"] / sdpa, 3)
        ok = ok and xformers["ok"]
    return {"ok": ok, **out, "results": results, "xformers": xformers}

