"""Image classification fine-tuning and evaluation (the ImageNet-1k protocol), as BEiT-3 does it.

BEiT-3 (arXiv 2208.10442), section 3.3, and unilm's ``beit3`` ``BEiT3ForImageClassification``
with its ImageNet recipe (``get_started_for_image_classification.md``):

- the vision branch alone: the Multiway encoder sees the image only;
- head: the mean of the patch tokens (the CLS token left out) -> LayerNorm (``fc_norm``) ->
  Linear; the Linear starts at unilm's init (truncated normal, std 0.02, zero bias) times
  ``init_scale`` 0.001, so the first logits are near zero;
- training transform: random resized crop (scale 0.08-1, bicubic) + flip, timm's RandAugment
  ``rand-m9-mstd0.5-inc1`` (Cubuk et al., arXiv 1909.13719), random erasing 0.25 (Zhong et al.,
  arXiv 1708.04896), ImageNet mean/std; per batch, timm's Mixup 0.8 (Zhang et al., arXiv
  1710.09412) / CutMix 1.0 (Yun et al., arXiv 1905.04899), one of the two per batch (switch
  0.5), with label smoothing 0.1, and the soft-target cross-entropy;
- evaluation: the shorter side to S / ``eval_crop_pct`` (unilm: 1), a centre crop of S;
- metric: top-1 and top-5 accuracy, beside the chance and majority-class baselines;
- inputs: ``classification`` shards (an image + ``cls`` and/or ``json`` ``{"label"}``) or image
  folders in ImageNet's layout read directly: ``folder:PATH`` in ``shards`` / ``eval_shards``
  (``PATH/<class>/<image>``, classes sorted as torchvision's ``ImageFolder`` sorts them);
- the class names are part of the config (``classes``, in head order), so a checkpoint knows its
  labels; unilm's ImageNet checkpoints convert (:mod:`eval_tasks.beit3_convert`): its ``fc_norm``
  and ``head`` are ours, the class names come from a file (``--answers``, one per line) or are
  ``class_0`` ... ``class_<C-1>``.

Deviations: timm's augmentations draw from Python's, NumPy's and torch's global RNGs; here they
run with those seeded from the sample's (RandAugment) or the batch's (erasing, Mixup/CutMix) seed
and restored afterwards, so the stream stays deterministic and resumable. Random erasing runs on
the normalised batch in the collate (timm erases each normalised image in its transform): the
same per-image draw, from the batch's seed. Mixup/CutMix mixes each rank's batch, as unilm does.
RandAugment's magnitude is clamped a hair under 10 (timm: 10), as current Pillow refuses the 0-bit
posterize that a magnitude of exactly 10 asks for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.batches import ClassificationBatch
from data_pipelines.images import BEIT3_MEAN, BEIT3_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, eval_transform
from data_pipelines.processors import ClassificationProcessor
from data_pipelines.streams import ShardStream
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.models import ModelConfig, ModelOutput
from multimodal_moe.models.beit3_weights import ConversionError, HeadMap, check_shapes
from multimodal_moe.plots import figure
from multimodal_moe.tasks.base import TaskConfig, TaskOutput
from multimodal_moe.tasks.stream_config import TokenizerConfig

from .classification_inputs import (FOLDER, ClassificationStreamConfig, ClassificationTrainTransform,
                                    ImageFolderStream, MixupCutmix, check_input, class_names, folder_path, is_folder,
                                    read_classes)
from .finetune import Finetune, FinetuneConfig, ImageInput, gather_counts, gather_lists, is_main_rank

__all__ = ["Classification", "ClassificationConfig", "classification_baselines", "top_k_accuracy"]

log = logging.getLogger("eval_tasks")

INIT_SCALE = 1e-3  # unilm's init_scale of the classifier
KS = (1, 5)
CLASSES_FILE = "classes.txt"  # what --to unilm writes beside the head: one class name per line, in head order
UNILM_HEADS = HeadMap(names={n: n for n in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")})
NORMALIZATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "beit3": (BEIT3_MEAN, BEIT3_STD)}


# -- the config ---------------------------------------------------------------------------------------

@TaskConfig.register("classification")
@config
class ClassificationConfig(FinetuneConfig):
    """Image classification fine-tuning; see the module docstring. Beyond :class:`FinetuneConfig`
    (``crop_scale``: the random resized crop's area range, default ImageNet's 0.08-1):

    Attributes:
        train: the training stream (shards, or ``folder:PATH`` image folders).
        classes: class names in the head's order; empty: from the training data (:func:`class_names`).
        normalize: the pixel mean/std: ``imagenet`` (unilm's ImageNet recipe) or ``beit3`` (0.5/0.5).
        rand_augment: timm's RandAugment config string; null: none.
        random_erasing: probability of erasing a box of each training image (timm, pixel mode).
        mixup, cutmix: Beta alphas of Mixup and CutMix (0: off); on, the batch size must be even.
        mixup_prob: probability of mixing a batch; mixup_switch_prob: of CutMix when both are on.
        label_smoothing: of the (mixed) targets.
        eval_crop_pct: evaluation resizes the shorter side to S / eval_crop_pct, then crops S x S.
    """

    train: ClassificationStreamConfig = ClassificationStreamConfig(batch_size=32)
    eval_shards: tuple[str, ...] = ("bundled:classification/val",)
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    classes: tuple[str, ...] = ()
    normalize: Literal["imagenet", "beit3"] = "imagenet"
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    eval_crop_pct: float = 1.0
    unilm_heads: ClassVar[HeadMap] = UNILM_HEADS

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
        base = results["baselines"]
        return "classification top-1", results["top1"], {"majority class": base["majority_top1"],
                                                         "chance": base["chance_top1"]}

    def check(self) -> None:
        FinetuneConfig.check(self)
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError("classes", "lists a class more than once")
        if self.eval_shards and any(is_folder(s) for s in self.eval_shards) != all(map(is_folder, self.eval_shards)):
            raise ConfigError("eval_shards", f"mixes image folders ({FOLDER}PATH) and shards: {list(self.eval_shards)}")
        for name in ("random_erasing", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"is a probability in [0, 1], got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("mixup", f"mixup and cutmix are Beta alphas >= 0 (0: off), got {self.mixup} and "
                                       f"{self.cutmix}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ConfigError("eval_crop_pct", f"must be in (0, 1], got {self.eval_crop_pct}")
        if (self.mixup or self.cutmix) and self.train.batch_size % 2:
            raise ConfigError("train.batch_size", f"Mixup / CutMix pair a batch with its reverse: the batch size "
                                                  f"must be even, got {self.train.batch_size} (or set mixup and "
                                                  f"cutmix to 0)")
        if self.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.rand_augment, {})
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise ConfigError("rand_augment", f"{self.rand_augment!r} is not a timm RandAugment string such as "
                                                  f"'rand-m9-mstd0.5-inc1' ({e})") from None

    def check_data(self) -> None:
        problems = []
        for key, specs in (("train.shards", self.train.shards), ("eval_shards", self.eval_shards)):
            for spec in specs:
                try:
                    check_input(spec)
                except FileNotFoundError as e:
                    problems.append(f"task.{key}: {e}")
        if problems:
            raise FileNotFoundError("the task's data is not there:\n  " + "\n  ".join(problems))

    def with_heads_of(self, saved: TaskConfig | None) -> ClassificationConfig:
        """The checkpoint's class list (its head's order) unless this config lists one."""
        if not self.classes and isinstance(saved, ClassificationConfig) and saved.classes:
            return dataclasses.replace(self, classes=saved.classes)
        return self

    def heads_depend_on(self) -> dict[str, Any]:
        return {"classes": tuple(self.classes)}

    def build(self, model: nn.Module) -> Classification:
        return Classification(self, model)

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> ClassificationConfig:
        """A config with one class per output of unilm's ImageNet head: the names in ``answers``
        (a file, one per line, in head order) or ``class_0`` ... ``class_<C-1>``. The tokenizer
        is not needed: the task reads images only."""
        C = heads["head.weight"].shape[0]
        classes = read_classes(answers) if answers is not None else [f"class_{i}" for i in range(C)]
        if len(classes) != C:
            raise ConversionError(f"the classification head has {C} classes, the class list {answers} {len(classes)}")
        check_shapes(heads, {"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (C, dim),
                             "head.bias": (C,)}, f"the {cls.kind} head", UNILM_HEADS.their_name)
        return cls(classes=tuple(classes))

    def write_unilm_files(self, dst: Path, model: ModelConfig) -> list[str]:
        """The class names in head order, one per line, as ``<dst>.classes.txt``; a note if the
        encoder has the final LayerNorm that unilm's ImageNet model lacks (``normalize_output=False``)."""
        notes = []
        if model.normalize_output:
            notes.append("unilm's ImageNet model has no final LayerNorm, this one does (beit3.encoder.layer_norm.*): "
                         "build unilm's model with normalize_output=True to use it")
        path = Path(f"{dst}.{CLASSES_FILE}")
        path.write_text("".join(f"{c}\n" for c in class_names(self)), encoding="utf-8")
        return [*notes, f"class names in head order: {path}"]


