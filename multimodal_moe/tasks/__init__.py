"""Tasks the trainer trains: each owns its heads, loss and data (see ``tasks.base``)."""

import dataclasses
import math

from ..models import DecoderLMConfig, ModelConfig
from .base import Task, TaskConfig, TaskOutput, TrainData, data_path, group_sizes
from .lm import LanguageModeling, LanguageModelingConfig
from .mmm import MaskedDataModeling, MaskedDataModelingConfig
from .streams import StreamConfig

__all__ = ["LanguageModeling", "LanguageModelingConfig", "MaskedDataModeling", "MaskedDataModelingConfig", "Task",
           "TaskConfig", "TaskOutput", "TrainData", "data_path", "default_task"]


def default_task(model: ModelConfig) -> TaskConfig:
    """What a model trains on when its config names no task: causal LM for a decoder, masked
    data modeling for the Multiway encoder, both on the bundled dataset, with batch sizes
    rounded up to a multiple of any Mixture-of-Tokens group size."""
    task = LanguageModelingConfig() if isinstance(model, DecoderLMConfig) else MaskedDataModelingConfig()
    multiple = math.lcm(1, *group_sizes(model).values())
    streams = {f.name: s for f in dataclasses.fields(task) if isinstance(s := getattr(task, f.name), StreamConfig)}
    return dataclasses.replace(task, **{name: dataclasses.replace(s, batch_size=-(-s.batch_size // multiple) * multiple)
                                        for name, s in streams.items()})
