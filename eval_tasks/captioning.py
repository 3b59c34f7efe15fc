"""Image captioning fine-tuning and evaluation (COCO Karpathy protocol), as BEiT-3 does it.

BEiT-3 (arXiv 2208.10442), section 3.2, and unilm's ``beit3`` captioning model and handler
(``BEiT3ForCaptioning``, ``CaptioningHandler``), after VLP / UniLM's seq2seq masking (arXiv
1909.11059, 1905.03197):

- one encoder pass over ``[image ; caption]`` with the captioning mask
  (:func:`~multimodal_moe.models.multiway_encoder.captioning_mask`: the image sees itself, the
  caption the image and its own prefix);
- training: the caption ``[bos] ... [eos]``; ``mask_ratio`` of its tokens after bos (eos
  included, so the model learns to stop) are chosen (unilm's recipe: 0.7) and corrupted BERT-style
  (:func:`data_pipelines.text.mask_tokens`: [MASK] 80%, a random id 10%, unchanged 10%), and
  predicted by ``mlm_head`` (Linear D -> V with bias, untied from the embedding) under
  cross-entropy with label smoothing ``label_smoothing`` (0.1), spread over the V - 1 other ids as
  unilm's ``BertCaptioningLoss`` does;
- data: retrieval-kind shards (an image and its captions): training draws one caption per image
  per visit, evaluation takes every caption as a reference;
- decoding: from ``[bos]``, each step appends [MASK] at the next position and reads the
  distribution there; beam search with ``num_beams`` (3) and unilm's length penalty
  (sum of log-probs / length ** 0.6), ``num_beams: 1`` is greedy;
- metrics: BLEU-4, METEOR, ROUGE-L, CIDEr-D (:mod:`eval_tasks.caption_metric`), against the
  nearest-train-image and most-frequent-caption baselines; predictions in COCO's results format;
- unilm's captioning checkpoints: its ``mlm_head`` is ours (a pretraining checkpoint's ``mlm_head``,
  told apart by a ``mim_head`` beside it, is not converted).

Deviations: decoding recomputes the whole prefix (image included) at each step, where unilm keeps
a key-value cache (fine at debug sizes; a cache is future work); finished hypotheses keep their
beam slot and compete with the live ones, so a beam of 1 is exactly greedy (unilm keeps a separate
pool of finished ones); decoding never emits bos, pad, unk or [MASK]; unilm's drop-worst loss
(ignoring the 20% worst tokens after 12k steps) is not implemented.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.batches import RetrievalBatch
from data_pipelines.paths import data_path
from data_pipelines.processors import RETRIEVAL_RECORD, RetrievalProcessor, sample_field
from data_pipelines.skips import decode_record
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.text import IGNORE_INDEX, mask_tokens
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.distributed.env import current
from multimodal_moe.models.beit3_weights import HeadMap, check_shapes
from multimodal_moe.tasks.base import TaskConfig, TaskOutput
from multimodal_moe.tasks.stream_config import TextStreamConfig, TokenizerConfig

from .caption_metric import SKIPPED_SCORERS, caption_scores_of_sets
from .finetune import ImageInput, ImageTextFinetune, ImageTextFinetuneConfig, gather_counts, gather_lists, is_main_rank

__all__ = ["Captioning", "CaptioningConfig", "beam_search", "greedy_search", "smoothed_cross_entropy"]

UNILM_HEADS = HeadMap(names={"mlm_head.weight": "mlm_head.weight", "mlm_head.bias": "mlm_head.bias"},
                      unless=("mim_head.",))
PREDICTIONS_FILE = "caption_predictions.json"

# prefix_NL (rows grouped by image, beams together) -> log-probabilities (N, V) of the next token
NextLogProbs = Callable[[torch.Tensor], torch.Tensor]


def smoothed_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against ``1 - smoothing`` on the target and ``smoothing / (V - 1)`` on
    every other id (unilm's ``BertCaptioningLoss``, which is this minus a constant)."""
    logp_NV = F.log_softmax(logits_NV.float(), dim=-1)
    target_N = logp_NV.gather(1, targets_N[:, None])[:, 0]
    others_N = logp_NV.sum(-1) - target_N
    V = logits_NV.shape[-1]
    return -((1 - smoothing) * target_N + smoothing / (V - 1) * others_N).mean()


