"""Image-text retrieval fine-tuning and evaluation (COCO / Flickr30k protocol), as BEiT-3 does it.

BEiT-3 (arXiv 2208.10442), section 3.2, and unilm's ``beit3`` retrieval handler:

- dual encoding with the one Multiway encoder: the image alone through the vision path, the
  text alone through the language path (with the decoupled layout the two towers share no
  weights, only code);
- features: the image CLS and the text's first token (BOS), each through its own linear
  projection (``vision_head`` / ``language_head``), L2-normalised;
- loss: CLIP's symmetric cross-entropy (Radford et al., arXiv 2103.00020) with a learnable
  logit scale, initialised to 1/0.07 and clamped to 100; across ranks the features are
  all-gathered *with* their gradient and each rank scores its own rows against everyone's
  (open_clip's ``local_loss`` + ``gather_with_grad``), which averaged over ranks is the loss
  of the global batch;
- metric: recall@1/5/10 both ways over unique images and all their captions
  (:mod:`eval_tasks.retrieval_metric`), with the recall a random ranking would get;
- unilm's retrieval checkpoints: its ``vision_head``, ``language_head`` and ``logit_scale`` are
  ours (its 0-d logit scale 1-D here), converted by :mod:`eval_tasks.beit3_convert`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.batches import RetrievalBatch
from data_pipelines.processors import RetrievalProcessor
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.distributed.env import current
from multimodal_moe.models import ModelOutput
from multimodal_moe.models.beit3_weights import HeadMap, check_shapes
from multimodal_moe.plots import figure
from multimodal_moe.tasks.base import TaskConfig, TaskOutput
from multimodal_moe.tasks.stream_config import TextStreamConfig, TokenizerConfig

from .finetune import (ImageInput, ImageTextFinetune, ImageTextFinetuneConfig, gather_counts, gather_lists,
                       is_main_rank)
from .retrieval_metric import retrieval_recall

__all__ = ["Retrieval", "RetrievalConfig", "chance_recall", "clip_loss"]

KS = (1, 5, 10)
UNILM_HEADS = HeadMap(names={name: name for name in ("vision_head.weight", "language_head.weight", "logit_scale")},
                      scalars=frozenset({"logit_scale"}))


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order, this rank's still carrying their gradient."""
    if not current().distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def clip_loss(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows; across ranks, this rank's rows against all ranks'.
    In fp32 under autocast too (the similarities are the logits)."""
    all_images, all_texts = _gather_with_grad(image_BE), _gather_with_grad(text_BE)
    offset = current().rank * image_BE.shape[0] if all_images.shape[0] != image_BE.shape[0] else 0
    labels = torch.arange(image_BE.shape[0], device=image_BE.device) + offset
    with torch.autocast(image_BE.device.type, enabled=False):
        scale = logit_scale.float().exp().clamp(max=100)
        return (F.cross_entropy(scale * image_BE.float() @ all_texts.float().t(), labels)
                + F.cross_entropy(scale * text_BE.float() @ all_images.float().t(), labels)) / 2


def chance_recall(caption_image_N: torch.Tensor, images: int, ks=KS) -> dict[str, float]:
    """The expected recall@k (percent) of a uniformly random ranking."""
    counts = torch.bincount(caption_image_N, minlength=images).tolist()
    N = len(caption_image_N)
    out = {}
    for k in ks:
        miss = [math.prod((N - c - j) / (N - j) for j in range(min(k, N))) for c in counts]
        out[f"i2t_r{k}"] = 100 * (1 - sum(miss) / len(miss))
    for k in ks:
        out[f"t2i_r{k}"] = 100 * min(k, images) / images
    out["r_mean"] = sum(out.values()) / len(out)
    return out


@TaskConfig.register("retrieval")
@config
class RetrievalConfig(ImageTextFinetuneConfig):
    """Retrieval fine-tuning; see the module docstring. The training stream pairs each image
    with one of its captions; evaluation scores every caption. Beyond
    :class:`ImageTextFinetuneConfig`:

    Attributes:
        embed_dim: width of the projected features (default: the model width).
    """

    train: TextStreamConfig = TextStreamConfig(shards=("bundled:retrieval/train",), batch_size=32, max_len=32)
    eval_shards: tuple[str, ...] = ("bundled:retrieval/val",)
    embed_dim: int | None = None
    unilm_heads: ClassVar[HeadMap] = UNILM_HEADS

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
        return "retrieval mean recall", results["r_mean"], {"chance": results["baselines"]["chance"]["r_mean"]}

    def check(self) -> None:
        ImageTextFinetuneConfig.check(self)
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError("embed_dim", f"must be positive or null, got {self.embed_dim}")

    def build(self, model: nn.Module) -> Retrieval:
        return Retrieval(self, model)

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> RetrievalConfig:
        """A config whose ``embed_dim`` is the projections' width."""
        E = heads["vision_head.weight"].shape[0]
        check_shapes(heads, {"vision_head.weight": (E, dim), "language_head.weight": (E, dim), "logit_scale": (1,)},
                     f"the {cls.kind} head", UNILM_HEADS.their_name)
        return cls(embed_dim=None if E == dim else E, tokenizer=tokenizer)


class Retrieval(ImageTextFinetune):
    """The ``retrieval`` task: projection heads and a learnable logit scale over dual encodings."""

    def __init__(self, cfg: RetrievalConfig, model: nn.Module):
        super().__init__(cfg, model)
        D = model.cfg.dim
        E = cfg.embed_dim or D
        self.vision_head = nn.Linear(D, E, bias=False)
        self.language_head = nn.Linear(D, E, bias=False)
        for head in (self.vision_head, self.language_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # 1-D: FSDP2 shards no scalars

    def image_features(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """Unit-length image embeddings (B, E) in fp32, and the encoder's output."""
        out = self.model(images=images_B3HW)
        return F.normalize(self.vision_head(out.hidden[:, 0]).float(), dim=-1), out

    def text_features(self, ids_NL: torch.Tensor, padding_NL: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """Unit-length text embeddings (N, E) in fp32, and the encoder's output."""
        out = self.model(text_ids=ids_NL, text_padding_mask=padding_NL)
        return F.normalize(self.language_head(out.hidden[:, 0]).float(), dim=-1), out

    query: ClassVar[str] = "captions"

    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Unit-length embeddings (B, E) of images (paths, encoded bytes or PIL images)."""
        return self.image_features(self.pixels(images))[0]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings (N, E) of texts; ``encode_image(x) @ encode_text(t).T`` is the
        cosine similarity retrieval ranks by."""
        return self.text_features(*self.token_ids(texts))[0]

    def rank(self, image: ImageInput, captions: Sequence[str]) -> list[tuple[str, float]]:
        """``captions`` with their cosine similarity to ``image``, most similar first."""
        similarity = (self.encode_image([image]) @ self.encode_text(captions).t())[0].tolist()
        return sorted(((c, round(s, 4)) for c, s in zip(captions, similarity)), key=lambda cs: -cs[1])

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        [image] = images
        return [{"rank": r, "caption": c, "score": s} for r, (c, s) in enumerate(self.rank(image, texts)[:top_k], 1)]

    def forward(self, batch: RetrievalBatch) -> TaskOutput:
        if batch.caption_image_N.shape[0] != len(batch):  # a shape: no host sync
            raise ValueError(f"training batches pair each image with one caption (RetrievalProcessor("
                             f"all_captions=False)); got {batch.caption_image_N.shape[0]} captions for {len(batch)} "
                             f"images")
        image_BE, image_out = self.image_features(batch.images_B3HW)
        text_BE, text_out = self.text_features(batch.text_ids_NL, batch.padding_mask_NL)
        loss = clip_loss(image_BE, text_BE, self.logit_scale)
        aux = image_out.aux_loss + text_out.aux_loss
        with torch.no_grad():
            i2t_acc = ((image_BE @ text_BE.t()).argmax(1) == torch.arange(len(batch), device=image_BE.device))
        tokens = image_out.hidden.shape[0] * image_out.hidden.shape[1] + (~batch.padding_mask_NL).sum()
        return TaskOutput(loss + aux, {"clip_loss": loss.detach(), "aux_loss": aux.detach(),
                                       "in_batch_i2t_acc": i2t_acc.float().mean(),
                                       "logit_scale": self.logit_scale.detach().exp().squeeze()},
                          samples=len(batch), tokens=tokens, moe_stats=[image_out.moe_stats, text_out.moe_stats])

    def processor(self, train: bool) -> RetrievalProcessor:
        return RetrievalProcessor(self.tokenizer, self.transform(train), self.cfg.train.max_len,
                                  all_captions=not train)

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
        """Recall@1/5/10 both ways on ``eval_shards``; with ``out_dir``, the recall@k curves to
        ``out_dir/plots/retrieval_recall.png``."""
        self.eval()
        device = next(self.parameters()).device
        image_ids, image_rows, caption_owners, text_rows, skipped = [], [], [], [], Counter()
        for batch in self.eval_batches(num_workers, skipped, progress):
            batch = batch.to(device)
            image_BE, _ = self.image_features(batch.images_B3HW)
            text_NE, _ = self.text_features(batch.text_ids_NL, batch.padding_mask_NL)
            image_ids += batch.image_ids
            image_rows += list(image_BE.cpu())
            caption_owners += [batch.image_ids[b] for b in batch.caption_image_N.tolist()]
            text_rows += list(text_NE.cpu())
        image_ids, image_rows, caption_owners, text_rows = gather_lists(image_ids, image_rows, caption_owners,
                                                                         text_rows)
        unique: dict[str, int] = {}  # one row per image id
        for i, image_id in enumerate(image_ids):
            unique.setdefault(image_id, i)
        image_IE = torch.stack([image_rows[i] for i in unique.values()])
        row_of = {image_id: r for r, image_id in enumerate(unique)}
        text_NE, owner_N = torch.stack(text_rows), torch.tensor([row_of[i] for i in caption_owners])
        report = retrieval_recall(image_IE, text_NE, owner_N, ks=KS)
        report.update(images=image_IE.shape[0], captions=text_NE.shape[0],
                      baselines={"chance": chance_recall(owner_N, image_IE.shape[0])},
                      skipped_samples=gather_counts(skipped))
        if out_dir is not None and is_main_rank():
            curves = retrieval_recall(image_IE, text_NE, owner_N, ks=range(1, 11))
            _plot_recall(curves, Path(out_dir) / "plots" / "retrieval_recall.png")
        self.train()
        return report


def _plot_recall(curves: dict[str, float], path: Path) -> None:
    ks = list(range(1, 11))
    with figure(path, figsize=(5, 3.5)) as (_, ax):
        for direction, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
            ax.plot(ks, [curves[f"{direction}_r{k}"] for k in ks], marker="o", label=label)
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
