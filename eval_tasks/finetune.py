"""What the image-text fine-tuning tasks share: their config fields and checks, transforms,
and the training and evaluation streams."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from torch import nn
from tqdm import tqdm

from data_pipelines.images import ImageTransform, eval_transform, finetune_transform
from data_pipelines.paths import data_path
from data_pipelines.streams import Processor, ShardStream, StreamLoader, derive_seed
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.distributed.env import current
from multimodal_moe.models import ModelConfig, MultiwayEncoderConfig
from multimodal_moe.tasks.base import Task, TaskConfig
from multimodal_moe.tasks.stream_config import SingleStream, TextStreamConfig, TokenizerConfig

__all__ = ["ImageTextFinetune", "ImageTextFinetuneConfig", "gather_counts", "gather_lists", "is_main_rank"]


def gather_lists(*lists: list) -> tuple[list, ...]:
    """Each list concatenated over the ranks, in rank order, on every rank (as given on one)."""
    gathered = current().gather(lists)
    return tuple([x for rank in gathered for x in rank[i]] for i in range(len(lists)))


def gather_counts(counts: Counter) -> dict[str, int]:
    """``counts`` summed over the ranks, on every rank."""
    total: Counter = Counter()
    for rank_counts in gather_lists([dict(counts)])[0]:
        total.update(rank_counts)
    return dict(sorted(total.items()))


def is_main_rank() -> bool:
    return current().is_main


@config
class ImageTextFinetuneConfig(TaskConfig):
    """Fields of every image-text fine-tuning task.

    Attributes:
        train: the training stream (``max_len``: longest text in tokens).
        eval_shards: the held-out split scored by the task's ``evaluate``.
        eval_batch_size: samples per evaluation batch.
        tokenizer: the sentencepiece model.
        crop_scale: area range of the training crop (BEiT-3: 0.5-1).
    """

    train: TextStreamConfig
    eval_shards: tuple[str, ...]
    eval_batch_size: int = 64
    tokenizer: TokenizerConfig = TokenizerConfig()
    crop_scale: tuple[float, ...] = (0.5, 1.0)

    def check(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("crop_scale", f"must be [low, high] in (0, 1], got {list(self.crop_scale)}")

    def check_model(self, model: ModelConfig) -> None:
        if not isinstance(model, MultiwayEncoderConfig):
            raise ConfigError("kind", f"{self.kind} fine-tunes a multiway_encoder, not a {model.kind}")
        if self.train.max_len > model.max_text_len:
            raise ConfigError("train.max_len", f"{self.train.max_len} exceeds the model's max_text_len "
                                               f"{model.max_text_len}")


class ImageTextFinetune(Task):
    """Base of the image-text fine-tuning tasks: config, tokenizer, transforms, streams."""

    def __init__(self, cfg: ImageTextFinetuneConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.tokenizer = cfg.tokenizer.load(model.cfg.vocab_size)

    def uses_every_parameter(self) -> bool:
        return False  # the encoder's mask token serves masked pretraining only

    def transform(self, train: bool) -> ImageTransform:
        size = self.model.cfg.image_size
        return finetune_transform(size, scale=tuple(self.cfg.crop_scale)) if train else eval_transform(size)

    def processor(self, train: bool) -> Processor:
        raise NotImplementedError

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> SingleStream:
        return SingleStream(self.cfg.kind, self.cfg.train.loader(self.processor(True), seed=derive_seed(seed, 0),
                                                                  num_workers=num_workers, pin_memory=pin_memory))

    def eval_batches(self, num_workers: int = 0, skipped: Counter | None = None, progress: bool = False
                     ) -> Iterator:
        """One pass over ``eval_shards`` (this rank's share under torchrun: gather the results
        with :func:`gather_lists`); the samples skipped are added to ``skipped`` per reason.
        ``progress``: a bar of the batches on rank 0."""
        stream = ShardStream([str(data_path(s)) for s in self.cfg.eval_shards], self.processor(False),
                             batch_size=self.cfg.eval_batch_size, resampled=False)
        batches = StreamLoader(stream, num_workers=num_workers)
        for batch in tqdm(batches, desc=f"evaluate {self.cfg.kind}", unit="batch", leave=False,
                          disable=not (progress and is_main_rank())):
            if skipped is not None:
                skipped.update(batch.skipped)
            yield batch
