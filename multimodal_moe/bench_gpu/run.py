"""The run of ``mmoe bench gpu``: its options, each section in a process of its own (so that a
CUDA error or a hang in one cannot take the others with it, and one running far past the time
budget is killed with what it started), and the one JSON report."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..config import list_presets
from . import distributed, grouped_mm, presets, profile, throughput
from .harness import CHILD_GRACE_S, FULL, QUICK, Sizes, device_info, each, error_entry

__all__ = ["SECTIONS", "main"]

SECTIONS = ("presets", "grouped_mm", "distributed", "throughput", "profile")
SECTION_RUNNERS = {"presets": presets.section, "grouped_mm": grouped_mm.section, "distributed": distributed.section,
                   "throughput": throughput.section, "profile": profile.section}


def _relay(stream, tail: collections.deque) -> None:
    """Copy a child's output lines to our stderr, keeping the last ones."""
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))


def _run_section_process(section: str, argv: list[str], deadline: float) -> dict[str, Any]:
    """A section in a fresh process (``mmoe bench gpu ... --child SECTION``), killed with its own
    children if it runs :data:`CHILD_GRACE_S` past the budget; its JSON, or why there is none."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        result = Path(tmp) / f"{section}.json"
        cmd = [sys.executable, "-m", "multimodal_moe.cli", "bench", "gpu", *argv, "--child", section,
               "--child-out", str(result), "--deadline", repr(deadline)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group, torchrun's ranks included
        tail: collections.deque = collections.deque(maxlen=20)
        relay = threading.Thread(target=_relay, args=(proc.stdout, tail), daemon=True)
        relay.start()
        timeout = max(deadline - time.time(), 0) + CHILD_GRACE_S
        try:
            proc.wait(timeout=timeout)
        except BaseException as e:  # past its grace, or we are interrupted: it goes, and what it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            relay.join(timeout=5)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return {"ok": False, "error": f"killed after {timeout:.0f} s, {CHILD_GRACE_S} s past the time budget",
                    "output_tail": list(tail)}
        relay.join()
        if proc.returncode or not result.is_file():
            return {"ok": False, "error": f"the section's process exited with status {proc.returncode}",
                    "output_tail": list(tail)}
        return json.loads(result.read_text())


def _strict_json(tree: Any) -> Any:
    """``tree`` with non-finite floats as the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(tree, dict):
        return {k: _strict_json(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_strict_json(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return str(tree)
    return tree


def _names(text: str | None, known: list[str] | tuple[str, ...], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--{what}: unknown {unknown or text!r}; choose among {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmoe bench gpu", description="A one-command acceptance run on a GPU: does the "
                                                                   "toolkit work on CUDA, and how fast?")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run at debug sizes")
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller batches (a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--presets", default=None, help="comma-separated debug presets for the presets section "
                                                   "(default: every *debug* preset)")
    p.add_argument("--throughput-presets", default=None,
                   help=f"comma-separated presets to time (default: {', '.join(throughput.THROUGHPUT_PRESETS)}; "
                        "on a CPU their debug twins)")
    p.add_argument("--encoder-batch", type=int, default=None,
                   help="throughput: samples per stream (default 32; 8 with --quick, 4 on a CPU)")
    p.add_argument("--text-len", type=int, default=None,
                   help="throughput: encoder text tokens (default 64; 32 with --quick, 16 on a CPU)")
    p.add_argument("--lm-batch", type=int, default=None, help="throughput: LM sequences (default 32; 4 on a CPU)")
    p.add_argument("--lm-seq", type=int, default=None,
                   help="throughput: LM tokens per sequence, raising a preset's max_seq_len if needed (default "
                        "1024; 256 with --quick, 64 on a CPU)")
    p.add_argument("--nproc", type=int, default=None, help="distributed: processes (default: 2 with two GPUs or "
                                                           "more, else 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device for MFU (default: "
                                                                   "from the table of known devices)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no new section or preset after this many "
                                                                 "seconds (default 450)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                             "run it on a machine with a GPU, or pass --device cpu for a CPU smoke run")
        sections = _names(args.sections, SECTIONS, "sections")
        args.presets = _names(args.presets, presets.debug_presets(), "presets")
        args.throughput_presets = _names(args.throughput_presets, list_presets(), "throughput-presets")
    except (RuntimeError, ValueError) as e:  # torch.device("nope") raises RuntimeError
        print(f"mmoe bench gpu: error: {e}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    if args.child:
        try:
            result = SECTION_RUNNERS[args.child](args, device, plan, args.deadline)
        except Exception as e:
            result = error_entry(e)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    start = time.time()
    deadline = start + args.budget_s
    report: dict[str, Any] = {"ok": False, "device": device_info(device),
                              "options": {"quick": args.quick, "sections": sections, "budget_s": args.budget_s,
                                          "sizes": dataclasses.asdict(Sizes.resolve(args, device))}}
    jobs = {section: lambda section=section: _run_section_process(section, argv, deadline) for section in sections}
    report.update(each("section", jobs, deadline))
    report["ok"] = all(report[s]["ok"] for s in sections)
    report["seconds"] = round(time.time() - start, 1)
    text = json.dumps(_strict_json(report), indent=2, allow_nan=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1
