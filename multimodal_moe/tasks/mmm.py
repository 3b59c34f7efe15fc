"""Masked data modeling: BEiT-3's one pretraining task over images, texts and image-text pairs.

Image as a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks
(Wang et al., arXiv 2208.10442), section 2.3. One shared Multiway encoder sees, each step, a
batch of each present stream:

- images with ~40% of their patches block-masked (BEiT v2's generator) -> predict the visual
  target of every masked patch (a code of the visual tokenizer, or its normalised pixels);
- texts with 15% of their tokens masked (80% ``<mask>`` / 10% random / 10% kept) -> predict them;
- image-text pairs with masked patches and 50% of the text masked -> predict both.

Each part is a cross-entropy over masked positions only (mean squared error for pixel targets),
weighted per stream (``loss_weights``; BEiT-3 does not state its weights, 1:1:1 here), plus the
summed MoE auxiliary losses of every pass. The heads are linear maps of the final hidden states
(BEiT v2's ``lm_head``); the MLM head may share the text embedding's weights (as BERT's does).
BEiT-3's pretraining code was never released; this follows the paper and BEiT v2's MIM code.

Each part is the mean over the masked positions of the whole update, however it is split over
micro-batches (gradient accumulation) and data-parallel ranks: these mask different numbers of
positions, so each one's mean is weighted by its share of the total (one all-reduce of four
counts per update) before the trainer and DDP average them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from tqdm import tqdm

from data_pipelines.batches import pinned
from data_pipelines.images import pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.mixer import PretrainMixer, PretrainStep
from data_pipelines.paths import data_path
from data_pipelines.processors import ImageProcessor, ImageTextProcessor, TextProcessor
from data_pipelines.streams import ShardStream, StreamLoader, derive_seed
from data_pipelines.text import IMAGE_TEXT_MASK_RATIO, TEXT_MASK_RATIO

from ..configurable import ConfigError, Configurable, config
from ..distributed.env import current
from ..models import ModelConfig, ModelOutput, MultiwayEncoderConfig
from .base import Task, TaskConfig, TaskOutput, batch_multiple, check_group_sizes
from .stream_config import StreamConfig, TextStreamConfig, TokenizerConfig
from .visual_targets import KMeansTargetsConfig, PixelTargetsConfig, VQKDTargetsConfig, VisualTargetsConfig

# the visual targets' configs are re-exported from .visual_targets
__all__ = ["HeldOutShards", "KMeansTargetsConfig", "MaskedDataModeling", "MaskedDataModelingConfig",
           "PixelTargetsConfig", "VQKDTargetsConfig", "VisualTargetsConfig"]


@config
class LossWeights(Configurable):
    """Weight of each stream's loss (the image-text weight multiplies both of its parts)."""

    image: float = 1.0
    text: float = 1.0
    image_text: float = 1.0

    def check(self) -> None:
        for name in ("image", "text", "image_text"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@config
class HeldOutShards(Configurable):
    """The held-out split of each stream that :meth:`MaskedDataModeling.evaluate` scores
    (the bundled dataset's val splits by default; a stream the task trains without is skipped)."""

    image: tuple[str, ...] = ("bundled:image/val",)
    text: tuple[str, ...] = ("bundled:text/val",)
    image_text: tuple[str, ...] = ("bundled:image_text/val",)


@TaskConfig.register("mmm")
@config
class MaskedDataModelingConfig(TaskConfig):
    """BEiT-3 masked data modeling; see the module docstring.

    Attributes:
        image / text / image_text: the three streams; null leaves one out (at least one stays).
            Defaults: the bundled dataset's training splits.
        tokenizer: the sentencepiece model of the text streams.
        visual_targets: what masked patches predict.
        image_mask_ratio: share of patches block-masked (BEiT v2: 0.4).
        text_mask_ratio / image_text_mask_ratio: share of text tokens masked (0.15 / 0.5).
        crop_scale: area range of the random resized crop (BEiT v2: 0.2-1).
        loss_weights: per-stream weights.
        tie_mlm_head: the MLM head's weight is the text embedding's (plus its own bias).
        eval_shards: the held-out split of each stream (:class:`HeldOutShards`).
        eval_batch_size: samples per evaluation batch.
    """

    image: StreamConfig | None = StreamConfig(shards=("bundled:image/train",))
    text: TextStreamConfig | None = TextStreamConfig(shards=("bundled:text/train",))
    image_text: TextStreamConfig | None = TextStreamConfig(shards=("bundled:image_text/train",), max_len=32)
    tokenizer: TokenizerConfig = TokenizerConfig()
    visual_targets: VisualTargetsConfig = KMeansTargetsConfig()
    image_mask_ratio: float = 0.4
    text_mask_ratio: float = TEXT_MASK_RATIO
    image_text_mask_ratio: float = IMAGE_TEXT_MASK_RATIO
    crop_scale: tuple[float, ...] = (0.2, 1.0)
    loss_weights: LossWeights = LossWeights()
    tie_mlm_head: bool = True
    eval_shards: HeldOutShards = HeldOutShards()
    eval_batch_size: int = 64

    def check(self) -> None:
        if self.image is None and self.text is None and self.image_text is None:
            raise ConfigError("image", "image, text and image_text are all null; keep at least one stream")
        for name in ("image_mask_ratio", "text_mask_ratio", "image_text_mask_ratio"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(name, f"must be in (0, 1), got {getattr(self, name)}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("crop_scale", f"must be [low, high] with 0 < low <= high <= 1, "
                                            f"got {list(self.crop_scale)}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")

    def check_model(self, model: ModelConfig) -> None:
        if not isinstance(model, MultiwayEncoderConfig):
            raise ConfigError("kind", f"masked data modeling trains a multiway_encoder, not a {model.kind}; "
                                      f"use task kind 'lm' for decoder LMs")
        check_group_sizes(model, {name: s.batch_size for name in ("image", "text", "image_text")
                                  if (s := getattr(self, name)) is not None})
        for name in ("text", "image_text"):
            stream = getattr(self, name)
            if stream is not None and stream.max_len > model.max_text_len:
                raise ConfigError(f"{name}.max_len", f"{stream.max_len} exceeds the model's max_text_len "
                                                     f"{model.max_text_len}")

    def build(self, model: nn.Module) -> MaskedDataModeling:
        return MaskedDataModeling(self, model)


def _cross_entropy(logits_MV: torch.Tensor, targets_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy; 0 (still in the graph) when nothing was masked."""
    if not len(targets_M):
        return logits_MV.sum() * 0, logits_MV.new_zeros(())
    return F.cross_entropy(logits_MV, targets_M), (logits_MV.argmax(-1) == targets_M).float().mean()


PARTS = ("image_mim", "text_mlm", "image_text_mim", "image_text_mlm")


@dataclass
class WeightedStep:
    """A pretraining step as :meth:`MaskedDataModeling.forward` takes it, with what the host
    read off its (CPU) batches before they went to the device, so the step itself makes no
    host sync: each loss part's masked positions (flat indices into B*P patches or B*L
    tokens), the labels at the masked text positions, each stream's real text tokens, and
    the weight of each part's mean that makes the update's loss the mean over the masked
    positions of all its micro-batches on all ranks (:meth:`MaskedDataModeling.prepare_step`)."""

    step: PretrainStep
    weights: dict[str, float]
    masked: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    text_tokens: dict[str, int]

    def to(self, device, non_blocking: bool = False) -> WeightedStep:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), self.step.to(device, non_blocking))

    def pin_memory(self) -> WeightedStep:
        return self._map(pinned, self.step.pin_memory())

    def _map(self, fn, step: PretrainStep) -> WeightedStep:
        return WeightedStep(step, self.weights, {k: fn(v) for k, v in self.masked.items()},
                            {k: fn(v) for k, v in self.labels.items()}, self.text_tokens)


def _filled(batch, multiple: int):
    """``batch`` with its first rows repeated after its last up to a multiple of ``multiple`` rows
    (Mixture of Tokens mixes groups of examples); unchanged when it has one."""
    rows = len(batch)
    if rows % multiple == 0:
        return batch
    index = torch.arange(-(-rows // multiple) * multiple) % rows
    return dataclasses.replace(batch, **{f.name: value[index] for f in dataclasses.fields(batch)
                                         if isinstance(value := getattr(batch, f.name), torch.Tensor)})


def _read_masks(step: PretrainStep) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """A step's masked positions per part, labels per text part and real text tokens per stream."""
    image, text, pairs = step.image, step.text, step.image_text
    masked, labels, text_tokens = {}, {}, {}
    for part, batch in (("image_mim", image), ("image_text_mim", pairs)):
        if batch is not None:
            masked[part] = batch.image_mask_BP.reshape(-1).nonzero().squeeze(1)
    for part, batch in (("text_mlm", text), ("image_text_mlm", pairs)):
        if batch is not None:
            labels_N = batch.mlm_labels_BL.reshape(-1)
            masked[part] = (labels_N != -100).nonzero().squeeze(1)
            labels[part] = labels_N[masked[part]]
    for name, batch in (("text", text), ("image_text", pairs)):
        if batch is not None:
            text_tokens[name] = int((~batch.padding_mask_BL).sum())
    return masked, labels, text_tokens


class MaskedDataModeling(Task):
    """The ``mmm`` task: the encoder, a masked-patch head and a masked-token head."""

    def __init__(self, cfg: MaskedDataModelingConfig, model: nn.Module):
        super().__init__(cfg, model)
        mcfg: MultiwayEncoderConfig = model.cfg
        self.tokenizer = cfg.tokenizer.load(mcfg.vocab_size) if (cfg.text or cfg.image_text) else None
        self.visual_targets = cfg.visual_targets.build(mcfg.patch_size) if (cfg.image or cfg.image_text) else None
        if self.visual_targets is not None:
            out = self.visual_targets.num_classes or 3 * mcfg.patch_size ** 2
            self.mim_head = nn.Linear(mcfg.dim, out)
            trunc_normal_(self.mim_head.weight, std=0.02)
            nn.init.zeros_(self.mim_head.bias)
        if self.tokenizer is not None:
            if cfg.tie_mlm_head:
                self.mlm_bias = nn.Parameter(torch.zeros(mcfg.vocab_size))
            else:
                self.mlm_head = nn.Linear(mcfg.dim, mcfg.vocab_size)
                trunc_normal_(self.mlm_head.weight, std=0.02)
                nn.init.zeros_(self.mlm_head.bias)

    # -- losses ------------------------------------------------------------------------------

    def _mim(self, out: ModelOutput, images_B3HW: torch.Tensor, masked_M: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Loss (and accuracy for codes) of the masked patches (flat indices ``masked_M``)."""
        targets = self.visual_targets(images_B3HW).flatten(0, 1).index_select(0, masked_M)  # (M,) or (M, p*p*3)
        pred = self.mim_head(out.vision_hidden[:, 1:].flatten(0, 1).index_select(0, masked_M)).float()
        if self.visual_targets.num_classes is None:
            return (F.mse_loss(pred, targets),) if len(targets) else (pred.sum() * 0,)
        return _cross_entropy(pred, targets)

    def _mlm(self, out: ModelOutput, masked_M: torch.Tensor, labels_M: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy of the masked text tokens (flat indices ``masked_M``)."""
        hidden_MD = out.text_hidden.flatten(0, 1).index_select(0, masked_M)
        if self.cfg.tie_mlm_head:
            logits = F.linear(hidden_MD, self.model.text_embed.tokens.weight, self.mlm_bias)
        else:
            logits = self.mlm_head(hidden_MD)
        return _cross_entropy(logits.float(), labels_M)

    def _stream(self, name: str, batch, masked: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
                ) -> tuple[ModelOutput, dict[str, tuple[torch.Tensor, ...]]]:
        """Encode one stream's batch; its loss parts, unweighted: part -> (loss, accuracy) (the
        loss alone for pixel targets)."""
        if name == "image":
            out = self.model(images=batch.images_B3HW, image_mask=batch.image_mask_BP)
            return out, {"image_mim": self._mim(out, batch.images_B3HW, masked["image_mim"])}
        if name == "text":
            out = self.model(text_ids=batch.text_ids_BL, text_padding_mask=batch.padding_mask_BL)
            return out, {"text_mlm": self._mlm(out, masked["text_mlm"], labels["text_mlm"])}
        out = self.model(images=batch.images_B3HW, image_mask=batch.image_mask_BP, text_ids=batch.text_ids_BL,
                         text_padding_mask=batch.padding_mask_BL)
        return out, {"image_text_mim": self._mim(out, batch.images_B3HW, masked["image_text_mim"]),
                     "image_text_mlm": self._mlm(out, masked["image_text_mlm"], labels["image_text_mlm"])}

    def forward(self, step: PretrainStep | WeightedStep) -> TaskOutput:
        parts: dict[str, torch.Tensor] = {}
        total, aux, samples, tokens, stats = 0.0, 0.0, 0, 0, []
        if not isinstance(step, WeightedStep):
            step = self.prepare_step([step])[0]
        weighted, step = step, step.step

        def record(name: str, values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            values = tuple(v * weighted.weights[name] for v in values)
            parts[f"{name}_loss"] = values[0].detach()
            if len(values) > 1:
                parts[f"{name}_acc"] = values[1].detach()
            return values[0]

        for name, batch in step.batches().items():
            out, values = self._stream(name, batch, weighted.masked, weighted.labels)
            aux = aux + out.aux_loss
            tokens += out.hidden.shape[0] * out.num_vision + weighted.text_tokens.get(name, 0)
            stats.append(out.moe_stats)
            total = total + getattr(self.cfg.loss_weights, name) * sum(record(part, v) for part, v in values.items())
            samples += len(batch)
        parts["aux_loss"] = torch.as_tensor(aux).detach()
        return TaskOutput(total + aux, parts, samples, tokens, stats)

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False
                 ) -> dict[str, Any]:
        """Masked data modeling on the held-out splits (``eval_shards``) of the streams the task
        trains on, corrupted as in training (the same mask ratios, crops and MLM rule) with seeds
        fixed by each sample's place in its split, so every checkpoint is scored on the same masks
        (at the same world size and loader workers). For each part, ``<part>_loss`` (and
        ``<part>_acc`` for codes and tokens) is the mean over all masked positions of the split,
        summed over ranks; ``loss`` is the parts weighted as in training (``loss_weights``), the
        training objective without auxiliary losses; ``masked`` counts the positions and
        ``samples`` the samples of each stream. A batch of a Mixture-of-Tokens model is filled up
        to a multiple of its group size with repeats of its first samples, which are not scored.
        ``out_dir`` is unused: the report is all there is."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        multiple = batch_multiple(self.model.cfg)
        sums = torch.zeros(len(PARTS), 3, dtype=torch.float64)  # loss x count, accuracy x count, count
        samples: dict[str, int] = {}
        for name, processor in self._processors().items():
            stream = ShardStream([str(data_path(s)) for s in getattr(self.cfg.eval_shards, name)], processor,
                                 batch_size=self.cfg.eval_batch_size, resampled=False, shuffle_buffer=0)
            samples[name] = 0
            for batch in tqdm(StreamLoader(stream, num_workers=num_workers), desc=f"evaluate {name}",
                              disable=not progress, leave=False):
                masked, labels, _ = _read_masks(PretrainStep(0, **{name: batch}))
                _, values = self._stream(name, _filled(batch, multiple).to(device),
                                         {k: v.to(device) for k, v in masked.items()},
                                         {k: v.to(device) for k, v in labels.items()})
                for part, value in values.items():
                    count = len(masked[part])
                    sums[PARTS.index(part)] += torch.tensor([float(value[0]) * count,
                                                             float(value[-1]) * count if len(value) > 1 else 0.0,
                                                             count], dtype=torch.float64)
                samples[name] += len(batch)
        env = current()  # CPU tensors: the process group always has gloo for them
        env.sum_(sums)
        samples = dict(zip(samples, (int(c) for c in env.sum_(torch.tensor(list(samples.values()))).tolist())))
        report: dict[str, Any] = {"masked": {}, "samples": samples}
        loss = 0.0
        for part, (loss_sum, correct, count) in zip(PARTS, sums.tolist()):
            stream = part.rsplit("_", 1)[0]
            if stream not in samples:
                continue
            report["masked"][part] = int(count)
            mean = loss_sum / count if count else float("nan")
            report[f"{part}_loss"] = mean
            if part.endswith("_mlm") or self.visual_targets.num_classes is not None:
                report[f"{part}_acc"] = correct / count if count else float("nan")
            loss += getattr(self.cfg.loss_weights, stream) * mean
        report["loss"] = loss
        self.train(was_training)
        return report

    def prepare_step(self, micro_batches: list[PretrainStep]) -> list[WeightedStep]:
        """Each micro-batch with its masked positions read on the host (:class:`WeightedStep`)
        and its parts' weights: this micro-batch's share of the update's masked positions
        (summed over micro-batches, all-reduced over ranks), times the number of micro-batches
        and ranks that the trainer and DDP average over. In one process with one micro-batch
        every weight is exactly 1."""
        read = [_read_masks(step) for step in micro_batches]
        counts = [[len(masked[name]) if name in masked else 0 for name in PARTS] for masked, _, _ in read]
        weights = [dict(zip(PARTS, shares)) for shares in current().update_shares(counts)]
        return [WeightedStep(step, w, *facts) for step, w, facts in zip(micro_batches, weights, read)]

    def uses_every_parameter(self) -> bool:
        # a stream with a lower ratio skips steps, and with it a head or a modality's branch
        ratios = {s.ratio for name in ("image", "text", "image_text") if (s := getattr(self.cfg, name)) is not None}
        return len(ratios) == 1

    # -- data --------------------------------------------------------------------------------

    def _processors(self) -> dict[str, ImageProcessor | TextProcessor | ImageTextProcessor]:
        """The sample processor of each stream the task trains on: augmentation and masking."""
        cfg, mcfg = self.cfg, self.model.cfg
        grid = mcfg.image_size // mcfg.patch_size
        # BEiT v2's smallest block is 16 of 196 patches; small grids scale it down
        mask = BlockMaskGenerator(grid, ratio=cfg.image_mask_ratio, min_block=min(16, max(1, grid * grid // 12)))
        transform = pretrain_transform(mcfg.image_size, scale=tuple(cfg.crop_scale))
        make = {
            "image": lambda s: ImageProcessor(transform, mask),
            "text": lambda s: TextProcessor(self.tokenizer, s.max_len, cfg.text_mask_ratio),
            "image_text": lambda s: ImageTextProcessor.build(self.tokenizer, transform, mask=mask, max_len=s.max_len,
                                                            mlm_ratio=cfg.image_text_mask_ratio),
        }
        return {name: build(stream) for name, build in make.items() if (stream := getattr(cfg, name)) is not None}

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> PretrainMixer:
        loaders, ratios, processors = {}, {}, self._processors()
        for i, name in enumerate(("image", "text", "image_text")):  # the seed index of a stream is fixed
            if (stream := getattr(self.cfg, name)) is not None:
                loaders[name] = stream.loader(processors[name], seed=derive_seed(seed, i),
                                              num_workers=num_workers, pin_memory=pin_memory)
                ratios[name] = stream.ratio
        return PretrainMixer(loaders, ratios)
