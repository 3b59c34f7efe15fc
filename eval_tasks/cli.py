"""The ``mmoe`` commands of the downstream tasks, on top of the library's command line
(:mod:`multimodal_moe.cli`, which adds them to its parser):

    mmoe finetune --config PRESET [--init CKPT]   fine-tune a downstream task, then evaluate
    mmoe evaluate --checkpoint CKPT               results.json and plots of a checkpoint
    mmoe predict --checkpoint CKPT --image X      answers (--question Q), a caption ranking (--captions ...),
                                                  a caption, classes; NLVR2: two --image, --statement S
    mmoe demo [--run-dir DIR] [--tasks T,...]     pretrain -> fine-tune the five tasks (and from scratch)
                                                  -> evaluate -> one table
    mmoe convert beit3 --src FILE --dst DIR       official BEiT-3 checkpoints in (and out: --to torchscale|unilm)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from multimodal_moe import load_checkpoint, load_config
from multimodal_moe.cli import RESUME, run_dir_of, train_into
from multimodal_moe.training import Checkpoint

from .beit3_convert import ConversionError, from_beit3, to_beit3
from .demo import TASKS, run_demo, table
from .evaluate import evaluate_checkpoint

__all__ = ["add_parsers"]


def _summary(results: dict) -> str:
    keys = [k for k in ("vqa_accuracy", "i2t_r1", "t2i_r1", "r_mean", "perplexity", "bits_per_byte", "loss",
                        "questions", "accuracy", "statements", "BLEU_4", "CIDEr", "top1", "top5") if k in results]
    return ", ".join(f"{k} {results[k]:.2f}" for k in keys)


def cmd_finetune(args: argparse.Namespace) -> int:
    run_dir = run_dir_of(args)
    if run_dir is None:
        return 2
    code = train_into(args, load_config(args.config, args.set), "finetune", run_dir)
    if code:
        return code
    checkpoint = Checkpoint.open(run_dir)  # its config as trained (with e.g. the VQA answer list)
    results = evaluate_checkpoint(checkpoint, checkpoint.config, Path(run_dir),
                                  progress=not args.no_progress)  # every rank scores its share
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"evaluation: {_summary(results)}; {Path(run_dir) / 'results.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    checkpoint = Checkpoint.open(args.checkpoint)
    if args.config is None:  # the checkpoint's own config, --set on top
        cfg = checkpoint.config_with(args.set)
    else:
        saved, requested = checkpoint.config, load_config(args.config, args.set)
        cfg = dataclasses.replace(requested, model=saved.model, task=requested.task.with_heads_of(saved.task))
    out_dir = Path(args.out) if args.out else checkpoint.path.parent.parent
    results = evaluate_checkpoint(checkpoint, cfg, out_dir, progress=not args.no_progress,
                                  text_shards=args.text_shards, choices=args.choices, predict=args.predict)
    print(f"evaluation: {_summary(results)}; {out_dir / 'results.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    task = load_checkpoint(args.checkpoint, device=args.device)
    query = getattr(task, "query", None)  # the flag of the texts the task reads about the image; "": none
    if query is None:
        raise ValueError(f"{args.checkpoint} holds a {type(task).__name__} backbone, not a fine-tuned task; "
                         f"predict takes a fine-tuned checkpoint (mmoe finetune writes one)")
    texts = {"question": args.question, "captions": args.captions, "statement": args.statement}
    given = [f"--{flag}" for flag, values in texts.items() if values]
    if query and given != [f"--{query}"]:
        raise ValueError(f"a {task.cfg.kind} checkpoint takes --{query}"
                         + (f", not {' '.join(given)}" if given else ""))
    if not query and given:
        raise ValueError(f"a {task.cfg.kind} checkpoint reads the image alone; it takes no {' '.join(given)}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if len(args.image) != task.images_read:
        raise ValueError(f"a {task.cfg.kind} checkpoint reads {task.images_read} image"
                         f"{'s (--image LEFT --image RIGHT)' if task.images_read > 1 else ''}; got {len(args.image)}")
    try:
        lines = task.describe(args.image, texts.get(query, []), args.top_k)
    except NotImplementedError:
        raise ValueError(f"mmoe predict has no mode for the {task.cfg.kind} task yet; call the task's predict "
                         f"method in Python (mm.load_checkpoint({args.checkpoint!r}))") from None
    for line in lines:
        print(json.dumps(line, ensure_ascii=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(f"demo: pretrain, fine-tune {', '.join(tasks)}{'' if args.no_random_init else ' (and from random weights)'},"
          f" evaluate -> {run_dir}", file=sys.stderr)
    results = run_demo(run_dir, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, tasks=tasks,
                       random_init=not args.no_random_init, progress=not args.no_progress)
    print(table(results))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        if args.to == "ours":
            report = from_beit3(args.src, args.dst, heads=args.heads, image_size=args.image_size,
                                tokenizer=args.tokenizer, tokenizer_layout=args.tokenizer_layout,
                                answers=args.answers, trust_pickle=args.trust_pickle)
        else:
            report = to_beit3(args.src, args.dst, fmt=args.to)
    except ConversionError as e:
        print(f"mmoe: conversion error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.to == "ours":
        print(f"fine-tune: mmoe finetune --config <vqa or retrieval config> --init {args.dst}")
    else:
        print(f"build it with torchscale's BEiT3(EncoderConfig(**{report.torchscale_config}))")
    return 0


def add_parsers(sub: argparse._SubParsersAction, converts: argparse._SubParsersAction) -> None:
    """Register ``finetune``, ``evaluate``, ``predict`` and ``demo`` on ``mmoe``'s parser, and
    ``beit3`` under its ``convert``."""
    finetune = sub.add_parser("finetune", help="fine-tune a task (vqa, retrieval) from a checkpoint, then evaluate")
    finetune.add_argument("--config", required=True, help="a configs/finetune preset or file")
    finetune.add_argument("--init", default=None, help="checkpoint whose backbone to start from (default: random "
                                                       "init, the baseline)")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--run-dir", default=None)
    finetune.add_argument("--resume", **RESUME)
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(run=cmd_finetune)

    evaluate = sub.add_parser("evaluate", help="evaluate a fine-tuned checkpoint; writes results.json and plots")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--config", default=None, help="task config (default: the checkpoint's own)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--out", default=None, help="output folder (default: the checkpoint's run dir)")
    evaluate.add_argument("--text-shards", nargs="+", default=None,
                          help="LM: held-out text shards for perplexity (default: the config's task.eval_shards)")
    evaluate.add_argument("--choices", default=None,
                          help='LM: a JSONL of {"context", "choices", "label"} for zero-shot multiple choice')
    evaluate.add_argument("--predict", action="store_true",
                          help="VQA, captioning: also a split without labels (VQAv2 test-dev, COCO test2014): the "
                               "evaluation server's file (vqa_predictions.json, caption_predictions.json), no scores")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    predict = sub.add_parser("predict", help="with a fine-tuned checkpoint: answer questions about an image (VQA), "
                                             "rank captions for it (retrieval), caption or classify it, or judge "
                                             "statements about a pair (NLVR2); one JSON line each")
    predict.add_argument("--checkpoint", required=True, help="a fine-tuned run or checkpoint")
    predict.add_argument("--image", required=True, action="append",
                         help="an image file (JPEG, PNG, WebP, GIF, BMP or TIFF); NLVR2: twice, left then right")
    predict.add_argument("--question", action="append", default=[], help="VQA: a question (repeatable)")
    predict.add_argument("--captions", nargs="+", default=[], help="retrieval: the captions to rank")
    predict.add_argument("--statement", action="append", default=[], help="NLVR2: a statement (repeatable)")
    predict.add_argument("--top-k", type=int, default=5, help="answers per question / captions / classes shown")
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(run=cmd_predict)

    demo = sub.add_parser("demo", help="pretrain -> fine-tune the five downstream tasks -> evaluate, on the bundled "
                                       "data")
    demo.add_argument("--run-dir", default=None, help="output folder (default: runs/demo-<time>)")
    demo.add_argument("--pretrain-steps", type=int, default=2000)
    demo.add_argument("--finetune-steps", type=int, default=1000, help="for each task's run")
    demo.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    demo.add_argument("--no-random-init", action="store_true", help="skip the fine-tuning runs from random weights")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=cmd_demo)

    convert = converts.add_parser("beit3", help="official BEiT-3 checkpoints (torchscale, unilm) to ours and back")
    convert.add_argument("--src", required=True, help="torchscale BEiT3 state dict or unilm beit3 checkpoint "
                                                      "(.pth/.pt/.safetensors); with --to torchscale|unilm: "
                                                      "a checkpoint of ours")
    convert.add_argument("--dst", required=True, help="our checkpoint directory to create; with --to "
                                                      "torchscale|unilm: the .pth file to write")
    convert.add_argument("--to", choices=["ours", "torchscale", "unilm"], default="ours",
                         help="direction: into ours (default), or ours back into torchscale's state dict or a "
                              "unilm checkpoint (dense decoupled models)")
    convert.add_argument("--heads", type=int, default=None, help="attention heads (default: width / 64)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="fine-tuning image size; the vision positions are resized (default: as trained)")
    convert.add_argument("--tokenizer", default=None, help="path of the official beit3.spm, recorded in the "
                                                           "config (default: beit3.spm)")
    convert.add_argument("--tokenizer-layout", choices=["xlmr", "beit3", "auto"], default="xlmr",
                         help="its id layout (default: xlmr, the official beit3.spm's)")
    convert.add_argument("--answers", default=None, help="unilm's answer2label.txt, to keep a VQA head; for an "
                                                         "ImageNet head, its class names, one per line (default "
                                                         "class_0 ...)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="read files that pickle Python objects besides tensors (only files you trust)")
    convert.set_defaults(run=cmd_convert)