def greedy_search(next_logprobs: NextLogProbs, batch: int, *, bos: int, eos: int, max_new: int,
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """Each row's most likely next token until eos or ``max_new`` tokens (eos not returned)."""
    tokens_BL = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    done_B = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new):
        next_B = next_logprobs(tokens_BL).argmax(-1)
        tokens_BL = torch.cat([tokens_BL, torch.where(done_B, eos, next_B)[:, None]], dim=1)
        done_B |= next_B == eos
        if done_B.all():
            break
    return [_until_eos(row[1:], eos) for row in tokens_BL.tolist()]


def beam_search(next_logprobs: NextLogProbs, batch: int, *, bos: int, eos: int, pad: int, max_new: int,
                num_beams: int, length_penalty: float = 0.6, device: torch.device | str = "cpu") -> list[list[int]]:
    """Per row, the sequence of at most ``max_new`` tokens (eos included, not returned) with the
    best ``sum of log-probs / length ** length_penalty`` that ``num_beams`` beams find.

    A beam that emits eos is finished: it keeps its slot with its score (continued by ``pad`` at
    no cost) and competes with the live beams for the top ``num_beams``, so one beam is greedy
    and enough beams (every sequence kept) is exhaustive. ``next_logprobs`` gets the B * K
    prefixes, row b * K + k being beam k of row b. A sequence that reaches ``max_new`` tokens
    without eos ends there.
    """
    B, K = batch, num_beams
    tokens_NL = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    sums_BK = torch.zeros(B, K, device=device)
    sums_BK[:, 1:] = float("-inf")  # the beams start as one
    lengths_BK = torch.zeros(B, K, device=device)
    finished_BK = torch.zeros(B, K, dtype=torch.bool, device=device)
    for _ in range(max_new):
        logp_BKV = next_logprobs(tokens_NL).float().view(B, K, -1)
        V = logp_BKV.shape[-1]
        cand_BKV = (sums_BK[..., None] + logp_BKV).masked_fill(finished_BK[..., None], float("-inf"))
        cand_BKV[..., pad] = torch.where(finished_BK, sums_BK, float("-inf"))  # a finished beam stays itself
        new_len_BK = torch.where(finished_BK, lengths_BK, lengths_BK + 1)
        normalized_BKV = cand_BKV / new_len_BK[..., None] ** length_penalty
        index_BK = normalized_BKV.view(B, K * V).topk(K, dim=1).indices
        beam_BK, token_BK = index_BK // V, index_BK % V
        sums_BK = cand_BKV.view(B, K * V).gather(1, index_BK)
        lengths_BK = new_len_BK.gather(1, beam_BK)
        finished_BK = finished_BK.gather(1, beam_BK) | (token_BK == eos)
        rows_N = (beam_BK + torch.arange(B, device=device)[:, None] * K).view(-1)
        tokens_NL = torch.cat([tokens_NL[rows_N], token_BK.view(-1, 1)], dim=1)
        if finished_BK.all():
            break
    best_B = (sums_BK / lengths_BK.clamp(min=1) ** length_penalty).argmax(1)
    rows = tokens_NL.view(B, K, -1)[torch.arange(B, device=device), best_B].tolist()
    return [_until_eos(row[1:], eos) for row in rows]


def _coco_id(image_id: str) -> int | str:
    """COCO's image ids are integers (stored as their digits); any other id stays a string."""
    return int(image_id) if re.fullmatch(r"0|[1-9][0-9]*", image_id) else image_id


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


@dataclasses.dataclass(kw_only=True)
class CaptionBatch(RetrievalBatch):
    """A :class:`RetrievalBatch` with, in training, the corrupted captions ``input_ids_NL`` and
    their ``labels_NL`` (-100 where nothing is predicted) and, in evaluation, every image's
    reference captions as written. :meth:`Captioning.prepare_step` adds the predicted positions
    (``chosen_M``, flat indices into N x L), their ``targets_M`` and the batch's ``loss_weight``."""
    input_ids_NL: torch.Tensor | None = None
    labels_NL: torch.Tensor | None = None
    references: list[list[str]] = dataclasses.field(default_factory=list)
    chosen_M: torch.Tensor | None = None
    targets_M: torch.Tensor | None = None
    loss_weight: float = 1.0


