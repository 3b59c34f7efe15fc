"""The training engine: config, loop, checkpoints, metrics."""

from ..config import TrainConfig
from .checkpoint import Checkpoint, CheckpointError, find_checkpoint, save_checkpoint
from .trainer import TrainingDiverged, TrainResult, build_task, train

__all__ = ["Checkpoint", "CheckpointError", "TrainConfig", "TrainResult", "TrainingDiverged", "build_task",
           "find_checkpoint", "save_checkpoint", "train"]
