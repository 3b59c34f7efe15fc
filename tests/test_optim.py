"""Optimizers and lr schedules by name: each schedule against its formula (cosine against
timm's scheduler, which trained every earlier run), each optimizer's update rule, and the
config errors."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from timm.scheduler import CosineLRScheduler

import multimodal_moe as mm
from multimodal_moe.configurable import ConfigError
from multimodal_moe.training import build_task
from multimodal_moe.training.optim import OPTIMIZERS, SCHEDULES, LRSchedule, build_optimizer


def train_config(*overrides: str) -> mm.config.TrainConfig:
    return mm.load_config("lm/debug", list(overrides)).train


def lrs(tc, steps: int | None = None) -> list[float]:
    """The lr of updates 1 .. steps under ``tc``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    schedule = LRSchedule(optimizer, tc)
    out = []
    for t in range(1, (steps or tc.steps) + 1):
        schedule.step_update(t)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_the_registries_are_what_the_config_accepts():
    hints = typing.get_type_hints(mm.config.TrainConfig)
    assert typing.get_args(hints["optimizer"]) == OPTIMIZERS
    assert typing.get_args(hints["schedule"]) == tuple(SCHEDULES)


def test_cosine_is_timms_cosine_with_warmup():
    tc = train_config("train.steps=50", "train.warmup_steps=7", "train.lr=0.3", "train.min_lr=0.01")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    timm = CosineLRScheduler(optimizer, t_initial=tc.steps - tc.warmup_steps, lr_min=tc.min_lr,
                             warmup_t=tc.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    expected = []
    for t in range(1, tc.steps + 1):
        timm.step_update(t)
        expected.append(optimizer.param_groups[0]["lr"])
    assert lrs(tc) == pytest.approx(expected, rel=1e-12)


def test_linear_decays_to_min_lr_after_warmup_and_a_constant_phase():
    tc = train_config("train.schedule=linear", "train.steps=30", "train.warmup_steps=4", "train.constant_steps=6",
                      "train.lr=1.0", "train.min_lr=0.1")
    expected = [t / 4 for t in range(1, 4)] + [1.0] * 7 + [0.1 + 0.9 * (1 - (t - 10) / 20) for t in range(11, 31)]
    assert lrs(tc) == pytest.approx(expected, rel=1e-12)
    assert lrs(tc)[-1] == pytest.approx(0.1)


def test_inverse_sqrt_is_fairseqs_after_a_warmup_and_t5s_after_a_constant_phase():
    fairseq = train_config("train.schedule=inverse_sqrt", "train.steps=100", "train.warmup_steps=10",
                           "train.lr=0.5")
    assert lrs(fairseq) == pytest.approx([0.5 * min(t / 10, math.sqrt(10 / t)) for t in range(1, 101)], rel=1e-12)
    # OpenMoE / T5: 1 / sqrt(max(t, 10^4)), i.e. lr 0.01 held for 10k updates, then the decay
    t5 = train_config("train.schedule=inverse_sqrt", "train.steps=40000", "train.warmup_steps=0",
                      "train.constant_steps=10000", "train.lr=0.01")
    got = lrs(t5)
    for t in (1, 5000, 10000, 10001, 22500, 40000):
        assert got[t - 1] == pytest.approx(1 / math.sqrt(max(t, 10000)), rel=1e-12), t


def test_constant_with_warmup_and_lr_scales():
    tc = train_config("train.schedule=constant_with_warmup", "train.steps=20", "train.warmup_steps=5",
                      "train.lr=0.2")
    assert lrs(tc) == pytest.approx([0.2 * t / 5 for t in range(1, 5)] + [0.2] * 16, rel=1e-12)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.25}], lr=tc.lr)
    LRSchedule(optimizer, tc).step_update(12)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.05])


@pytest.mark.parametrize("overrides, key", [
    (["train.schedule=inverse_sqrt", "train.warmup_steps=0"], "train.schedule"),
    (["train.steps=10", "train.warmup_steps=4", "train.constant_steps=6"], "train.constant_steps"),
    (["train.steps=10", "train.warmup_steps=10"], "train.warmup_steps"),
    (["train.constant_steps=-1"], "train.constant_steps"),
    (["train.optimizer=sgd"], "train.optimizer"),
    (["train.schedule=step"], "train.schedule"),
])
def test_bad_recipes_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        mm.load_config("lm/debug", overrides)


def _one_update(name: str, *overrides: str) -> tuple[torch.optim.Optimizer, dict, dict]:
    """A debug LM's weights before and after one update with optimizer ``name``, lr 1e-2."""
    cfg = mm.load_config("lm/debug", [f"train.optimizer={name}", "train.lr=0.01", *overrides])
    torch.manual_seed(0)
    task = build_task(cfg)
    optimizer = build_optimizer(task, cfg.train)
    before = {k: p.detach().clone() for k, p in task.named_parameters()}
    for p in task.parameters():
        p.grad = torch.randn_like(p)
    grads = {k: p.grad.clone() for k, p in task.named_parameters()}
    optimizer.step()
    return optimizer, before, {k: (p.detach(), grads[k]) for k, p in task.named_parameters()}


def test_adam_decays_through_the_gradient_and_adamw_decoupled():
    # first update of Adam(W) with bias correction: the moment ratio is g / (|g| + eps)
    wd, lr, eps = 0.1, 0.01, 1e-6
    for name in ("adam", "adamw"):
        _, before, after = _one_update(name, f"train.weight_decay={wd}", f"train.eps={eps}")
        p0, (p1, g) = before["model.layers.0.attn.q_proj.weight"], after["model.layers.0.attn.q_proj.weight"]
        if name == "adam":
            grad = g + wd * p0
            expected = p0 - lr * grad / (grad.abs() + eps)
        else:
            expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        assert torch.allclose(p1, expected, atol=1e-6), name


def test_adafactor_keeps_factored_moments_and_no_momentum():
    optimizer, before, after = _one_update("adafactor")
    assert type(optimizer).__name__ == "Adafactor"
    assert all(group["beta1"] is None for group in optimizer.param_groups)  # no first moment (T5X)
    state = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if p.dim() == 2]
    assert state and all("exp_avg_sq_row" in s and "exp_avg" not in s for s in state)
    assert all(not torch.equal(before[k], after[k][0]) for k in before)


def test_expert_biases_and_sub_ln_are_not_decayed_but_expert_matrices_are():
    """Per-expert biases and Sub-LN affines are 2-D (E, width): kept out of weight decay by name,
    as a dense FFN's 1-D ones are by shape, so an upcycled model keeps its dense norms."""
    cfg = mm.load_config("lm/openmoe_debug", ["model.moe_ffn.bias=true", "model.moe_ffn.sub_ln=true",
                                              "train.weight_decay=0.05"])
    task = build_task(cfg)
    optimizer = build_optimizer(task, cfg.train)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(task.named_parameters())
    experts = "model.layers.1.ffn.experts."
    for name in ("b1_EF", "b3_EF", "b2_ED", "norm_weight_EF", "norm_bias_EF"):
        assert params[experts + name].dim() == 2 and decay[id(params[experts + name])] == 0.0, name
    for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
        assert decay[id(params[experts + name])] == 0.05, name
    assert decay[id(params["model.layers.0.ffn.fc1.bias"])] == 0.0  # a dense FFN's, by shape
