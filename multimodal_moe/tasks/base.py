"""What the trainer trains: a task owns a backbone, its heads, its loss and its data.

A task config (``kind`` selects it, e.g. ``mmm`` or ``lm``) builds a :class:`Task`: an
``nn.Module`` holding the backbone as ``task.model`` plus whatever heads the loss needs.
``task(batch)`` returns a :class:`TaskOutput` (the loss to minimise, per-part numbers to log,
what was processed), and ``task.train_data(...)`` the resumable stream of batches it consumes.
The trainer knows nothing else about it, so a fine-tuning task plugs into the same loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..configurable import ConfigError, Registry
from ..layers.block import BlockStats
from ..layers.ffn import FFNConfig
from ..models import ModelConfig
from ..models.beit3_weights import HeadMap  # a runtime name: the config parser resolves annotations

if TYPE_CHECKING:
    from .stream_config import TokenizerConfig

__all__ = ["Task", "TaskConfig", "TaskOutput", "TrainData", "batch_multiple", "check_group_sizes", "group_sizes"]


@dataclass
class TaskOutput:
    """One forward pass of a task.

    Attributes:
        loss: the scalar to minimise (auxiliary MoE losses included).
        parts: detached scalars to log: per-part losses, accuracies, ...
        samples: examples processed (an image-text pair counts once).
        tokens: tokens the backbone processed (vision + text, padding excluded); a device
            tensor is fine (read when the interval is logged, not every step).
        moe_stats: per backbone pass, per layer, the FFN statistics (:class:`BlockStats`).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    tokens: int | torch.Tensor = 0
    moe_stats: list[list[BlockStats]] = field(default_factory=list)


class TrainData(Protocol):
    """An endless, resumable stream of a task's batches."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def skipped(self) -> dict[str, dict[str, int]]:
        """Bad samples skipped so far, per stream and reason."""
        ...


def group_sizes(model: ModelConfig) -> dict[str, int]:
    """Model config field -> group size of each Mixture-of-Tokens FFN it uses."""
    return {f.name: ffn.group_size for f in fields(model)
            if isinstance(ffn := getattr(model, f.name), FFNConfig) and getattr(ffn, "group_size", None)}


def batch_multiple(model: ModelConfig) -> int:
    """The multiple of examples every batch of ``model`` needs: the least common multiple of its
    Mixture-of-Tokens group sizes (1 without any)."""
    return math.lcm(1, *group_sizes(model).values())


def check_group_sizes(model: ModelConfig, batch_sizes: dict[str, int]) -> None:
    """Mixture of Tokens mixes tokens across ``group_size`` examples, so every batch size must be a
    multiple of it: raise :class:`ConfigError` naming the stream if one is not."""
    for field_name, group in group_sizes(model).items():
        for name, size in batch_sizes.items():
            if size % group:
                raise ConfigError(f"{name}.batch_size", f"{size} is not a multiple of model.{field_name}.group_size "
                                                        f"{group} (Mixture of Tokens mixes groups of examples)")


def _data_fields(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``shards`` / ``eval_shards`` / ``path`` field under ``node``
    (an ``eval_shards`` of one shard list per stream gives each list)."""
    for f in fields(node) if hasattr(node, "__dataclass_fields__") else ():
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if f.name in ("shards", "eval_shards") and hasattr(value, "__dataclass_fields__"):
            yield from ((f"{key}.{g.name}", shards) for g in fields(value) if (shards := getattr(value, g.name)))
        elif f.name in ("shards", "eval_shards") and value:
            yield key, value
        elif f.name == "path" and isinstance(value, str):
            yield key, value
        elif hasattr(value, "__dataclass_fields__"):
            yield from _data_fields(value, f"{key}.")


