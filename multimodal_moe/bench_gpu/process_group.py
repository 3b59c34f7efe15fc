"""Checks of a real process group of one: collectives, DDP, FSDP2 and expert parallelism on NCCL.

The ``distributed`` section of ``mmoe bench gpu`` runs

    torchrun --standalone --nproc_per_node 1 -m multimodal_moe.bench_gpu.process_group --device cuda --out pg.json

At world size 1 the trainer starts no process group and wraps nothing
(``multimodal_moe/distributed/env.py``, :func:`~multimodal_moe.distributed.parallelize`), so its
torchrun launches on one GPU never reach NCCL. This process starts one itself (``cuda:nccl,cpu:gloo``
on a GPU, ``gloo`` with ``--device cpu``), checks that it got that backend, and then

- ``collectives``: ``all_reduce``, ``all_gather_into_tensor`` and ``all_to_all_single`` with
  uneven splits on device tensors against the values they must give (small integers in fp32,
  compared exactly);
- ``ddp``, ``fsdp``, ``expert_parallel``: one forward and backward in fp32 of a dropless
  ``lm/openmoe_debug`` (top-2 of 4 SwiGLU experts) through ``DistributedDataParallel``, FSDP2
  (``fully_shard`` on every block and the task, on a one-device mesh, as ``parallelize`` shards)
  and expert parallelism (:func:`~multimodal_moe.distributed.expert_parallel.shard_experts`: every
  MoE layer's all-to-all path, on one rank), each on a copy of the same initial weights and on the
  same batch as the plain model: the loss and every parameter's gradient within
  :data:`TOLERANCE`.

It writes one JSON object to ``--out``; its ``ok`` needs every check.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import load_config
from ..distributed.expert_parallel import shard_experts
from ..training import build_task
from .harness import each, error_entry

__all__ = ["PRESET", "TOLERANCE", "check", "collectives", "main"]

PRESET = "lm/openmoe_debug"
OVERRIDES = ["model.moe_ffn.capacity_factor=null"]  # dropless: no token's output depends on where it was dropped
TOLERANCE = 1e-5  # max abs error of the loss and of every gradient entry, fp32


def collectives(device: torch.device) -> dict[str, Any]:
    """The collectives the trainer and expert parallelism use, on ``device`` tensors, against what
    they must give on W ranks (here W = 1): exactly, the values being small integers."""
    W, r = dist.get_world_size(), dist.get_rank()

    def arange(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32, device=device)

    summed = arange(5) * (r + 1)
    dist.all_reduce(summed)
    gathered = torch.empty(3 * W, device=device)
    dist.all_gather_into_tensor(gathered, arange(3) + 10 * r)
    # rank r sends 2r + j + 3 rows of 4 to rank j, each row's values 100 x sender + 10 x receiver + its index
    send, recv = [2 * r + j + 3 for j in range(W)], [2 * s + r + 3 for s in range(W)]
    rows = torch.cat([100 * r + 10 * j + arange(n) for j, n in enumerate(send)])[:, None].repeat(1, 4)
    arrived = rows.new_empty(sum(recv), 4)
    dist.all_to_all_single(arrived, rows, recv, send)
    expected = torch.cat([100 * s + 10 * r + arange(n) for s, n in enumerate(recv)])[:, None].repeat(1, 4)
    pairs = {"all_reduce": (summed, arange(5) * (W * (W + 1) // 2)),
             "all_gather_into_tensor": (gathered, torch.cat([arange(3) + 10 * s for s in range(W)])),
             "all_to_all_single": (arrived, expected)}
    results: dict[str, Any] = {}
    for name, (got, want) in pairs.items():
        error = (got - want).abs().max().item() if got.shape == want.shape else math.inf
        results[name] = {"ok": error == 0.0, "max_abs_error": error}
    results["all_to_all_single"].update(send_splits=send, recv_splits=recv)
    return {"ok": all(r["ok"] for r in results.values()), **results}


def _forward_backward(task: nn.Module, module: nn.Module, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of ``module(batch)`` and, after its backward, the whole gradient of each of
    ``task``'s parameters (zeros for one without; an FSDP2 DTensor gathered)."""
    torch.manual_seed(0)
    loss = module(batch).loss
    loss.backward()
    grads = {}
    for name, p in task.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return loss.item(), grads


