"""The training engine: config, loop, checkpoints, metrics."""

from ..config import TrainConfig
from .checkpoint import Checkpoint, CheckpointError, find_checkpoint, save_checkpoint
from .run_lock import RunDirLocked
from .trainer import Trainer, TrainingDiverged, TrainingStopped, TrainResult, build_task, train

__all__ = ["Checkpoint", "CheckpointError", "RunDirLocked", "TrainConfig", "TrainResult", "Trainer",
           "TrainingDiverged", "TrainingStopped", "build_task", "find_checkpoint", "save_checkpoint", "train"]