class TaskConfig(Registry):
    """Base of the task family; ``kind`` selects the task. Kinds are declared by name and their
    modules (with the data stack they read) load when a config names them: ``lm`` and ``mmm``
    here, others as entry points of the ``multimodal_moe.tasks`` group (this distribution's
    ``vqa`` and ``retrieval``, in ``eval_tasks``; any installed package can add its own)."""

    entry_points: ClassVar[str | None] = "multimodal_moe.tasks"
    unilm_heads: ClassVar[HeadMap | None] = None  # unilm's beit3 names for the heads; None: unilm has none
    downstream: ClassVar[bool] = False  # a fine-tuned task: mm.load_checkpoint gives the task, heads and all
    predicts_label_free: ClassVar[bool] = False  # its evaluate(predict=True) answers a split without labels

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]] | None:
        """The one number a summary table shows of this task's evaluation ``results`` (its
        ``results.json``): (metric, value, {baseline: value}); None for a task without one."""
        return None

    def check_model(self, model: ModelConfig) -> None:
        """Raise :class:`~multimodal_moe.configurable.ConfigError` if the task cannot train ``model``."""

    def check_data(self) -> None:
        """Raise ``FileNotFoundError`` naming every shard set (``shards``, ``eval_shards``) and
        file (``path``: tokenizer, codebook) of this config, at any depth, that is not there;
        called before the model is built, so a typo costs no model build."""
        from data_pipelines.paths import data_path
        from data_pipelines.shards import shard_urls

        problems = []
        for key, value in _data_fields(self, ""):
            try:
                if isinstance(value, tuple):
                    shard_urls([str(data_path(s)) for s in value])
                elif not data_path(value).is_file():
                    raise FileNotFoundError(f"{value} not found")
            except FileNotFoundError as e:
                problems.append(f"task.{key}: {e}")
        if problems:
            raise FileNotFoundError("the task's data is not there:\n  " + "\n  ".join(problems))

    def build(self, model: nn.Module) -> Task:
        """The task around the backbone ``model`` (heads initialised from the global RNG)."""
        raise NotImplementedError

    def with_heads_of(self, saved: TaskConfig | None) -> TaskConfig:
        """This config, taking from ``saved`` (the config a checkpoint was written with) what its
        heads' weights depend on and this one leaves open; used to evaluate a checkpoint."""
        return self

    def heads_depend_on(self) -> dict[str, Any]:
        """What the heads' weights mean beyond their shapes (a VQA head's answer list, in its
        order); two configs whose heads have the same names and shapes can share head weights
        only if these agree."""
        return {}

    # -- heads in unilm's BEiT-3 checkpoints (``unilm_heads``; eval_tasks.beit3_convert converts them) --

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> TaskConfig:
        """The config of this task with the unilm head ``heads`` (complete, under our names),
        over an encoder of width ``dim``; raise ``ConversionError`` if the head does not fit it
        and ``HeadsNotConverted`` if it needs what was not given.

        Args:
            tokenizer: the tokenizer the converted model expects.
            answers: the answer list given with the checkpoint (``--answers``), for a head
                whose outputs are answers.
        """
        raise NotImplementedError(f"the {cls.kind} task declares unilm heads but not how to read them")

    def write_unilm_files(self, dst: Path, model: ModelConfig) -> list[str]:
        """Write what goes beside this task's heads exported to unilm's layout in the file
        ``dst`` (as ``<dst>.<name>``) and return notes for the user; by default nothing."""
        return []


TaskConfig.register_lazy("lm", "multimodal_moe.tasks.lm:LanguageModelingConfig")
TaskConfig.register_lazy("mmm", "multimodal_moe.tasks.mmm:MaskedDataModelingConfig")


class Task(nn.Module):
    """Base class: ``self.model`` is the backbone; subclasses add heads and define
    :meth:`forward` and :meth:`train_data`."""

    def __init__(self, cfg: TaskConfig, model: nn.Module):
        """Keep ``cfg`` and the backbone ``model``, after ``cfg.check_model(model.cfg)``."""
        super().__init__()
        cfg.check_model(model.cfg)
        self.cfg, self.model = cfg, model

    def forward(self, batch: Any) -> TaskOutput:
        raise NotImplementedError

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> TrainData:
        """This task's training stream for this rank; every random choice derives from ``seed``;
        ``pin_memory`` puts batches in page-locked memory (for a GPU)."""
        raise NotImplementedError

    def prepare_step(self, micro_batches: list) -> list:
        """The micro-batches of one update as :meth:`forward` should get them, given all of them
        at once (e.g. to normalise a loss over the whole update); by default unchanged."""
        return micro_batches

    def resolved_config(self) -> TaskConfig:
        """The task's config with whatever it settled when built that its weights depend on (a
        VQA answer list drawn from the shards); checkpoints store this one."""
        return self.cfg

    def lr_scales(self) -> dict[str, float]:
        """Parameter name -> learning-rate multiplier (e.g. a fine-tuning head's); others 1."""
        return {}

    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False
                 ) -> dict[str, Any]:
        """Metrics on the task's held-out data (and files for ``out_dir``); not every task has them."""
        raise NotImplementedError(f"the {type(self).__name__} task has no evaluation")

    def uses_every_parameter(self) -> bool:
        """Whether every step's loss depends on every parameter (else DDP must look for unused ones)."""
        return True

    # -- hooks for timm's optimizer factory (weight decay exclusions, layer-wise lr decay) --

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay beyond the 1-D ones: positions, CLS and mask tokens,
        and the experts' biases and Sub-LN affines (per expert, so 2-D, but biases and norms as
        a dense FFN's 1-D ones are)."""
        return {name for name, p in self.named_parameters()
                if re.search(r"(pos_embed|cls_token|mask_token|experts\.(b[123]_E[DF]|norm_(weight|bias)_EF))$", name)}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for layer-wise lr decay: embeddings first, then one group per block; heads
        and final norms fall into the last group."""
        return {"stem": r"^model\.(?:vision_embed|text_embed|tok_embed|pos_embed)",
                "blocks": r"^model\.layers\.(\d+)"}
