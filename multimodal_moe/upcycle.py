"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a MoE model started from a dense
checkpoint, every expert of a MoE layer a copy of that layer's dense FFN, the routers fresh.

    mmoe convert upcycle RUN --config PRESET --dst DIR [--noise 0.01] [--set KEY=VALUE ...]
    mmoe pretrain --init DIR --run-dir RUN2

``PRESET`` is the MoE architecture to train (its task and schedule too); it must be the dense
model's but for its MoE layers, whose top-k experts must each have the dense FFN's shape: the
same width and activation, and the same biases and Sub-LN (``bias`` / ``sub_ln`` of the MoE
config: the dense FFNs of our presets have both, the MoE presets' experts neither, so the usual
call sets ``model.moe_ffn.bias=true`` and ``model.moe_ffn.sub_ln=true``); anything else that
differs is refused, named. Every other weight,
and the task's heads where they are the preset's, is copied as it is. ``noise`` adds to each
copied matrix Gaussian noise of ``noise`` times that matrix's standard deviation (a draw per
expert, seeded by the preset's ``seed``), so the copies can tell themselves apart from the first
step; without it the experts differ only through the router's gradients. Upcycled with renormalised
top-k gates (k > 1) and no capacity limit, the model computes what the dense one did, up to
rounding (tested); with top-1 and the router's probability as the gate, each MoE output is the
dense one times that probability, and a capacity drops tokens the dense FFN did not.

Multi-Head MoE (experts of sub-tokens, width D/h), Mixture of Tokens and shared experts have no
dense counterpart to copy and are refused. ``DIR`` is a run directory with one checkpoint at the
source's step, no optimizer state: ``--init`` starts a new run from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import Config
from .configurable import ConfigError
from .layers.moe import TopKMoE

__all__ = ["upcycle", "upcycled_state"]

# expert tensor -> (the dense FFN's tensor, transposed: a Linear stores (out, in), experts (in, out))
EXPERT_SOURCES = {"w1_EDF": ("fc1.weight", True), "w3_EDF": ("fc3.weight", True), "w2_EFD": ("fc2.weight", True),
                  "b1_EF": ("fc1.bias", False), "b3_EF": ("fc3.bias", False), "b2_ED": ("fc2.bias", False),
                  "norm_weight_EF": ("ffn_norm.weight", False), "norm_bias_EF": ("ffn_norm.bias", False)}
MATRICES = ("w1_EDF", "w3_EDF", "w2_EFD")


def _moe_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s top-k MoE FFNs (not Multi-Head MoE: no dense FFN is a copy of one)."""
    return [name for name, module in model.named_modules() if type(module) is TopKMoE]


def upcycled_state(dense: dict[str, torch.Tensor], model: nn.Module, *, noise: float = 0.0,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict filled from the dense model's ``dense``: each MoE layer's experts
    copies of the dense FFN at its place (plus ``noise``), its router (and loss-free balancing
    bias) as ``model`` has them, every other tensor ``dense``'s. Raises :class:`ConfigError` where
    the two do not correspond, naming the tensors and the setting that differs."""
    layers = _moe_layers(model)
    target = model.state_dict()
    first_name: dict[int, str] = {}  # tied weights (an LM's output projection) are stored once
    aliases = {n: first_name.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    out, used = {}, set()
    for key, value in target.items():
        layer = next((n for n in layers if key.startswith(n + ".")), None)
        if aliases.get(key, key) != key and aliases[key] in dense:
            continue
        if layer is None:
            if key not in dense or dense[key].shape != value.shape:
                have = "missing" if key not in dense else f"of shape {tuple(dense[key].shape)}"
                raise ConfigError("model", f"{key} {tuple(value.shape)} is {have} in the dense checkpoint: upcycling "
                                           f"needs the dense model's architecture outside the MoE layers")
            out[key] = dense[key]
            used.add(key)
            continue
        part = key[len(layer) + 1:]
        if not part.startswith("experts."):  # the router, the balancing bias: fresh
            out[key] = value
            continue
        name = part.removeprefix("experts.")
        source, transpose = EXPERT_SOURCES[name]
        src_key = f"{layer}.{source}"
        copy = None if src_key not in dense else dense[src_key].t() if transpose else dense[src_key]
        if copy is None or copy.shape != value.shape[1:]:
            have = "missing" if copy is None else f"of shape {tuple(copy.shape)}"
            raise ConfigError("model.moe_ffn", f"{layer}'s experts take {name} of {tuple(value.shape[1:])}, the dense "
                                               f"{src_key} is {have}: the experts must be its FFN's copies")
        experts = copy.expand_as(value).clone()
        if noise and name in MATRICES:
            experts += noise * copy.float().std() * torch.randn(experts.shape, generator=generator).to(experts)
        out[key] = experts
        used.add(src_key)
    if unused := sorted(set(dense) - used):
        raise ConfigError("model", f"the dense checkpoint holds {len(unused)} tensors the preset has no place for "
                                   f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): upcycling needs "
                                   f"the dense model's architecture outside the MoE layers")
    return out