def _against(reference: tuple[float, dict[str, torch.Tensor]], task: nn.Module,
             wrap: Callable[[nn.Module], tuple[nn.Module, dict[str, Any]]], batch) -> dict[str, Any]:
    """The loss and gradients of ``task`` run as ``wrap`` makes it against the plain model's."""
    module, details = wrap(task)
    ref_loss, ref_grads = reference
    loss, grads = _forward_backward(task, module, batch)
    if grads.keys() != ref_grads.keys():
        raise ValueError(f"the wrapped task's parameters are not the plain task's: "
                         f"{sorted(grads.keys() ^ ref_grads.keys())[:5]} differ")
    errors = {}
    for name, ref in ref_grads.items():
        if grads[name].shape != ref.shape:
            raise ValueError(f"{name}: gradient of shape {tuple(grads[name].shape)}, the plain model's "
                             f"{tuple(ref.shape)}")
        errors[name] = (grads[name] - ref).abs().max().item()
    worst = max(errors, key=errors.get)
    loss_error = abs(loss - ref_loss)
    return {"ok": loss_error <= TOLERANCE and errors[worst] <= TOLERANCE, "loss": loss, "loss_abs_error": loss_error,
            "max_grad_abs_error": errors[worst], "worst_parameter": worst, "parameters": len(errors), **details}


def _wrappers(device: torch.device) -> dict[str, Callable[[nn.Module], tuple[nn.Module, dict[str, Any]]]]:
    """Each way of running a task on the process group: the module to call, and what to report."""

    def ddp(task):
        return DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=not task.uses_every_parameter()), {}

    def fsdp(task):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (1,))
        for block in task.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(task, mesh=mesh), {"mesh": str(mesh)}

    def expert_parallel(task):
        names = shard_experts(task, dist.group.WORLD)
        if not names:
            raise ValueError(f"{PRESET} has no top-k MoE layer for shard_experts to shard")
        return task, {"sharded_parameters": names}

    return {"ddp": ddp, "fsdp": fsdp, "expert_parallel": expert_parallel}


def check(device: torch.device, deadline: float) -> dict[str, Any]:
    """Every check of this module on the process group already started; one JSON entry."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, for the fp32 tolerance
    task = build_task(load_config(PRESET, OVERRIDES)).to(device)
    batch = next(iter(task.train_data(seed=0, num_workers=0))).to(device)
    wrappers = _wrappers(device)
    copies = {name: copy.deepcopy(task) for name in wrappers}  # before any gradient exists
    reference = _forward_backward(task, task, batch)
    jobs = {"collectives": lambda: collectives(device),
            **{name: lambda name=name, wrap=wrap: _against(reference, copies[name], wrap, batch)
               for name, wrap in wrappers.items()}}
    results = each("distributed process_group", jobs, deadline,
                   lambda r: f"max grad error {r['max_grad_abs_error']:.1e}" if "max_grad_abs_error" in r else "")
    return {"ok": all(r["ok"] for r in results.values()), "preset": PRESET, "overrides": OVERRIDES,
            "plain_loss": reference[0], "plain_max_abs_grad": max(g.abs().max().item() for g in reference[1].values()),
            "tolerance": TOLERANCE, **results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multimodal_moe.bench_gpu.process_group",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (NCCL), cuda:N, or cpu (gloo)")
    p.add_argument("--out", required=True, help="where to write the JSON")
    p.add_argument("--deadline", type=float, default=math.inf, help="start no check after this time (epoch s)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 0))
    if world != 1:
        p.error(f"WORLD_SIZE is {world or 'unset'}: run it under torchrun --nproc_per_node 1 (with more "
                "processes each rank would read other batches; the torchrun launches of mmoe pretrain cover "
                "larger worlds)")
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        out: dict[str, Any] = {"ok": False, "backend": dist.get_backend(), "expected_backend": backend,
                               "world": dist.get_world_size(), "device": str(device),
                               "nccl_version": (".".join(map(str, torch.cuda.nccl.version()))
                                                if device.type == "cuda" else None)}
        try:
            out.update(check(device, args.deadline))
        except Exception as e:
            out.update(error_entry(e))
        out["ok"] = out["ok"] and out["backend"] == backend
    finally:
        dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