@dataclasses.dataclass
class CaptioningProcessor(RetrievalProcessor):
    """:class:`RetrievalProcessor`, plus the captions' masking (``mask_ratio``; None: none) and
    the raw references (evaluation)."""
    mask_ratio: float | None = None

    def __call__(self, sample: dict, seed: int) -> tuple:
        if not self.all_captions:  # training: one caption drawn, tokenized
            return (*super().__call__(sample, seed), [])
        # evaluation decodes from the image alone: the captions are references as written, and a
        # label-free split (COCO's test2014, NoCaps) has none
        record = decode_record(sample_field(sample, "json"), RETRIEVAL_RECORD)
        x_3HW, _ = self._image.image(sample, seed)
        return sample["__key__"], x_3HW, str(record["image_id"]), [], record["captions"]

    def collate(self, items: list, seed: int) -> CaptionBatch:
        if self.all_captions:
            keys, images, image_ids, _, references = zip(*items)
            return CaptionBatch(keys=list(keys), images_B3HW=self._image.stack(images), image_ids=list(image_ids),
                                text_ids_NL=torch.zeros(0, 0, dtype=torch.long),
                                padding_mask_NL=torch.zeros(0, 0, dtype=torch.bool),
                                caption_image_N=torch.zeros(0, dtype=torch.long), references=list(references))
        batch = super().collate([item[:4] for item in items], seed)
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        if self.mask_ratio is not None:
            tok = self.tokenizer
            fields["input_ids_NL"], fields["labels_NL"] = mask_tokens(
                batch.text_ids_NL, batch.padding_mask_NL, ratio=self.mask_ratio, mask_id=tok.mask_id,
                vocab_size=tok.vocab_size, generator=torch.Generator().manual_seed(seed),
                special_ids=(tok.bos_id, tok.pad_id, tok.unk_id))  # eos is predicted: it ends captions
        return CaptionBatch(**fields, references=[item[4] for item in items])