# -- metrics ------------------------------------------------------------------------------------------

def top_k_accuracy(ranked: Sequence[Sequence[int]], labels: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """``top{k}``: the percentage of samples whose label is among the first k of its ranked classes."""
    return {f"top{k}": 100 * sum(label in row[:k] for row, label in zip(ranked, labels)) / max(len(labels), 1)
            for k in ks}


def classification_baselines(labels: Sequence[int], classes: Sequence[str], ks: Sequence[int] = KS) -> dict:
    """Two reference points (x 100): ``chance``, ranking the classes at random (k / C);
    ``majority``, always ranking the split's most frequent classes first (the best any
    constant answer scores on this split)."""
    counts = Counter(labels)
    by_frequency = [c for c, _ in counts.most_common()]
    out = {"majority_class": classes[by_frequency[0]] if by_frequency else ""}
    for k in ks:
        out[f"majority_top{k}"] = 100 * sum(n for _, n in counts.most_common(k)) / max(len(labels), 1)
        out[f"chance_top{k}"] = 100 * min(k, len(classes)) / len(classes)
    return out


# -- the task -----------------------------------------------------------------------------------------

class Classification(Finetune):
    """The ``classification`` task: fc_norm and a linear classifier over the mean patch token."""

    def __init__(self, cfg: ClassificationConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.classes = class_names(cfg)
        D = model.cfg.dim
        self.fc_norm, self.head = nn.LayerNorm(D), nn.Linear(D, len(self.classes))
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.02, b=0.02)  # unilm truncates at one std
        with torch.no_grad():
            self.head.weight.mul_(INIT_SCALE)
        nn.init.zeros_(self.head.bias)

    def resolved_config(self) -> ClassificationConfig:
        return dataclasses.replace(self.cfg, classes=tuple(self.classes))

    def transform(self, train: bool) -> ImageTransform:
        size, (mean, std) = self.model.cfg.image_size, NORMALIZATION[self.cfg.normalize]
        if train:
            return ClassificationTrainTransform(size, scale=tuple(self.cfg.crop_scale),
                                                rand_augment=self.cfg.rand_augment, mean=mean, std=std)
        return eval_transform(size, mode="center_crop", crop_pct=self.cfg.eval_crop_pct, mean=mean, std=std)

    def batch_augment(self) -> MixupCutmix:
        cfg = self.cfg
        return MixupCutmix(len(self.classes), mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, smoothing=cfg.label_smoothing, erasing=cfg.random_erasing)

    def processor(self, train: bool) -> ClassificationProcessor:
        return ClassificationProcessor(self.transform(train), self.classes,
                                       batch_augment=self.batch_augment() if train else None)

    def eval_stream(self) -> ShardStream:
        if not is_folder(self.cfg.eval_shards[0]):
            return super().eval_stream()
        return ImageFolderStream([folder_path(s) for s in self.cfg.eval_shards], self.processor(False),
                                 batch_size=self.cfg.eval_batch_size, resampled=False)

    def logits(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """Class scores (B, C) in fp32, and the encoder's output (for its MoE losses and stats)."""
        out = self.model(images=images_B3HW)
        return self.head(self.fc_norm(out.hidden[:, 1:].mean(1))).float(), out

    def forward(self, batch: ClassificationBatch) -> TaskOutput:
        logits_BC, out = self.logits(batch.images_B3HW)
        if batch.targets_BC is not None:  # training: the (mixed, smoothed) soft targets
            loss = -(batch.targets_BC * logits_BC.log_softmax(-1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits_BC, batch.labels_B, label_smoothing=self.cfg.label_smoothing)
        top1 = (logits_BC.argmax(1) == batch.labels_B).float().mean()  # against each image's own label
        tokens = out.hidden.shape[0] * out.hidden.shape[1]
        return TaskOutput(loss + out.aux_loss, {"classification_loss": loss.detach(), "train_top1": top1,
                                                "aux_loss": out.aux_loss.detach()},
                          samples=len(batch), tokens=tokens, moe_stats=[out.moe_stats])

    # -- inference --

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], *, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Each image's ``top_k`` classes with their probabilities (softmax), best first."""
        if not images or top_k < 1:
            raise ValueError(f"give at least one image and top_k >= 1; got {len(images)} images, top_k {top_k}")
        probabilities, indices = self.logits(self.pixels(images))[0].softmax(-1).topk(min(top_k, len(self.classes)))
        return [[(self.classes[i], round(p, 4)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(indices.tolist(), probabilities.tolist())]

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        return [{"classes": [{"class": c, "probability": p} for c, p in self.predict(images, top_k=top_k)[0]]}]

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
        """Top-1 and top-5 accuracy on ``eval_shards`` (every rank scores its share; all get the
        whole report), per class too, beside the chance and majority baselines; to ``out_dir``
        (rank 0) each image's top-5 classes, ``classification_predictions.json``, and the accuracy
        per class, ``plots/classification_accuracy_per_class.png`` (up to 60 classes)."""
        self.eval()
        device = self._device()
        keys, labels, ranked, skipped = [], [], [], Counter()
        k = min(max(KS), len(self.classes))
        for batch in self.eval_batches(num_workers, skipped, progress):
            logits_BC, _ = self.logits(batch.images_B3HW.to(device))
            ranked += logits_BC.topk(k, dim=1).indices.tolist()
            labels += batch.labels_B.tolist()
            keys += batch.keys
        self.train()
        keys, labels, ranked = gather_lists(keys, labels, ranked)
        report: dict[str, Any] = {"images": len(labels), "classes": len(self.classes),
                                  **top_k_accuracy(ranked, labels)}
        per_class = {self.classes[c]: top_k_accuracy([r for r, y in zip(ranked, labels) if y == c], [c] * n,
                                                     (1,))["top1"] for c, n in sorted(Counter(labels).items())}
        report.update(per_class_top1=per_class, baselines=classification_baselines(labels, self.classes),
                      skipped_samples=gather_counts(skipped))
        if out_dir is not None and is_main_rank():
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = sorted(zip(keys, labels, ranked))
            (out_dir / "classification_predictions.json").write_text(json.dumps(
                [{"key": key, "label": self.classes[y], "top5": [self.classes[i] for i in row]}
                 for key, y, row in rows]))
            if len(per_class) <= 60:
                _plot_per_class(per_class, out_dir / "plots" / "classification_accuracy_per_class.png")
        return report


def _plot_per_class(per_class: dict[str, float], path: Path) -> None:
    names = list(per_class)
    with figure(path, figsize=(6, 0.3 * len(names) + 1.2)) as (_, ax):
        ax.barh(names, [per_class[n] for n in names], color="tab:blue")
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.invert_yaxis()
