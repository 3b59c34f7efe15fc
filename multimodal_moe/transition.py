"""Transition tuning (Mixture of Tokens, arXiv 2310.15961, Sec. 5): a trained Mixture-of-Tokens
model turned into a token-choice top-k MoE model, to train on for a short while and then run
without mixing tokens across examples (autoregressive decoding, batch size 1).

    mmoe convert mot-to-topk RUN --dst DIR [--top-k 1]
    mmoe pretrain --init DIR --run-dir RUN2 [--set train.steps=...]

Every Mixture-of-Tokens FFN of the model (wherever a config places one: ``ffn``, ``moe_ffn``,
a Multiway branch) becomes a :class:`~multimodal_moe.layers.TopKMoE` with the same experts,
whose softmax router is the MoT controller divided by its temperature
(:func:`~multimodal_moe.layers.mot.topk_from_mot`); every other weight, the task's heads
included, is copied as it is. ``DIR`` is a run directory holding one checkpoint at the source's
step, with the converted config and no optimizer state: ``--init`` starts a new run from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from .config import Config
from .configurable import ConfigError
from .layers.mot import MixtureOfTokens, MixtureOfTokensConfig, topk_config_from_mot, topk_from_mot

__all__ = ["mot_to_topk", "topk_config"]


def topk_config(cfg: Config, top_k: int = 1, **overrides) -> Config:
    """``cfg`` with each Mixture-of-Tokens FFN config replaced by its top-k MoE; a
    :class:`ConfigError` if it has none."""
    found = []

    def convert(value, key: str):
        if isinstance(value, MixtureOfTokensConfig):
            found.append(key)
            return topk_config_from_mot(value, top_k, **overrides)
        if isinstance(value, dict):
            return {k: convert(v, f"{key}.{k}") for k, v in value.items()}
        return value

    model = dataclasses.replace(cfg.model, **{f.name: convert(getattr(cfg.model, f.name), f.name)
                                              for f in dataclasses.fields(cfg.model)})
    if not found:
        raise ConfigError("model", f"has no Mixture-of-Tokens FFN (kind: mot) to convert; its FFNs are "
                                   f"{cfg.model.ffn.kind} and {getattr(cfg.model.moe_ffn, 'kind', 'none')}")
    return dataclasses.replace(cfg, model=model)


def _replace_mot_layers(module: nn.Module, top_k: int, overrides: dict) -> None:
    for name, child in module.named_children():
        if isinstance(child, MixtureOfTokens):
            setattr(module, name, topk_from_mot(child, top_k, **overrides))
        else:
            _replace_mot_layers(child, top_k, overrides)


def mot_to_topk(src: str | Path, dst: str | Path, *, top_k: int = 1, **overrides) -> Path:
    """Convert the checkpoint ``src`` (a run dir or checkpoint) into the run dir ``dst``; returns
    the new checkpoint's path. ``overrides``: other fields of the top-k MoE config."""
    from .training import build_task
    from .training.checkpoint import Checkpoint, converted_checkpoints, load_weights, save_converted

    source = Checkpoint.open(src)
    cfg = topk_config(source.config, top_k, **overrides)
    checkpoints = converted_checkpoints(dst)
    mot_task = build_task(source.config)
    source.load_task_weights(mot_task)
    _replace_mot_layers(mot_task, top_k, overrides)
    task = build_task(cfg)
    load_weights(task, mot_task.state_dict(), f"{source.path} converted")  # strict: the layouts agree
    return save_converted(checkpoints, task, cfg, source, f"mot-to-topk (top_k={top_k})")