def _check_architecture(dense: Config, moe: Config) -> None:
    """The preset's model must be the dense one's but for where and what its MoE layers are (and
    the fine-tuning fields, which do not change weights); each expert's activation its dense FFN's."""
    from .configurable import to_dict
    from .training.checkpoint import config_differences

    experts = moe.model.moe_ffn
    kind = getattr(experts, "kind", None)
    if kind == "mh_moe":
        raise ConfigError("model.moe_ffn", "a Multi-Head MoE's experts act on sub-tokens of width D/h, so no dense "
                                           "FFN is a copy of one; upcycle into topk_moe")
    if kind != "topk_moe":
        raise ConfigError("model.moe_ffn", f"upcycling starts top-k MoE layers (moe_ffn kind topk_moe), not {kind}")
    if experts.shared_expert_dim is not None:
        raise ConfigError("model.moe_ffn.shared_expert_dim", "a shared expert has no dense counterpart of its width: "
                                                             "set it null")
    free = {"moe_ffn", "moe_every", "moe_layers", "moe_branches", *type(moe.model).FINETUNE_FIELDS}
    differ = [d for d in config_differences(to_dict(dense.model), to_dict(moe.model), "model")
              if d.split()[0].split(".")[1] not in free]
    if differ:
        raise ConfigError("model", f"the preset's model differs from the dense checkpoint's outside its MoE layers: "
                                   f"{'; '.join(differ)}")
    dense_ffn = dense.model.ffn
    for field, key, what in (("activation", "model.moe_ffn.activation", "is not the dense FFN's {dense}"),
                             ("hidden_dim", "model.moe_ffn.hidden_dim", "is not {dense}: the experts must have the "
                                                                        "dense FFN's width"),
                             ("bias", "model.moe_ffn", "is not the dense FFN's: set model.moe_ffn.bias={dense}"),
                             ("sub_ln", "model.moe_ffn", "is not the dense FFN's: set model.moe_ffn.sub_ln={dense}")):
        ours, theirs = getattr(experts, field, None), getattr(dense_ffn, field, None)
        if ours != theirs:
            dense_value = str(theirs).lower() if isinstance(theirs, bool) else theirs
            raise ConfigError(key, f"the experts' {field} {ours} " + what.format(dense=dense_value))


def upcycle(src: str | Path, dst: str | Path, cfg: Config, *, noise: float = 0.0) -> Path:
    """Write into the run dir ``dst`` one checkpoint of ``cfg`` (a MoE preset) upcycled from the
    dense checkpoint ``src`` (a run dir or checkpoint); returns its path."""
    from .training import build_task
    from .training.checkpoint import Checkpoint, converted_checkpoints, load_weights, save_converted

    if noise < 0:
        raise ConfigError("noise", f"must be >= 0, got {noise}")
    source = Checkpoint.open(src)
    _check_architecture(source.config, cfg)
    checkpoints = converted_checkpoints(dst)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the fresh routers
        task = build_task(cfg)
    state = upcycled_state(source.weights(), task.model, noise=noise,
                           generator=torch.Generator().manual_seed(cfg.seed))
    load_weights(task.model, state, f"{source.path} upcycled")
    if source.heads_fit(task):
        load_weights(task, {**{f"model.{k}": v for k, v in state.items()}, **source.weights("heads.safetensors")},
                     f"{source.path} heads")
    return save_converted(checkpoints, task, cfg, source, f"upcycle (noise={noise})")
