"""Expert parallelism: the experts of each MoE layer sharded across an expert-parallel group,
tokens sent to their experts' ranks and back by an autograd all-to-all.

GShard (arXiv 2006.16668) and Switch Transformers (arXiv 2101.03961) place E/R experts on each
of R ranks. :func:`shard_experts` swaps every :class:`~multimodal_moe.layers.experts.GroupedExperts`
of a model (top-k and Multi-Head MoE) for an :class:`ExpertParallelExperts` holding this rank's
slice under the same parameter names, so routing, losses and statistics are untouched: the
router still sorts assignments by (global) expert, and the swapped module

1. exchanges how many rows each rank sends to each of the receiver's experts (all-to-all of counts),
2. sends the rows and their gates (all-to-all with uneven splits; its backward is the reverse all-to-all),
3. reorders what arrived (grouped by source rank, then expert) by local expert, runs its
   experts as one grouped matmul, restores the arrival order,
4. sends the outputs back.

Gradients of the local experts hold the contributions of every rank of the group; the trainer
(``distributed.parallelize``) keeps them out of DDP's all-reduce and averages them itself.
Mixture of Tokens needs no all-to-all: every expert sees every group's mixture, so its experts
are sharded as ordinary parameters (FSDP) instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..layers.experts import GroupedExperts
from ..layers.moe import TopKMoE

__all__ = ["ExpertParallelExperts", "all_to_all", "consolidate_experts", "localize_experts", "shard_experts"]


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split ``send`` per rank go out; ``recv`` per rank come in. Backward sends
    the gradient the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group=None) -> torch.Tensor:
    """Differentiable all-to-all of rows with uneven splits."""
    return _AllToAll.apply(x, send, recv, group)


class ExpertParallelExperts(GroupedExperts):
    """This rank's E/R experts of a layer; called like :class:`GroupedExperts` over all E.

    Args:
        experts: the layer's full set of experts (identical on every rank of the group).
        group: the expert-parallel process group (None: the default group).
    """

    holds_all_experts = False  # rows come sorted; the (E, C) layout would need every expert here

    def __init__(self, experts: GroupedExperts, group=None):
        nn.Module.__init__(self)
        self.group = group
        self.ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = experts.w1_EDF.shape[0]
        if self.num_experts % self.ranks:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over an expert-parallel group of "
                             f"{self.ranks}; choose train.expert_parallel among the divisors of num_experts")
        self.local_experts = self.num_experts // self.ranks
        span = slice(self.rank * self.local_experts, (self.rank + 1) * self.local_experts)
        for name in GroupedExperts.PER_EXPERT:
            full = getattr(experts, name)
            setattr(self, name, None if full is None else nn.Parameter(full.detach()[span].clone()))
        self.activation = experts.activation

    def forward(self, x_MD: torch.Tensor, offsets_E: torch.Tensor, scale_M: torch.Tensor | None = None
                ) -> torch.Tensor:
        """As :meth:`GroupedExperts.forward`; only the rows up to the last offset (no dropped or
        padding assignment) cross the all-to-all."""
        R, El = self.ranks, self.local_experts
        counts_RE = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long)).reshape(R, El)
        recv_counts_RE = torch.empty_like(counts_RE)  # [source rank, my expert]
        dist.all_to_all_single(recv_counts_RE, counts_RE, group=self.group)
        # the one host sync of a layer: an all-to-all with uneven splits takes its sizes on the host
        send, recv = counts_RE.sum(1).tolist(), recv_counts_RE.sum(1).tolist()
        routed = sum(send)
        x_recv = all_to_all(x_MD[:routed], send, recv, self.group)
        scale_recv = None if scale_M is None else all_to_all(scale_M[:routed], send, recv, self.group)

        # arrivals are grouped by (source rank, expert); the grouped matmul wants (expert, source rank)
        segment = torch.repeat_interleave(torch.arange(R * El, device=x_MD.device), recv_counts_RE.flatten(),
                                          output_size=sum(recv))
        order = ((segment % El) * R + segment // El).argsort(stable=True)
        y_sorted = super().forward(x_recv[order], recv_counts_RE.sum(0).cumsum(0).to(torch.int32),
                                   None if scale_recv is None else scale_recv[order])
        y_recv = y_sorted[order.argsort()]
        y_MD = all_to_all(y_recv, recv, send, self.group)
        return torch.cat([y_MD, y_MD.new_zeros(x_MD.shape[0] - routed, y_MD.shape[1])])

    def extra_repr(self) -> str:
        return f"experts {self.rank * self.local_experts}-{(self.rank + 1) * self.local_experts - 1} " \
               f"of {self.num_experts} on rank {self.rank} of {self.ranks}"


def shard_experts(model: nn.Module, group=None) -> list[str]:
    """Replace the experts of every top-k and Multi-Head MoE layer in ``model`` by this rank's
    :class:`ExpertParallelExperts`; returns the names of the (now sharded) expert parameters."""
    names = []
    for module_name, module in list(model.named_modules()):
        if isinstance(module, TopKMoE) and type(module.experts) is GroupedExperts:
            module.experts = ExpertParallelExperts(module.experts, group)
            names += [f"{module_name}.experts.{n}" for n, _ in module.experts.named_parameters()]
    return names


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _local_rows(t: torch.Tensor, group) -> torch.Tensor:
    rows = t.shape[0] // dist.get_world_size(group)
    rank = dist.get_rank(group)
    return t[rank * rows:(rank + 1) * rows].clone()


def _expert_state_ids(optimizer: torch.optim.Optimizer, names: dict[int, str], expert_names: set[str]) -> list[int]:
    """Optimizer state ids (positions over its param groups) of the expert parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if names.get(id(p)) in expert_names]


def _map_expert_rows(fn, model_state: dict[str, torch.Tensor], optimizer_state: dict, *, optimizer, model: nn.Module,
                     expert_names: list[str], group) -> tuple[dict[str, torch.Tensor], dict]:
    """``fn(tensor, group)`` applied to every expert weight and every per-expert optimizer tensor."""
    model_state = {k: fn(v, group) if k in expert_names else v for k, v in model_state.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    state = {**optimizer_state, "state": dict(optimizer_state["state"])}
    for i in _expert_state_ids(optimizer, names, set(expert_names)):
        if i in state["state"]:
            state["state"][i] = {k: fn(v, group) if torch.is_tensor(v) and v.ndim else v
                                 for k, v in state["state"][i].items()}
    return model_state, state


def consolidate_experts(model_state: dict[str, torch.Tensor], optimizer_state: dict, **kwargs
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """The model and optimizer states of an expert-parallel rank with every expert tensor
    gathered whole (all ranks of the group call it): the layout of a single-process run.
    Keywords: ``optimizer``, ``model``, ``expert_names``, ``group``."""
    return _map_expert_rows(_gather_rows, model_state, optimizer_state, **kwargs)


def localize_experts(model_state: dict[str, torch.Tensor], optimizer_state: dict, **kwargs
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """The inverse of :func:`consolidate_experts`: this rank's rows of every expert tensor."""
    return _map_expert_rows(_local_rows, model_state, optimizer_state, **kwargs)
