"""The ``mmoe`` command line.

    mmoe pretrain [--config PRESET] [--set k=v ...] [--run-dir DIR] [--resume]   train a task
    mmoe inspect RUN_DIR                          loss curves, expert-load heatmaps, summary table
    mmoe presets                                  list the bundled presets and what they are
    mmoe smoke [--config PRESET] [--set k=v ...]  build a preset, run forward/backward steps
    mmoe bench moe [...]                          FFN family speed at equal active FLOPs, JSON
    mmoe data {write-shards,inspect,train-tokenizer,build-demo} ...   data_pipelines.cli
"""

from __future__ import annotations

import argparse
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .training import CheckpointError, TrainingDiverged, train

    cfg = load_config(args.config, args.set)
    distributed, main_rank = int(os.environ.get("WORLD_SIZE", 1)) > 1, int(os.environ.get("RANK", 0)) == 0
    if args.run_dir is None:
        if args.resume or distributed:
            print(f"mmoe: error: {'--resume' if args.resume else 'torchrun'} needs --run-dir", file=sys.stderr)
            return 2
        args.run_dir = f"runs/{Path(str(args.config)).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if main_rank:
        print(f"pretrain {args.config} ({cfg.task.kind} task, {cfg.train.steps} steps) -> {args.run_dir}",
              file=sys.stderr)
    try:
        result = train(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    except (CheckpointError, TrainingDiverged) as e:
        print(f"mmoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmmoe: interrupted; continue with: mmoe pretrain --config {args.config} --run-dir {args.run_dir} "
              f"--resume", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    first, last = result.records[0], result.records[-1]
    print(f"done: {result.step} steps, loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
          f"(step {last['step']}); checkpoint {Path(args.run_dir) / 'checkpoints' / 'latest'}; "
          f"plots: mmoe inspect {args.run_dir}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_run

    print(inspect_run(args.run_dir, plots=not args.no_plots))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_moe_main

    return bench_moe_main(args.args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmoe", description="Multiway Transformers with Mixture-of-Experts FFNs.")
    sub = p.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="train a preset's task (default: masked data modeling of a small "
                                               "MoE Multiway encoder on the bundled data)")
    pretrain.add_argument("--config", default=DEFAULT_PRETRAIN_PRESET,
                          help=f"preset file or name (default: {DEFAULT_PRETRAIN_PRESET})")
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set train.steps=50 (repeatable)")
    pretrain.add_argument("--run-dir", default=None, help="output folder (default: runs/<preset>-<time>)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest "
                                                                "checkpoint")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.set_defaults(run=cmd_pretrain)

    inspect = sub.add_parser("inspect", help="summarise a run: table of losses and expert load, PNG plots")
    inspect.add_argument("run_dir")
    inspect.add_argument("--no-plots", action="store_true", help="only print the summary")
    inspect.set_defaults(run=cmd_inspect)

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

    bench = sub.add_parser("bench", help="speed benchmarks, JSON out (mmoe bench moe --help)", add_help=False)
    bench.add_argument("suite", choices=["moe"])
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=cmd_bench)

    from data_pipelines.cli import add_parser as add_data_parser

    add_data_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"mmoe: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"mmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
