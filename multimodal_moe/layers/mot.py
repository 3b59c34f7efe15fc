"""Mixture of Tokens: continuous MoE by mixing tokens across examples.

Mixture of Tokens: Continuous MoE through Cross-Example Aggregation (Antoniak et al.,
arXiv 2310.15961), after llm-random's ``ContinuousMoeBaseClass``. Tokens at the same position
of G consecutive examples form a group, so a causal LM stays causal (llm-random#464). For each
group and expert e the controller gives weights w[g, e] = softmax over the G tokens of
(x_g . c_e) / temperature; the expert processes the mixture sum_g w[g, e] x_g, and token g
receives sum_e w[g, e] expert_e(mixture_e) — the same weights for emitting, as in the
reference's default. Every expert sees every group, so there is nothing to balance and no
auxiliary loss.

Sizing: with expert width f = F_dense * G / E (:meth:`MixtureOfTokensConfig.flop_matched`)
the expert FLOPs per token equal a dense FFN of width F_dense.

The batch size must be a multiple of G (a clear error otherwise; pad the batch to a multiple,
as the reference's inference card does). Padding tokens get zero weight and zero output; a
group that is all padding outputs zeros. ``eval_mode: discrete`` replaces the weights by a
one-hot of each expert's highest-scoring token in evaluation (the paper's discrete routing),
and :func:`topk_from_mot` starts a top-k MoE from a trained MoT ("transition tuning").
"""

from __future__ import annotations

import dataclasses

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import ConfigError, config
from .ffn import Activation, FFNConfig, FFNOutput
from .experts import GroupedExperts, compute_dtype
from .moe import TopKMoE, TopKMoEConfig

__all__ = ["MixtureOfTokens", "MixtureOfTokensConfig", "topk_config_from_mot", "topk_from_mot"]


@FFNConfig.register("mot")
@config
class MixtureOfTokensConfig(FFNConfig):
    """Mixture of Tokens; see the module docstring.

    Attributes:
        hidden_dim: width f of each expert (see :meth:`flop_matched`).
        num_experts: E.
        group_size: G, examples mixed together (the batch size must be a multiple).
        activation: expert activation (ReLU in the reference).
        temperature: softmax temperature of the mixing weights.
        learn_temperature: the temperature is a parameter.
        eval_mode: soft | discrete (one-hot weights in evaluation).
    """

    hidden_dim: int
    num_experts: int = 32
    group_size: int = 32
    activation: Activation = "relu"
    temperature: float = 1.0
    learn_temperature: bool = False
    eval_mode: Literal["soft", "discrete"] = "soft"

    def check(self) -> None:
        for name in ("hidden_dim", "num_experts", "group_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be positive, got {self.temperature}")

    @staticmethod
    def flop_matched(dense_hidden_dim: int, group_size: int, num_experts: int) -> int:
        """Expert width f whose expert FLOPs per token equal a dense FFN of ``dense_hidden_dim``."""
        f = dense_hidden_dim * group_size / num_experts
        if f != int(f):
            raise ValueError(f"dense width {dense_hidden_dim} * group size {group_size} is not divisible by "
                             f"{num_experts} experts")
        return int(f)

    def build(self, dim: int, *, init_scale: float = 1.0) -> MixtureOfTokens:
        return MixtureOfTokens(dim, self, init_scale=init_scale)


