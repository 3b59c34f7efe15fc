"""Tasks the trainer trains: each owns its heads, loss and data (see ``tasks.base``).

The task modules (and the data stack they read) load on first use: ``import multimodal_moe``
reads no shards, and ``from multimodal_moe.tasks import MaskedDataModeling`` imports its module
then.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from ..models import DecoderLMConfig, ModelConfig, build_model
from .base import Task, TaskConfig, TaskOutput, TrainData, batch_multiple

__all__ = ["LanguageModeling", "LanguageModelingConfig", "MaskedDataModeling", "MaskedDataModelingConfig", "Task",
           "TaskConfig", "TaskOutput", "TrainData", "build_task", "data_path", "default_task"]

_LAZY = {"LanguageModeling": "lm", "LanguageModelingConfig": "lm", "MaskedDataModeling": "mmm",
         "MaskedDataModelingConfig": "mmm", "KMeansTargetsConfig": "visual_targets",
         "PixelTargetsConfig": "visual_targets"}


def __getattr__(name: str) -> Any:
    if name == "data_path":  # the resolver of bundled: paths, from the data side
        from data_pipelines.paths import data_path

        return data_path
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_task(model: ModelConfig) -> TaskConfig:
    """What a model trains on when its config names no task: causal LM for a decoder, masked
    data modeling for the Multiway encoder, both on the bundled dataset, with batch sizes
    rounded up to a multiple of any Mixture-of-Tokens group size. The encoder predicts the
    bundled k-means codes when its patches have their size (8 pixels), else normalised pixels."""
    from data_pipelines.paths import data_path

    from .lm import LanguageModelingConfig
    from .mmm import MaskedDataModelingConfig
    from .stream_config import StreamConfig
    from .visual_targets import KMeansTargetsConfig, PixelTargetsConfig, codebook_patch_size

    if isinstance(model, DecoderLMConfig):
        task = LanguageModelingConfig()
    else:
        targets = KMeansTargetsConfig()
        if codebook_patch_size(data_path(targets.path)) != model.patch_size:
            targets = PixelTargetsConfig()
        task = MaskedDataModelingConfig(visual_targets=targets)
    multiple = batch_multiple(model)
    streams = {f.name: s for f in dataclasses.fields(task) if isinstance(s := getattr(task, f.name), StreamConfig)}
    return dataclasses.replace(task, **{name: dataclasses.replace(s, batch_size=-(-s.batch_size // multiple) * multiple)
                                        for name, s in streams.items()})


def build_task(cfg: Any) -> Task:
    """The task of a run config (``cfg.task``, or the model's :func:`default_task`): the
    backbone from ``cfg.seed`` and the task's heads around it from a seed derived from it."""
    task_cfg = cfg.task or default_task(cfg.model)
    model = build_model(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return task_cfg.build(model)
