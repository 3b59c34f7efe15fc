"""The typed batches the pipelines yield and objectives and tasks consume.

Conventions: images are float (B, 3, H, W), already normalised; ``image_mask_BP`` is True at
masked patches (row-major over the patch grid, P = (H/p)(W/p)); ``padding_mask_BL`` is True at
padding (torchscale's convention); label tensors hold -100 where there is nothing to predict.
Every batch also carries ``keys`` (the samples' webdataset keys), ``skipped`` (bad samples its
worker skipped since its previous batch, per reason) and ``position`` (where its worker's stream
stood; used by :class:`~data_pipelines.streams.StreamLoader` to resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["Batch", "ClassificationBatch", "ImageBatch", "ImageTextBatch", "LMBatch", "RetrievalBatch", "TextBatch",
           "VQABatch", "pinned"]


def pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory, for an asynchronous copy to a GPU; tensors already on a
    device (or already pinned) as they are."""
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


@dataclasses.dataclass(kw_only=True)
class Batch:
    keys: list[str]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    position: tuple[int, ...] = ()

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A copy with ``fn`` applied to every tensor field."""
        return type(self)(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                             for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this
        return self.map_tensors(pinned)

    def __len__(self) -> int:
        return len(self.keys)


@dataclasses.dataclass(kw_only=True)
class ImageBatch(Batch):
    """Images for masked image modeling: ``images_B3HW``, ``image_mask_BP``."""
    images_B3HW: torch.Tensor
    image_mask_BP: torch.Tensor | None = None


@dataclasses.dataclass(kw_only=True)
class TextBatch(Batch):
    """Text for masked language modeling: the corrupted ``text_ids_BL`` and ``mlm_labels_BL``."""
    text_ids_BL: torch.Tensor
    padding_mask_BL: torch.Tensor
    mlm_labels_BL: torch.Tensor | None = None


@dataclasses.dataclass(kw_only=True)
class ImageTextBatch(Batch):
    """Image-text pairs, both sides masked for masked data modeling (or plain, for contrastive use)."""
    images_B3HW: torch.Tensor
    text_ids_BL: torch.Tensor
    padding_mask_BL: torch.Tensor
    image_mask_BP: torch.Tensor | None = None
    mlm_labels_BL: torch.Tensor | None = None


@dataclasses.dataclass(kw_only=True)
class VQABatch(Batch):
    """Image + question, one row per question (the rows of one image's questions hold the same
    image); the raw answers (10 per question, none in a label-free split), the question and
    answer types ("" where the data has none) and, given an answer vocabulary, the soft-score
    targets ``targets_BA``. ``question_ids`` are as the data has them: integers or strings."""
    images_B3HW: torch.Tensor
    text_ids_BL: torch.Tensor
    padding_mask_BL: torch.Tensor
    question_ids: list[int | str]
    question_types: list[str]
    answers: list[list[str]]
    answer_types: list[str] = dataclasses.field(default_factory=list)
    targets_BA: torch.Tensor | None = None


@dataclasses.dataclass(kw_only=True)
class RetrievalBatch(Batch):
    """Images and captions: ``caption_image_N[n]`` is the batch row of caption n's image.
    Training takes one caption per image (N = B); evaluation takes them all."""
    images_B3HW: torch.Tensor
    image_ids: list[str]
    text_ids_NL: torch.Tensor
    padding_mask_NL: torch.Tensor
    caption_image_N: torch.Tensor


@dataclasses.dataclass(kw_only=True)
class LMBatch(Batch):
    """Packed token sequences of T + 1 ids: inputs ``ids_BT[:, :-1]``, targets ``ids_BT[:, 1:]``.
    Rows cut across documents, so ``keys`` is empty."""
    ids_BT: torch.Tensor

    def __len__(self) -> int:
        return self.ids_BT.shape[0]


@dataclasses.dataclass(kw_only=True)
class ClassificationBatch(Batch):
    """Images and their class indices ``labels_B``; in training, the soft targets ``targets_BC``
    the loss reads (label smoothing, Mixup / CutMix: the images are mixed to match)."""
    images_B3HW: torch.Tensor
    labels_B: torch.Tensor
    targets_BC: torch.Tensor | None = None
