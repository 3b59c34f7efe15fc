"""The ``mmoe`` command line.

    mmoe pretrain [--config PRESET] [--set k=v ...] [--run-dir DIR] [--resume] [--init CKPT]   train a task
    mmoe finetune --config PRESET [--init CKPT]   fine-tune a downstream task, then evaluate
    mmoe evaluate --checkpoint CKPT               results.json and plots of a fine-tuned checkpoint
    mmoe predict --checkpoint CKPT --image X      answers (--question Q), a caption ranking (--captions ...),
                                                  a caption, classes; NLVR2: two --image, --statement S
    mmoe demo [--run-dir DIR] [--tasks T,...]     pretrain -> fine-tune the five tasks (and from scratch)
                                                  -> evaluate -> one table
    mmoe convert beit3 --src FILE --dst DIR       official BEiT-3 checkpoints in (and out: --to torchscale|unilm)
    mmoe convert mot-to-topk RUN --dst DIR        Mixture of Tokens -> top-k MoE (transition tuning)
    mmoe convert upcycle RUN --config PRESET --dst DIR   dense -> MoE, experts copied (sparse upcycling)
    mmoe inspect RUN_DIR                          loss curves, expert-load heatmaps, summary table
    mmoe compare RUN_DIR... [--out DIR]           runs side by side: loss, perplexity, MoE stats; PNGs
    mmoe presets                                  list the bundled presets and what they are
    mmoe smoke [--config PRESET] [--set k=v ...]  build a preset, run forward/backward steps
    mmoe bench moe [...]                          FFN family speed at equal active FLOPs, JSON
    mmoe bench gpu [--out FILE] [--quick]         CUDA acceptance run: training, kernels, torchrun, speed
    mmoe data {write-shards,inspect,train-tokenizer,build-demo} ...   data_pipelines.cli

The downstream tasks' commands (finetune, evaluate, predict, demo, convert beit3) are in
``eval_tasks.cli``, the data commands in ``data_pipelines.cli``; this module adds both to its parser.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import build_model, load_config
from .config import list_presets, resolve_preset
from .configurable import ConfigError
from .smoke import run_smoke

DEFAULT_PRESET = "configs/beit3/debug.yaml"
DEFAULT_PRETRAIN_PRESET = "configs/pretrain/debug.yaml"


def _preset_summary(name: str) -> str:
    """The first sentence of a preset's header comment."""
    header = []
    for line in resolve_preset(name).read_text().splitlines():
        if not line.startswith("#") or line.startswith("# Launch:"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def cmd_presets(args: argparse.Namespace) -> int:
    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {_preset_summary(name)}")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg).to(device)
    print(f"smoke run (forward/backward on synthetic inputs, not training): {args.config} on {device}")
    report = run_smoke(model, cfg.model, steps=args.steps, batch_size=args.batch_size, seed=cfg.seed, progress=True)
    print(json.dumps({
        "config": str(args.config),
        "parameters": report.parameters,
        "losses": [round(x, 6) for x in report.losses],
        "seconds_per_step": round(report.seconds_per_step, 4),
        "params_without_grad": report.params_without_grad,
        "ok": report.ok,
    }))
    if report.ok:
        print(f"ok: {report.parameters:,} parameters, {len(report.losses)} steps, stand-in loss "
              f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}, {report.seconds_per_step:.3f} s/step, "
              "every parameter received a gradient")
        return 0
    problems = [f"{len(report.params_without_grad)} parameters got no gradient"] if report.params_without_grad else []
    if not all(math.isfinite(x) for x in report.losses):
        problems.append("the loss is not finite")
    print(f"smoke FAILED: {'; '.join(problems)}", file=sys.stderr)
    return 1


