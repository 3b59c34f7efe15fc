"""``parallelize(task, env, ...)``: DDP, FSDP2 or DDP + expert parallelism around a task.

- ``ddp``: parameters replicated, gradients all-reduced (averaged) by DDP.
- ``fsdp``: FSDP2 (``fully_shard``) on every Transformer block and then on the whole task:
  parameters, gradients and optimizer state sharded over the ranks; gradients averaged by the
  reduce-scatter. Checkpoints of such runs are sharded (``torch.distributed.checkpoint``).
- ``expert_parallel = k > 1`` (with ``ddp``): consecutive groups of k ranks split the experts of
  every top-k / MH-MoE layer (``distributed.expert_parallel``). Expert parameters are kept out of
  DDP's all-reduce; their gradients (which already sum the contributions of their group's
  ranks) are summed over the ranks that hold the same experts and divided by the world size, so
  every parameter gets the gradient of the mean loss over all ranks, as without parallelism.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .env import DistEnv
from .expert_parallel import consolidate_experts, localize_experts, shard_experts

__all__ = ["Parallel", "parallelize"]

DataParallel = Literal["ddp", "fsdp"]


@dataclass
class Parallel:
    """A task prepared for this process: call ``module``; the rest serves the training step.

    Attributes:
        module: what to call (the task, or its DDP/FSDP wrapper).
        task: the unwrapped task (its parameters are what the optimizer updates).
        env: rank, world, device.
        kind: none | ddp | fsdp.
        expert_names: names of the expert-parallel (sharded) parameters.
        expert_group / expert_replica_group: the ranks that split one layer's experts / the ranks
            that hold the same experts.
    """

    module: nn.Module
    task: nn.Module
    env: DistEnv
    kind: Literal["none", "ddp", "fsdp"] = "none"
    expert_names: list[str] = field(default_factory=list)
    expert_group: object = None
    expert_replica_group: object = None

    def expert_params(self) -> list[nn.Parameter]:
        params = dict(self.task.named_parameters())
        return [params[n] for n in self.expert_names]

    def sync(self, enabled: bool):
        """Context for a micro-batch's backward: gradient sync only on the last one."""
        if self.kind == "ddp" and not enabled:
            return self.module.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def finish_grads(self) -> None:
        """After backward: average the expert gradients that DDP left alone."""
        if not self.expert_names:
            return
        for p in self.expert_params():
            if p.grad is None:
                continue
            if self.expert_replica_group is not None:
                dist.all_reduce(p.grad, group=self.expert_replica_group)
            p.grad.div_(self.env.world)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients to a global norm of ``max_norm`` (inf: only measure); the norm."""
        grads_of = lambda ps: [p.grad for p in ps if p.grad is not None]  # noqa: E731
        if not self.expert_names:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.task.parameters() if p.requires_grad], max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        experts = {id(p) for p in self.expert_params()}
        replicated = grads_of(p for p in self.task.parameters() if id(p) not in experts)
        sharded = grads_of(self.expert_params())
        device = self.env.device
        sq = torch.nn.utils.get_total_norm(replicated).pow(2) if replicated else torch.zeros((), device=device)
        sq_experts = torch.nn.utils.get_total_norm(sharded).pow(2) if sharded else torch.zeros((), device=device)
        dist.all_reduce(sq_experts, group=self.expert_group)  # one replica's shards make the whole
        norm = (sq + sq_experts).sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(list(self.task.parameters()), max_norm, norm)
        return norm


    # -- checkpoints: one full state in the files whatever the layout, FSDP2's sharded beside it --

    def full_state(self, optimizer: torch.optim.Optimizer, sharded_dir: Path) -> tuple[dict, dict | None]:
        """The task's whole state dict and the optimizer's, as one process would hold them (every
        rank calls it). FSDP2 also saves its sharded model and optimizer into ``sharded_dir``
        (``torch.distributed.checkpoint``) and returns no optimizer state; expert parallelism
        gathers every rank's experts (``consolidate_experts``)."""
        if self.kind == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            dcp.save({"model": get_model_state_dict(self.task),
                      "optimizer": get_optimizer_state_dict(self.task, optimizer)}, checkpoint_id=sharded_dir)
            return get_model_state_dict(self.task, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True)), None
        if self.expert_names:
            return consolidate_experts(self.task.state_dict(), optimizer.state_dict(), optimizer=optimizer,
                                       model=self.task, expert_names=self.expert_names, group=self.expert_group)
        return self.task.state_dict(), optimizer.state_dict()

    def load_state(self, optimizer: torch.optim.Optimizer, *, sharded_dir: Path | None, full: Callable[[], dict],
                   optimizer_state: dict | None, load: Callable[[dict], None]) -> None:
        """Restore what :meth:`full_state` saved: from ``sharded_dir`` when the checkpoint has
        FSDP2 shards, else ``full()`` (the whole task state) through ``load`` (a strict load into
        the task) and ``optimizer_state``, each rank taking its own experts."""
        if sharded_dir is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            sharded = {"model": get_model_state_dict(self.task),
                       "optimizer": get_optimizer_state_dict(self.task, optimizer)}
            dcp.load(sharded, checkpoint_id=sharded_dir)
            set_model_state_dict(self.task, sharded["model"])
            set_optimizer_state_dict(self.task, optimizer, sharded["optimizer"])
            return
        state = full()
        if self.expert_names:
            state, optimizer_state = localize_experts(state, optimizer_state, optimizer=optimizer, model=self.task,
                                                      expert_names=self.expert_names, group=self.expert_group)
        load(state)
        optimizer.load_state_dict(optimizer_state)


def _expert_groups(env: DistEnv, k: int):
    """(this rank's group of k consecutive ranks, its group of ranks holding the same experts)."""
    if env.world % k:
        raise ValueError(f"train.expert_parallel={k} does not divide the world size {env.world}")
    mine = replicas = None
    for start in range(0, env.world, k):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + k)))
        if start <= env.rank < start + k:
            mine = group
    if env.world > k:
        for offset in range(k):
            group = dist.new_group(list(range(offset, env.world, k)))
            if env.rank % k == offset:
                replicas = group
    return mine, replicas


def parallelize(task: nn.Module, env: DistEnv, *, data_parallel: DataParallel = "ddp", expert_parallel: int = 1,
                find_unused_parameters: bool = False) -> Parallel:
    """Wrap ``task`` (already on ``env.device``) for this process; a world of one is left alone."""
    if not env.distributed:
        if expert_parallel > 1:
            raise ValueError(f"train.expert_parallel={expert_parallel} needs that many processes (torchrun)")
        return Parallel(task, task, env)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    if data_parallel == "fsdp":
        if expert_parallel > 1:
            raise ValueError("expert parallelism runs with train.data_parallel=ddp; FSDP2 shards experts as "
                             "ordinary parameters already")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world,))
        for block in task.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(task, mesh=mesh)
        return Parallel(task, task, env, "fsdp")
    names, group, replicas = [], None, None
    if expert_parallel > 1:
        group, replicas = _expert_groups(env, expert_parallel)
        names = shard_experts(task, group)
        if not names:
            raise ValueError("train.expert_parallel > 1 but the model has no top-k or MH-MoE layer")
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, names)
    module = DistributedDataParallel(task, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    return Parallel(module, task, env, "ddp", names, group, replicas)
