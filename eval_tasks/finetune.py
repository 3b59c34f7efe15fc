"""What the fine-tuning tasks share: their config fields and checks, transforms, the training
and evaluation streams, and the preprocessing of inference inputs (images as paths, encoded
bytes or PIL images; texts as strings), the same as evaluation's. :class:`Finetune` is the
image side every downstream task has (image classification uses it alone);
:class:`ImageTextFinetune` adds the tokenizer and the text stream of the image-text tasks."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data_pipelines.images import ImageTransform, decode_image, eval_transform, finetune_transform
from data_pipelines.processors import TextProcessor
from data_pipelines.skips import SkipSample
from data_pipelines.paths import data_path
from data_pipelines.streams import Processor, ShardStream, StreamLoader, derive_seed
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.distributed.env import current
from multimodal_moe.models import ModelConfig, MultiwayEncoderConfig
from multimodal_moe.tasks.base import Task, TaskConfig
from multimodal_moe.tasks.stream_config import SingleStream, TextStreamConfig, TokenizerConfig

__all__ = ["Finetune", "FinetuneConfig", "ImageInput", "ImageTextFinetune", "ImageTextFinetuneConfig",
           "gather_counts", "gather_lists", "is_main_rank"]

ImageInput = str | os.PathLike | bytes | Image.Image  # an image file, its encoded bytes, or a decoded image


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
class FinetuneConfig(TaskConfig):
    """Fields of every fine-tuning task.

    Attributes:
        eval_shards: the held-out split scored by the task's ``evaluate``.
        eval_batch_size: samples per evaluation batch.
        crop_scale: area range of the training crop (BEiT-3: 0.5-1).
    """

    eval_shards: tuple[str, ...]
    downstream: ClassVar[bool] = True
    eval_batch_size: int = 64
    crop_scale: tuple[float, ...] = (0.5, 1.0)

    def check(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("crop_scale", f"must be [low, high] in (0, 1], got {list(self.crop_scale)}")

    def check_model(self, model: ModelConfig) -> None:
        if not isinstance(model, MultiwayEncoderConfig):
            raise ConfigError("kind", f"{self.kind} fine-tunes a multiway_encoder, not a {model.kind}")


@config
class ImageTextFinetuneConfig(FinetuneConfig):
    """Fields of every image-text fine-tuning task, beyond :class:`FinetuneConfig`.

    Attributes:
        train: the training stream (``max_len``: longest text in tokens).
        tokenizer: the sentencepiece model.
    """

    train: TextStreamConfig
    tokenizer: TokenizerConfig = TokenizerConfig()

    def check_model(self, model: ModelConfig) -> None:
        FinetuneConfig.check_model(self, model)
        if self.train.max_len > model.max_text_len:
            raise ConfigError("train.max_len", f"{self.train.max_len} exceeds the model's max_text_len "
                                               f"{model.max_text_len}")


class Finetune(Task):
    """Base of the fine-tuning tasks: transforms, streams, and images for inference."""

    def uses_every_parameter(self) -> bool:
        return False  # the encoder's mask token serves masked pretraining only

    def transform(self, train: bool) -> ImageTransform:
        size = self.model.cfg.image_size
        return finetune_transform(size, scale=tuple(self.cfg.crop_scale)) if train else eval_transform(size)

    def processor(self, train: bool) -> Processor:
        raise NotImplementedError

    # -- inference: what ``mmoe predict`` and ``mm.load_checkpoint(...)`` users call --

    query: ClassVar[str] = ""  # the ``mmoe predict`` flag of the texts this task reads about an image ("": none)
    images_read: ClassVar[int] = 1  # the images one prediction reads (``mmoe predict --image``, once each)

    def pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) on the task's device: each image decoded (alpha on white, as training
        does) and resized and normalised as evaluation does."""
        transform = self.transform(False)
        decoded = []
        for image in images:
            if isinstance(image, Image.Image):
                encoded = io.BytesIO()
                image.save(encoded, format="PNG")
                image = encoded.getvalue()
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            try:
                decoded.append(transform.pixels(decode_image(data)))
            except SkipSample as e:
                what = "the image bytes" if isinstance(image, bytes) else str(image)
                raise ValueError(f"{what}: {e.detail or e.reason}") from None
        return transform.normalize(torch.stack(decoded)).to(self._device())

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        """What ``mmoe predict`` prints for its ``images`` (:attr:`images_read` of them) and its
        ``--<query>`` texts, one JSON object each."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> SingleStream:
        return SingleStream(self.cfg.kind, self.cfg.train.loader(self.processor(True), seed=derive_seed(seed, 0),
                                                                  num_workers=num_workers, pin_memory=pin_memory))

    def eval_stream(self) -> ShardStream:
        """One pass over ``eval_shards`` (this rank's share under torchrun)."""
        return ShardStream([str(data_path(s)) for s in self.cfg.eval_shards], self.processor(False),
                           batch_size=self.cfg.eval_batch_size, resampled=False)

    def eval_batches(self, num_workers: int = 0, skipped: Counter | None = None, progress: bool = False
                     ) -> Iterator:
        """One pass over ``eval_shards`` (this rank's share under torchrun: gather the results
        with :func:`gather_lists`); the samples skipped are added to ``skipped`` per reason.
        ``progress``: a bar of the batches on rank 0."""
        batches = StreamLoader(self.eval_stream(), num_workers=num_workers)
        for batch in tqdm(batches, desc=f"evaluate {self.cfg.kind}", unit="batch", leave=False,
                          disable=not (progress and is_main_rank())):
            if skipped is not None:
                skipped.update(batch.skipped)
            yield batch


class ImageTextFinetune(Finetune):
    """Base of the image-text fine-tuning tasks: :class:`Finetune` plus the tokenizer."""

    def __init__(self, cfg: ImageTextFinetuneConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.tokenizer = cfg.tokenizer.load(model.cfg.vocab_size)

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_NL, padding_NL) on the task's device, each text tokenised as in training
        (``[bos] ... [eos]``, at most ``train.max_len`` tokens; True marks padding)."""
        try:
            seqs = [self.tokenizer.encode_for_model(t, self.cfg.train.max_len) for t in texts]
        except SkipSample as e:
            raise ValueError(f"a text has no tokens or is not UTF-8: {e}") from None
        ids_NL, padding_NL, _ = TextProcessor(self.tokenizer, self.cfg.train.max_len, None).text_batch(seqs, 0)
        return ids_NL.to(self._device()), padding_NL.to(self._device())