def run_dir_of(args: argparse.Namespace) -> str | None:
    """``--run-dir``, or ``runs/<preset>-<time>`` for a fresh single-process run; None (with the
    error said) where one must be given."""
    if args.run_dir is not None:
        return args.run_dir
    if args.resume or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        print(f"mmoe: error: {'--resume' if args.resume else 'torchrun'} needs --run-dir", file=sys.stderr)
        return None
    return f"runs/{Path(str(args.config)).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_into(args: argparse.Namespace, cfg, command: str, run_dir: str) -> int:
    """Run ``cfg``'s training into ``run_dir``, from ``args.init`` if given; the exit code."""
    from .training import TrainingDiverged, TrainingStopped, train

    main_rank = int(os.environ.get("RANK", 0)) == 0
    if main_rank:
        print(f"{command} {args.config} ({cfg.task.kind} task, {cfg.train.steps} steps) -> {run_dir}",
              file=sys.stderr)
    try:
        result = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress, init=args.init)
    except TrainingDiverged as e:
        print(f"mmoe: error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if main_rank:
            print(f"mmoe: {e} --run-dir {run_dir}", file=sys.stderr)
        return 128 + 15  # the conventional exit status of a SIGTERM
    except KeyboardInterrupt:
        print(f"\nmmoe: interrupted; continue with the same command and --run-dir {run_dir} --resume",
              file=sys.stderr)
        return 130
    if main_rank and not result.records:
        print(f"mmoe: {run_dir} has already finished its {result.step} steps; nothing to do (raise "
              f"train.steps with --set to train on)", file=sys.stderr)
    elif main_rank:
        first, last = result.records[0], result.records[-1]
        print(f"done: {result.step} steps, loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
              f"(step {last['step']}); checkpoint {Path(run_dir) / 'checkpoints' / 'latest'}; "
              f"plots: mmoe inspect {run_dir}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    start = args.init if args.init is not None else args.run_dir if args.resume else None
    if args.config is None and start is not None:  # the config the run (or the --init checkpoint) has
        from .training.checkpoint import CONFIG_FILE, find_checkpoint

        args.config = str(find_checkpoint(start) / CONFIG_FILE)
    args.config = args.config or DEFAULT_PRETRAIN_PRESET
    run_dir = run_dir_of(args)
    return 2 if run_dir is None else train_into(args, load_config(args.config, args.set), "pretrain", run_dir)


def cmd_convert_mot(args: argparse.Namespace) -> int:
    from .config import overrides_tree
    from .transition import mot_to_topk

    path = mot_to_topk(args.src, args.dst, top_k=args.top_k, **overrides_tree(args.set))
    print(f"converted: {path} (top-{args.top_k} MoE, the MoT controllers as routers)\n"
          f"transition-tune: mmoe pretrain --init {args.dst} --run-dir RUN [--set train.steps=N]")
    return 0


def cmd_convert_upcycle(args: argparse.Namespace) -> int:
    from .upcycle import upcycle

    path = upcycle(args.src, args.dst, load_config(args.config, args.set), noise=args.noise)
    print(f"upcycled: {path} ({args.config}, every expert a copy of its layer's dense FFN, routers fresh)\n"
          f"train it: mmoe pretrain --init {args.dst} --run-dir RUN")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_run

    print(inspect_run(args.run_dir, plots=not args.no_plots))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs, format_table

    labels = [label.strip() for label in args.labels.split(",")] if args.labels is not None else None
    summary = compare_runs(args.run_dirs, args.out, labels=labels)
    print(format_table(summary))
    print(f"\n{Path(args.out) / 'compare.json'}; plots: {', '.join(summary['plots'])}")
    return 0


BENCH_SUITES = {"moe": "bench", "gpu": "bench_gpu"}  # suite -> module of this package whose main(argv) runs it


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(f".{BENCH_SUITES[args.suite]}", __package__).main(args.args)


# --resume: the latest checkpoint; --resume=latest-intact: the newest one whose checksums hold
RESUME = dict(nargs="?", const="latest", default=None, choices=["latest", "latest-intact"],
              help="continue the run in --run-dir from its latest checkpoint (=latest-intact: from the newest one "
                   "whose files are intact, naming the corrupt ones it passes over)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmoe", description="Multiway Transformers with Mixture-of-Experts FFNs.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    sub = p.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="train a preset's task (default: masked data modeling of a small "
                                               "MoE Multiway encoder on the bundled data)")
    pretrain.add_argument("--config", default=None,
                          help=f"preset file or name (default: the config of the run resumed or of the --init "
                               f"checkpoint, else {DEFAULT_PRETRAIN_PRESET})")
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set train.steps=50 (repeatable)")
    pretrain.add_argument("--run-dir", default=None, help="output folder (default: runs/<preset>-<time>)")
    pretrain.add_argument("--resume", **RESUME)
    pretrain.add_argument("--init", default=None, help="a checkpoint to start a new run from: its backbone, and its "
                                                       "heads when they are this task's (step 0, a new optimizer)")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.set_defaults(run=cmd_pretrain)

    converts = sub.add_parser("convert", help="official BEiT-3 checkpoints in and out; Mixture of Tokens to "
                                              "top-k").add_subparsers(dest="source", required=True)
    mot = converts.add_parser("mot-to-topk", help="transition tuning: a Mixture-of-Tokens run's model as a top-k "
                                                  "MoE, to train on with mmoe pretrain --init")
    mot.add_argument("src", metavar="RUN", help="the MoT run dir or checkpoint")
    mot.add_argument("--dst", required=True, help="the run dir to create, holding the converted checkpoint")
    mot.add_argument("--top-k", type=int, default=1, help="experts per token (default: 1, as the MoT paper)")
    mot.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="another setting of the top-k MoE, e.g. --set capacity_factor=1.25 (repeatable)")
    mot.set_defaults(run=cmd_convert_mot)
    up = converts.add_parser("upcycle", help="sparse upcycling: a dense run's model as a MoE preset, every expert a "
                                             "copy of its layer's FFN, to train on with mmoe pretrain --init")
    up.add_argument("src", metavar="RUN", help="the dense run dir or checkpoint")
    up.add_argument("--config", required=True, help="the MoE preset to upcycle into (the dense model's architecture "
                                                    "but for its MoE layers)")
    up.add_argument("--dst", required=True, help="the run dir to create, holding the upcycled checkpoint")
    up.add_argument("--noise", type=float, default=0.0,
                    help="Gaussian noise on each copied matrix, times its standard deviation (default: 0)")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value of the preset, e.g. --set model.moe_ffn.bias=true (repeatable)")
    up.set_defaults(run=cmd_convert_upcycle)

    from eval_tasks.cli import add_parsers as add_task_parsers  # finetune, evaluate, predict, demo, convert beit3

    add_task_parsers(sub, converts)

    inspect = sub.add_parser("inspect", help="summarise a run: table of losses and expert load, PNG plots")
    inspect.add_argument("run_dir")
    inspect.add_argument("--no-plots", action="store_true", help="only print the summary")
    inspect.set_defaults(run=cmd_inspect)

    compare = sub.add_parser("compare", help="compare runs: one table (loss, perplexity, MoE statistics) and PNG "
                                             "plots over steps")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default="compare", help="output folder (default: compare)")
    compare.add_argument("--labels", default=None, metavar="A,B,...",
                         help="comma-separated names of the runs (default: their folders' names)")
    compare.set_defaults(run=cmd_compare)

    presets = sub.add_parser("presets", help="list the bundled presets")
    presets.set_defaults(run=cmd_presets)

    smoke = sub.add_parser("smoke", help="forward/backward smoke run of a preset on synthetic inputs")
    smoke.add_argument("--config", default=DEFAULT_PRESET, help=f"preset file or name (default: {DEFAULT_PRESET})")
    smoke.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.depth=4 (repeatable)")
    smoke.add_argument("--steps", type=int, default=5)
    smoke.add_argument("--batch-size", type=int, default=2)
    smoke.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    smoke.set_defaults(run=cmd_smoke)

    bench = sub.add_parser("bench", help="benchmarks, JSON out (mmoe bench moe --help, mmoe bench gpu --help)",
                           add_help=False)
    bench.add_argument("suite", choices=sorted(BENCH_SUITES))
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=cmd_bench)

    from data_pipelines.cli import add_parser as add_data_parser

    add_data_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .training import CheckpointError, RunDirLocked

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, CheckpointError,
            RunDirLocked) as e:  # bad input: its message, one line (exit 2; 1 for a run dir or checkpoint)
        if args.debug:
            raise
        print(f"mmoe: {'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 1 if isinstance(e, (CheckpointError, RunDirLocked)) else 2


if __name__ == "__main__":
    sys.exit(main())