class MixtureOfTokens(nn.Module):
    """``forward(x_BTD, *, token_mask_BT=None) -> FFNOutput``; B must be a multiple of G."""

    def __init__(self, dim: int, cfg: MixtureOfTokensConfig, *, init_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.controller_DE = nn.Parameter(torch.empty(dim, cfg.num_experts).normal_(std=dim ** -0.5))
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_dim, cfg.activation, init_scale)
        log_t = torch.tensor([math.log(cfg.temperature)])  # 1-D: FSDP2 shards no scalars
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self, x_BTD: torch.Tensor, *, token_mask_BT: torch.Tensor | None = None) -> FFNOutput:
        B, T, D = x_BTD.shape
        G, E = self.cfg.group_size, self.cfg.num_experts
        if B % G:
            raise ValueError(f"Mixture of Tokens mixes groups of group_size={G} examples, but the batch has {B}; "
                             f"use a batch size divisible by {G} (pad the batch if needed)")
        x_TnGD = x_BTD.transpose(0, 1).reshape(T, B // G, G, D)
        real_TnG1 = None if token_mask_BT is None else token_mask_BT.t().reshape(T, B // G, G, 1)
        weights_TnGE = self.mixing_weights(x_TnGD, real_TnG1)
        dtype = compute_dtype(x_BTD)  # the mixing and the experts run in autocast's dtype, both operands cast
        w_TnGE, x_TnGD = weights_TnGE.to(dtype), x_TnGD.to(dtype)
        mixed_TnED = w_TnGE.transpose(-1, -2) @ x_TnGD
        mixed_EMD = mixed_TnED.reshape(-1, E, D).transpose(0, 1)  # M = T * B/G mixtures per expert
        y_TnED = self.experts.forward_batched(mixed_EMD).transpose(0, 1).reshape(T, B // G, E, D)
        out_BTD = (w_TnGE @ y_TnED).reshape(T, B, D).transpose(0, 1)

        with torch.no_grad():
            p = weights_TnGE.clamp_min(1e-12)
            entropy = -(weights_TnGE * p.log()).sum(dim=2).mean()
        stats = {"mixing_entropy": entropy, "temperature": self.log_temperature.detach().exp()}
        return FFNOutput(out_BTD, x_BTD.new_zeros(()), stats)

    def mixing_weights(self, x_TnGD: torch.Tensor, real_TnG1: torch.Tensor | None) -> torch.Tensor:
        """(T, B/G, G, E) fp32 weights of each token in each expert's mixture (softmax over the
        group), computed in fp32 also under autocast; padding gets weight 0."""
        G = self.cfg.group_size
        with torch.autocast(x_TnGD.device.type, enabled=False):
            dtype = torch.promote_types(x_TnGD.dtype, torch.float32)
            logits_TnGE = (x_TnGD.to(dtype) @ self.controller_DE.to(dtype)) / self.log_temperature.to(dtype).exp()
            if real_TnG1 is not None:
                logits_TnGE = logits_TnGE.masked_fill(~real_TnG1, float("-inf"))
            if not self.training and self.cfg.eval_mode == "discrete":
                best_Tn1E = logits_TnGE.argmax(dim=2, keepdim=True)  # one-hot by comparison: F.one_hot syncs on CUDA
                group_11G1 = torch.arange(G, device=x_TnGD.device).view(1, 1, G, 1)
                weights_TnGE = (group_11G1 == best_Tn1E).to(dtype)
            else:
                weights_TnGE = logits_TnGE.softmax(dim=2)
            if real_TnG1 is not None:
                weights_TnGE = weights_TnGE.masked_fill(~real_TnG1, 0.0)  # also all-padding groups (NaN)
        return weights_TnGE


def topk_config_from_mot(cfg: MixtureOfTokensConfig, top_k: int = 1, **overrides) -> TopKMoEConfig:
    """The token-choice top-k MoE that transition tuning turns a MoT of ``cfg`` into: the same
    experts, a softmax router, gates renormalised only when ``top_k`` > 1. ``overrides`` set other
    :class:`TopKMoEConfig` fields (losses, capacity, ...)."""
    valid = {f.name for f in dataclasses.fields(TopKMoEConfig)} - {"hidden_dim", "num_experts", "top_k", "activation"}
    if unknown := sorted(set(overrides) - valid):
        raise ConfigError(unknown[0], f"is not a top-k MoE setting that a conversion can choose; valid: "
                                      f"{', '.join(sorted(valid))}")
    fields = {"renormalize": top_k > 1, **overrides}
    topk = TopKMoEConfig(hidden_dim=cfg.hidden_dim, num_experts=cfg.num_experts, top_k=top_k,
                         activation=cfg.activation, **fields)
    if topk.router != "softmax":
        raise ConfigError("router", "transition tuning initialises the softmax router from the MoT controller")
    return topk


def topk_from_mot(mot: MixtureOfTokens, top_k: int = 1, **overrides) -> TopKMoE:
    """A token-choice top-k MoE initialised from a trained MoT ("transition tuning"): the
    controller (over the temperature) becomes the router, the experts are copied."""
    moe = topk_config_from_mot(mot.cfg, top_k, **overrides).build(mot.controller_DE.shape[0])
    with torch.no_grad():
        moe.router.weight_ED.copy_(mot.controller_DE.t() / mot.log_temperature.exp())
        moe.experts.load_state_dict(mot.experts.state_dict())
    return moe.to(mot.controller_DE.device)
