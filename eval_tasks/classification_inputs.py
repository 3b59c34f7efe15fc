"""The inputs of image classification: ``classification`` shards or image folders in ImageNet's
layout read directly (``folder:PATH``), the class list they give, and timm's augmentations run
deterministically (RandAugment per sample, random erasing and Mixup / CutMix per batch, each
with Python's, NumPy's and torch's global RNGs seeded from the sample's or batch's seed and
restored afterwards). The task itself is :mod:`eval_tasks.classification`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as VF

from data_pipelines.images import ImageTransform, RandomCropTransform
from data_pipelines.paths import data_path
from data_pipelines.shards import safe_key, shard_urls
from data_pipelines.skips import TEXT, SkipCounter, SkipSample, decode_record
from data_pipelines.sources import class_images, image_classes
from data_pipelines.streams import Processor, ShardStream, StreamLoader, derive_seed
from data_pipelines.tars import tar_samples
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.models.beit3_weights import ConversionError
from multimodal_moe.tasks.stream_config import StreamConfig

__all__ = ["ClassificationStreamConfig", "ClassificationTrainTransform", "ImageFolderStream", "MixupCutmix",
           "class_names", "read_classes"]

if TYPE_CHECKING:
    from .classification import ClassificationConfig

FOLDER = "folder:"  # a shards entry naming an image folder in ImageNet's layout, read directly
# RandAugment's magnitudes are clamped to 10; at exactly 10 its increasing posterize asks Pillow for 0
# bits, which Pillow >= 10 refuses (it made a black image before): a hair under 10, it keeps 1 bit
MAGNITUDE_MAX = 10 - 1e-6


# -- inputs: shards or image folders ----------------------------------------------------------------

def is_folder(spec: str) -> bool:
    return spec.startswith(FOLDER)


def folder_path(spec: str) -> Path:
    return data_path(spec[len(FOLDER):])


def check_input(spec: str) -> None:
    """FileNotFoundError unless ``spec`` (shards, or ``folder:PATH``) is there."""
    if not is_folder(spec):
        shard_urls(str(data_path(spec)))
    elif not folder_path(spec).is_dir():
        raise FileNotFoundError(f"image folder {folder_path(spec)} not found")


class ImageFolderStream(ShardStream):
    """:class:`ShardStream`'s batching, splitting across ranks and workers, skipping and resume
    over image folders in ImageNet's layout (:func:`~data_pipelines.sources.class_images`): a raw
    sample is one file, its bytes (any format Pillow reads) and ``json`` ``{"label": its class
    folder}``. Training deals each pass over the images, in a permutation seeded by (seed, epoch,
    pass), round-robin to the (rank, worker) slots, pass after pass; evaluation deals the images
    in order, each once. A resumed stream reads the files it passes over again (not decoded)."""

    def __init__(self, folders: Sequence[str | Path], processor: Processor, *, batch_size: int,
                 resampled: bool = True, epoch_batches: int = 1000, seed: int = 0):
        super().__init__([], processor, batch_size=batch_size, resampled=resampled, epoch_batches=epoch_batches,
                         shuffle_buffer=0, seed=seed)
        self.images = [(str(path), safe_key(str(path.relative_to(folder).with_suffix(""))),
                        json.dumps({"label": path.relative_to(folder).parts[0]}).encode())
                       for folder in map(Path, folders) for path, _ in class_images(folder)]
        self.urls = [path for path, _, _ in self.images]  # what errors name

    def _raw_samples(self, rank: int, world: int, worker: int, workers: int, epoch: int,
                     skips: SkipCounter, read: list[int]) -> Iterator[dict]:
        slot, slots = rank * workers + worker, world * workers
        passes = itertools.count() if self.resampled else [None]
        for n in passes:
            order = list(range(len(self.images)))
            if n is not None:
                random.Random(derive_seed(self.seed, epoch, n, 4)).shuffle(order)  # the same on every slot
            for i in order[slot::slots] or (order if self.resampled else []):
                path, key, label = self.images[i]
                sample = {"__key__": key, "__url__": path, "json": label}
                try:
                    sample["jpg"] = Path(path).read_bytes()  # the field name only says "an image": Pillow sniffs
                except OSError:
                    pass  # the processor skips it as missing_field
                read[0] += 1
                yield sample


@config
class ClassificationStreamConfig(StreamConfig):
    """:class:`StreamConfig` whose ``shards`` may instead name image folders in ImageNet's
    layout, read directly: ``folder:PATH`` (``PATH/<class>/<image>``; all entries or none)."""

    shards: tuple[str, ...] = ("bundled:classification/train",)

    def check(self) -> None:
        StreamConfig.check(self)
        folders = [is_folder(s) for s in self.shards]
        if any(folders) and not all(folders):
            raise ConfigError("shards", f"mixes image folders ({FOLDER}PATH) and shards: {list(self.shards)}; "
                                        f"write the folders as shards (mmoe data write-shards classification) or "
                                        f"name folders only")
        if any(folders) and self.weights:
            raise ConfigError("weights", "image folders are read with equal weight per image; drop the weights")

    def loader(self, processor: Processor, *, seed: int, num_workers: int, pin_memory: bool = False) -> StreamLoader:
        if not is_folder(self.shards[0]):
            return StreamConfig.loader(self, processor, seed=seed, num_workers=num_workers, pin_memory=pin_memory)
        stream = ImageFolderStream([folder_path(s) for s in self.shards], processor, batch_size=self.batch_size,
                                   seed=seed)
        return StreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def _labels_in_shards(shards: Sequence[str]) -> tuple[set[str], int]:
    """(the class names of the samples' json labels, 1 + the largest ``cls`` index) in ``shards``."""
    names, indices = set(), 0
    skips = SkipCounter()
    for sample in tar_samples(shard_urls([str(data_path(s)) for s in shards]), skips):
        try:
            if "json" in sample:
                names.add(decode_record(sample["json"], {"label": TEXT})["label"])
            elif sample.get("cls", b"").strip().isdigit():
                indices = max(indices, int(sample["cls"]) + 1)
        except SkipSample as skip:
            skips.add(skip, where=f"{sample.get('__url__')}:{sample.get('__key__')}")
    return names, indices


def class_names(cfg: ClassificationConfig) -> list[str]:
    """The classes a head of ``cfg`` predicts, in order: ``cfg.classes``; else those of its
    training data: the class folders of ``folder:`` inputs (sorted, as ``ImageFolder``), or the
    sorted json labels of its shards (a pass over them; shards with ``cls`` alone: ``class_0``
    ... ``class_<max>``)."""
    if cfg.classes:
        return list(cfg.classes)
    shards = list(cfg.train.shards)
    if is_folder(shards[0]):
        return sorted({name for s in shards for name in image_classes(folder_path(s))})
    names, indices = _labels_in_shards(shards)
    if not names and not indices:
        raise ValueError(f"no sample of {shards} has a class (json label or cls); list them in task.classes")
    return sorted(names) if names else [f"class_{i}" for i in range(indices)]


def read_classes(path: str | Path) -> list[str]:
    """Class names in head order, one per line (blank lines ignored)."""
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise ConversionError(f"{path} names a class more than once")
    return names


# -- augmentation: timm's, seeded --------------------------------------------------------------------

@contextlib.contextmanager
def _global_rngs_seeded(seed: int, *, torch_rng: bool = False):
    """Python's and NumPy's global RNGs (and torch's, with ``torch_rng``) seeded from ``seed``
    for the block and restored afterwards: timm's augmentations draw from them."""
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state() if torch_rng else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_rng:
        torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        if torch_rng:
            torch.random.set_rng_state(saved[2])


class ClassificationTrainTransform(ImageTransform):
    """Random resized crop (bicubic) + horizontal flip, then timm's RandAugment (on the PIL image,
    as in timm's ImageNet train transform, where it replaces colour jitter); every draw from ``rng``."""

    def __init__(self, size: int, *, scale: tuple[float, float], rand_augment: str | None,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(size, mean, std)
        self.crop = RandomCropTransform(size, scale=scale, hflip=0.5, mean=mean, std=std)
        self.augment = None
        if rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            self.augment = rand_augment_transform(rand_augment, {  # timm's hparams for a train transform of size S
                "translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                "interpolation": Image.BICUBIC, "magnitude_max": MAGNITUDE_MAX})

    def pixels(self, image: Image.Image | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(int(torch.randint(0, 2**62, ()).item()))
        image = VF.to_pil_image(image) if isinstance(image, torch.Tensor) else image
        height, width = VF.get_size(image)
        top, left, h, w = self.crop.sample_crop(height, width, rng)
        image = VF.resized_crop(image, top, left, h, w, [self.size, self.size],
                                interpolation=VF.InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < self.crop.hflip:
            image = VF.horizontal_flip(image)
        if self.augment is not None:
            with _global_rngs_seeded(rng.getrandbits(63)):
                image = self.augment(image)
        return VF.pil_to_tensor(image)


@dataclasses.dataclass
class MixupCutmix:
    """What training does to a normalised batch (the processor's ``batch_augment``): timm's
    random erasing of each image (``erasing``: its probability, pixel mode, one box), then timm's
    ``Mixup`` per batch (``mixup`` / ``cutmix``: their Beta alphas, 0 = off; ``prob``: of mixing a
    batch; ``switch_prob``: of CutMix when both are on), which makes the soft targets with label
    smoothing; with neither, the targets are only smoothed. Every draw derives from ``seed``."""
    num_classes: int
    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    erasing: float = 0.25

    def __call__(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data import Mixup
        from timm.data.mixup import mixup_target
        from timm.data.random_erasing import RandomErasing

        images_B3HW = images_B3HW.clone()
        with _global_rngs_seeded(seed, torch_rng=True):
            if self.erasing > 0:
                images_B3HW = RandomErasing(self.erasing, mode="pixel", max_count=1, device="cpu")(images_B3HW)
            if self.mixup > 0 or self.cutmix > 0:
                if len(images_B3HW) % 2:
                    raise ValueError(f"Mixup / CutMix pairs a batch with its reverse: it needs an even batch, got "
                                     f"{len(images_B3HW)}")
                mix = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.prob,
                            switch_prob=self.switch_prob, mode="batch", label_smoothing=self.smoothing,
                            num_classes=self.num_classes)
                return mix(images_B3HW, labels_B)
        return images_B3HW, mixup_target(labels_B, self.num_classes, 1.0, self.smoothing)
