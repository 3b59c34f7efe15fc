"""Running one model on many processes (torchrun): the process group, DDP, FSDP2 and expert
parallelism, applied from outside the single-device model code (``parallelize``)."""

from .env import DistEnv, current, init_distributed
from .expert_parallel import ExpertParallelExperts, shard_experts
from .parallelize import Parallel, parallelize

__all__ = ["DistEnv", "ExpertParallelExperts", "Parallel", "current", "init_distributed", "parallelize", "shard_experts"]
