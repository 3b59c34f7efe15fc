"""Model FLOPs of a training step, and the utilisation of a device they amount to.

Model FLOPs utilisation (MFU) as PaLM (Chowdhery et al., arXiv 2204.02311) defines it: the
FLOPs the model needs per step whatever the implementation (recomputation not counted), over
the time of the step and the device's peak. Per token, forward and backward,
that is 6 x the parameters the token multiplies with (:func:`active_parameters`: for a MoE layer
only the experts a token is sent to), plus attention's score and value products, 12 x layers x
D x T per token of a length-T sequence.
"""

from __future__ import annotations

from torch import nn

from .layers import MixtureOfTokensConfig, MultiHeadMoEConfig, Multiway, TopKMoEConfig
from .layers.experts import GroupedExperts

__all__ = ["PEAK_BF16_TFLOPS", "active_parameters", "model_flops_per_step", "peak_bf16_tflops"]

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, matched as substrings of
# the device name in this order; "NVIDIA H100 80GB HBM3" is the SXM part.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H200": 989.0, "A100": 312.0,
                    "L40S": 362.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from :data:`PEAK_BF16_TFLOPS`, or None if it is not listed."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def _expert_share(module: nn.Module) -> float | None:
    """The share of a MoE FFN's expert parameters one token multiplies with, or None for other modules."""
    cfg = getattr(module, "cfg", None)
    if isinstance(cfg, MultiHeadMoEConfig):  # h sub-tokens, each through top-k of E experts
        return cfg.heads * cfg.experts_per_token / cfg.num_experts
    if isinstance(cfg, TopKMoEConfig):
        return cfg.experts_per_token / cfg.num_experts
    if isinstance(cfg, MixtureOfTokensConfig):  # every expert, once per mixture of G tokens
        return 1 / cfg.group_size
    return None


def active_parameters(module: nn.Module) -> float:
    """Parameters whose multiply-adds one token performs, in a forward pass of ``module``.

    Embedding lookups and position tables (no multiply-adds) are left out; the LM's output
    projection counts even when tied to the embedding. Of a Multiway module a token takes one
    branch (the largest is counted). The experts of a top-k MoE count at K/E of their size, of an
    MH-MoE at h*K/E; a Mixture of Tokens' experts each process one mixture of G tokens, so they
    count at 1/G (every expert is active, on mixtures). Capacity drops are ignored (an upper bound).
    """
    if isinstance(module, Multiway):
        return max(active_parameters(branch) for branch in module.values())
    if isinstance(module, nn.Embedding):
        return 0.0
    share = _expert_share(module)
    total = float(sum(p.numel() for name, p in module.named_parameters(recurse=False)
                      if name not in ("pos_embed", "cls_token", "mask_token")))
    for child in module.children():
        if share is not None and isinstance(child, GroupedExperts):
            total += share * sum(p.numel() for p in child.parameters())
        else:
            total += active_parameters(child)
    return total


def model_flops_per_step(active_params: float, depth: int, dim: int, sequences: list[tuple[int, int]]) -> dict:
    """Forward+backward model FLOPs of a step over ``sequences`` ((count, length) pairs): 6 x
    active parameters per token, plus attention's score and value products, 12 x depth x D x T^2
    per sequence (PaLM's count; not halved for causal masks)."""
    tokens = sum(n * t for n, t in sequences)
    attention = 12 * depth * dim * sum(n * t * t for n, t in sequences)
    return {"tokens": tokens, "parameter_flops": 6 * active_params * tokens, "attention_flops": attention}
