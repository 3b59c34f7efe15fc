"""The bundled MoE presets train as their papers do: a router the task loss reaches, and debug
presets at the expert multiply-adds of their family's dense one, with enough experts for the
activation ratio to mean something."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import multimodal_moe as mm
from multimodal_moe.config import list_presets
from multimodal_moe.configurable import ConfigError
from multimodal_moe.flops import _expert_share
from multimodal_moe.layers import MixtureOfTokensConfig, TopKMoEConfig

DENSE_DEBUG = {"decoder_lm": "lm/debug", "multiway_encoder": "beit3/debug"}


def moe_presets(debug_only: bool = False) -> list[str]:
    names = [n for n in list_presets() if not debug_only or n.endswith("debug")]
    return [n for n in names if getattr(mm.load_config(n).model, "moe_ffn", None) is not None]


def expert_macs(ffn: torch.nn.Module) -> float:
    """Multiply-adds per token in the experts of a MoE FFN, or in the matrices of a dense one."""
    share = _expert_share(ffn)
    if share is None:
        return float(sum(p.numel() for p in ffn.parameters() if p.dim() == 2))
    shared = getattr(ffn, "shared_expert", None)  # every token goes through it whole
    return share * sum(p.numel() for p in ffn.experts.parameters()) + (0 if shared is None else expert_macs(shared))


def test_a_constant_top1_gate_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"model\.moe_ffn\.renormalize: with top_k: 1 a renormalised gate is 1"):
        mm.load_config("lm/xmoe_debug", ["model.moe_ffn.renormalize=true"])
    mm.load_config("lm/openmoe_debug", ["model.moe_ffn.renormalize=true"])  # top-2: a real choice


@pytest.mark.parametrize("preset", moe_presets())
def test_every_moe_preset_routes_with_a_gradient_from_the_task_loss(preset):
    """Before: every X-MoE and MH-MoE preset had top_k 1 with renormalised gates, so the gate was 1
    and the router's gradient from the task loss rounding noise (~1e-5). Each preset's MoE FFN
    config, at a small width and without balance and z losses, must pass the task loss on."""
    cfg = mm.load_config(preset).model.moe_ffn
    small = {"hidden_dim": 16}
    if isinstance(cfg, TopKMoEConfig):
        small |= {"balance_loss_weight": 0.0, "z_loss_weight": 0.0}
    torch.manual_seed(0)
    ffn = dataclasses.replace(cfg, **small).build(64)
    batch = 2 * getattr(cfg, "group_size", 2)  # Mixture of Tokens mixes groups of examples
    x = torch.randn(batch, 16, 64)
    (ffn(x).hidden * torch.randn(batch, 16, 64)).sum().backward()  # the task loss alone
    routing = {n: p.grad for n, p in ffn.named_parameters() if n.startswith(("router.", "controller"))}
    assert routing and all(g is not None for g in routing.values())
    assert sum(g.norm() for g in routing.values()) > 1e-2, {n: float(g.norm()) for n, g in routing.items()}


@pytest.mark.parametrize("preset", moe_presets(debug_only=True))
def test_debug_moe_presets_match_their_dense_debug_preset(preset):
    """Before: the LM X-MoE / MH-MoE debug presets did 1/3 of the dense FFN's multiply-adds (GELU
    instead of SwiGLU), LM MoT 2/3, the BEiT-3 ones 1/2, with 4 experts (activation ratio 1.00 for
    every method) and beit3/mhmoe_debug in another layout."""
    model = mm.load_config(preset).model
    dense = mm.load_config(DENSE_DEBUG[model.kind]).model
    moe_ffn, dense_ffn = model.moe_ffn.build(model.dim), dense.ffn.build(dense.dim)
    assert model.dim == dense.dim and expert_macs(moe_ffn) == expert_macs(dense_ffn)
    assert model.moe_ffn.activation == dense.ffn.activation
    assert model.moe_ffn.num_experts >= 8
    if model.kind == "multiway_encoder":
        assert model.layout == dense.layout
    if isinstance(model.moe_ffn, MixtureOfTokensConfig):
        assert model.moe_ffn.hidden_dim == MixtureOfTokensConfig.flop_matched(
            dense.ffn.hidden_dim, model.moe_ffn.group_size, model.moe_ffn.num_experts)