@TaskConfig.register("captioning")
@config
class CaptioningConfig(ImageTextFinetuneConfig):
    """Captioning fine-tuning; see the module docstring. Beyond :class:`ImageTextFinetuneConfig`
    (``train.max_len``: the longest caption, bos and eos included; also the decoding limit):

    Attributes:
        mask_ratio: share of each caption's tokens after bos that are predicted (unilm: 0.7).
        label_smoothing: of the masked-token cross-entropy (unilm: 0.1).
        num_beams: beams of the decoding; 1 is greedy (unilm: 3).
        length_penalty: exponent of the length that divides a hypothesis' log-probability (unilm: 0.6).
    """

    train: TextStreamConfig = TextStreamConfig(shards=("bundled:retrieval/train",), batch_size=32, max_len=32)
    eval_shards: tuple[str, ...] = ("bundled:retrieval/val",)
    mask_ratio: float = 0.7
    label_smoothing: float = 0.1
    num_beams: int = 3
    length_penalty: float = 0.6
    unilm_heads: ClassVar[HeadMap] = UNILM_HEADS
    predicts_label_free: ClassVar[bool] = True  # COCO's test2014 and NoCaps, for their evaluation servers

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
        base = results["baselines"]
        return "captioning CIDEr", results["CIDEr"], {"nearest train image": base["nearest_train_image"]["CIDEr"],
                                                      "most frequent caption": base["most_frequent_caption"]["CIDEr"]}

    def check(self) -> None:
        ImageTextFinetuneConfig.check(self)
        if not 0 < self.mask_ratio <= 1:
            raise ConfigError("mask_ratio", f"must be in (0, 1], got {self.mask_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if self.num_beams < 1:
            raise ConfigError("num_beams", f"must be >= 1, got {self.num_beams}")
        if self.length_penalty < 0:
            raise ConfigError("length_penalty", f"must be >= 0, got {self.length_penalty}")

    def build(self, model: nn.Module) -> Captioning:
        return Captioning(self, model)

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> CaptioningConfig:
        """The captioning config; the head must be (vocabulary, ``dim``) with its bias."""
        V = heads["mlm_head.weight"].shape[0]
        check_shapes(heads, {"mlm_head.weight": (V, dim), "mlm_head.bias": (V,)}, f"the {cls.kind} head",
                     UNILM_HEADS.their_name)
        return cls(tokenizer=tokenizer)


class Captioning(ImageTextFinetune):
    """The ``captioning`` task: an MLM head over the caption tokens of a captioning-masked encoding."""

    def __init__(self, cfg: CaptioningConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.mlm_head = nn.Linear(model.cfg.dim, model.cfg.vocab_size)
        nn.init.trunc_normal_(self.mlm_head.weight, std=0.02)
        nn.init.zeros_(self.mlm_head.bias)
        tok = self.tokenizer
        banned = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
        banned[[tok.bos_id, tok.pad_id, tok.unk_id, tok.mask_id]] = True
        banned[tok.vocab_size:] = True  # embedding rows beyond the tokenizer's ids
        self.register_buffer("banned_V", banned, persistent=False)

    def forward(self, batch: CaptionBatch) -> TaskOutput:
        if batch.labels_NL is None or batch.caption_image_N.shape[0] != len(batch):
            raise ValueError("training batches pair each image with one masked caption (CaptioningProcessor with "
                             "all_captions=False and a mask_ratio)")
        if batch.chosen_M is None:  # not through prepare_step (which the trainer calls): read here, a host sync
            batch = self.prepare_step([batch])[0]
        out = self.model(images=batch.images_B3HW, text_ids=batch.input_ids_NL,
                         text_padding_mask=batch.padding_mask_NL, text_causal=True)
        logits_MV = self.mlm_head(out.hidden[:, out.num_vision:].flatten(0, 1).index_select(0, batch.chosen_M)).float()
        loss = smoothed_cross_entropy(logits_MV, batch.targets_M, self.cfg.label_smoothing) if len(batch.targets_M) \
            else logits_MV.sum() * 0  # nothing to predict in this micro-batch (a shape: no host sync)
        accuracy = (logits_MV.argmax(-1) == batch.targets_M).float().mean()
        parts = {"caption_loss": loss.detach(), "masked_accuracy": accuracy.detach(), "aux_loss": out.aux_loss.detach()}
        return TaskOutput(batch.loss_weight * loss + out.aux_loss, parts, samples=len(batch),
                          tokens=out.token_mask.sum(), moe_stats=[out.moe_stats])

    def prepare_step(self, micro_batches: list[CaptionBatch]) -> list[CaptionBatch]:
        """Each micro-batch with its predicted positions and their labels read on the host (before
        the copy to the device, so the step makes no host sync), and the loss weight that makes
        the update's loss the mean over the predicted tokens of all its micro-batches on all ranks:
        this micro-batch's share of them, times the micro-batches and ranks that the trainer and
        DDP average over (exactly 1 in one process with one micro-batch)."""
        chosen = [(b.labels_NL != IGNORE_INDEX).flatten().nonzero()[:, 0] for b in micro_batches]
        shares = current().update_shares([[len(c)] for c in chosen])
        return [dataclasses.replace(b, chosen_M=c, targets_M=b.labels_NL.flatten()[c], loss_weight=w)
                for b, c, (w,) in zip(micro_batches, chosen, shares)]

    # -- decoding --

    def _next_logprobs(self, images_N3HW: torch.Tensor) -> NextLogProbs:
        mask_id = self.tokenizer.mask_id

        def next_logprobs(prefix_NL: torch.Tensor) -> torch.Tensor:
            ids_NL = torch.cat([prefix_NL, torch.full_like(prefix_NL[:, :1], mask_id)], dim=1)
            out = self.model(images=images_N3HW, text_ids=ids_NL, text_causal=True)
            logits_NV = self.mlm_head(out.hidden[:, -1]).float().masked_fill(self.banned_V, float("-inf"))
            return F.log_softmax(logits_NV, dim=-1)

        return next_logprobs

    @torch.no_grad()
    def caption_pixels(self, images_B3HW: torch.Tensor, num_beams: int | None = None) -> list[str]:
        """A caption for each preprocessed image (:meth:`pixels`), decoded with ``num_beams``
        beams (default: the config's; 1: greedy), at most ``train.max_len`` tokens with bos and eos."""
        K = num_beams or self.cfg.num_beams
        tok, B = self.tokenizer, images_B3HW.shape[0]
        limits = dict(bos=tok.bos_id, eos=tok.eos_id, max_new=self.cfg.train.max_len - 1, device=images_B3HW.device)
        if K == 1:
            ids = greedy_search(self._next_logprobs(images_B3HW), B, **limits)
        else:
            ids = beam_search(self._next_logprobs(images_B3HW.repeat_interleave(K, dim=0)), B, pad=tok.pad_id,
                              num_beams=K, length_penalty=self.cfg.length_penalty, **limits)
        return [tok.decode(row) for row in ids]

    def caption(self, images: Sequence[ImageInput], num_beams: int | None = None) -> list[str]:
        """A caption for each image (a path, encoded bytes or a PIL image)."""
        was_training = self.training
        self.eval()
        try:
            return self.caption_pixels(self.pixels(images), num_beams)
        finally:
            self.train(was_training)

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        return [{"caption": self.caption(images)[0]}]

    def processor(self, train: bool) -> CaptioningProcessor:
        return CaptioningProcessor(self.tokenizer, self.transform(train), self.cfg.train.max_len,
                                   all_captions=not train, mask_ratio=self.cfg.mask_ratio if train else None)

    # -- evaluation --

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False,
                 predict: bool = False) -> dict[str, Any]:
        """COCO caption metrics of the decoded captions of ``eval_shards`` against all their
        references, with two baselines (the most frequent caption of the nearest training image
        by pixels; the most frequent training caption); to ``out_dir`` (rank 0) the captions in
        COCO's results format, ``caption_predictions.json`` (``[{"image_id", "caption"}]``; ids of
        digits, as COCO's, as integers). A label-free split (images without captions: COCO's
        test2014, NoCaps' test) has no scores; it is only captioned, and only with
        ``predict=True`` (``mmoe evaluate --predict``)."""
        self.eval()
        image_ids, captions, references, pixels, skipped = [], [], [], [], Counter()
        for batch in self.eval_batches(num_workers, skipped, progress):
            images = batch.images_B3HW.to(self._device())
            captions += self.caption_pixels(images)
            image_ids += batch.image_ids
            references += batch.references
            pixels += list(batch.images_B3HW.flatten(1))
        self.train()
        image_ids, captions, references, pixels = gather_lists(image_ids, captions, references, pixels)
        unique = {i: n for n, i in reversed(list(enumerate(image_ids)))}  # the first row of each image
        refs = {i: references[n] for i, n in unique.items()}
        unlabelled = sum(not r for r in refs.values())
        if 0 < unlabelled < len(refs):
            raise ValueError(f"{unlabelled} of the {len(refs)} images of {list(self.cfg.eval_shards)} have no captions:"
                             " a split is either labelled or label-free (a test split), not both")
        if unlabelled and not predict:
            raise ValueError(f"{list(self.cfg.eval_shards)} holds images without captions (a test split such as "
                             f"COCO's test2014): there is nothing to score; pass --predict (evaluate(predict=True)) "
                             f"to write their captions, {PREDICTIONS_FILE}")
        if unlabelled:
            report: dict[str, Any] = {"images": len(refs), "label_free": True, "predictions": PREDICTIONS_FILE}
        else:
            nearest, frequent = self._baselines(torch.stack([pixels[n] for n in unique.values()]))
            scores = caption_scores_of_sets(refs, {"model": {i: captions[n] for i, n in unique.items()},
                                                   "nearest_train_image": dict(zip(refs, nearest)),
                                                   "most_frequent_caption": dict.fromkeys(refs, frequent)})
            report = scores.pop("model")
            report.update(images=len(refs), references=sum(map(len, refs.values())), baselines=scores,
                          skipped_scorers=dict(SKIPPED_SCORERS))
        report["skipped_samples"] = gather_counts(skipped)
        if out_dir is not None and is_main_rank():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / PREDICTIONS_FILE).write_text(json.dumps(
                [{"image_id": _coco_id(i), "caption": captions[n]} for i, n in unique.items()],
                ensure_ascii=False))
        return report

    def _baselines(self, eval_pixels_ID: torch.Tensor) -> tuple[list[str], str]:
        """(per eval image, the most frequent training caption among those of the training image
        nearest by cosine over evaluation-preprocessed pixels; the most frequent training caption)."""
        processor = CaptioningProcessor(self.tokenizer, self.transform(False), self.cfg.train.max_len,
                                        all_captions=True)
        stream = ShardStream([str(data_path(s)) for s in self.cfg.train.shards], processor,
                             batch_size=self.cfg.eval_batch_size, resampled=False)
        train_pixels, train_captions = [], []
        for batch in StreamLoader(stream, num_workers=0):
            train_pixels.append(batch.images_B3HW.flatten(1))
            train_captions += batch.references
        train_pixels, train_captions = gather_lists(train_pixels, train_captions)  # each rank read its share
        train_captions = [[c for c in caps if c.strip()] or [""] for caps in train_captions]  # "": an image without
        counts = Counter(c for caps in train_captions for c in caps if c)
        similarity_IJ = F.normalize(eval_pixels_ID.float(), dim=1) @ F.normalize(torch.cat(train_pixels).float(),
                                                                                dim=1).t()
        nearest = [max(train_captions[j], key=lambda c: counts[c]) for j in similarity_IJ.argmax(1).tolist()]
        return nearest, counts.most_common(1)[0][0]
