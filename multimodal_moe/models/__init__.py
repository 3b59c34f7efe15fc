"""Models: the BEiT-3 Multiway encoder and the causal decoder LM, selected by ``model.kind``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ModelConfig, ModelOutput
from .decoder_lm import DecoderLM, DecoderLMConfig
from .multiway_encoder import MultiwayEncoder, MultiwayEncoderConfig

__all__ = ["DecoderLM", "DecoderLMConfig", "ModelConfig", "ModelOutput", "MultiwayEncoder",
           "MultiwayEncoderConfig", "build_model"]


def build_model(cfg: Any, *, seed: int | None = None) -> nn.Module:
    """The model a config describes (a run config, :class:`~multimodal_moe.config.Config`, or a
    bare :class:`ModelConfig`), initialised from ``seed`` (default: the run config's ``seed``, or
    0 for a bare model config) without touching the global RNG."""
    model_cfg = cfg if isinstance(cfg, ModelConfig) else cfg.model
    if seed is None:
        seed = 0 if isinstance(cfg, ModelConfig) else cfg.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cfg.build()
