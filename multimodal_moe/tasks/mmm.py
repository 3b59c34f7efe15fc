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

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from data_pipelines.batches import pinned
from data_pipelines.images import pretrain_transform
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.mixer import PretrainMixer, PretrainStep
from data_pipelines.processors import ImageProcessor, ImageTextProcessor, TextProcessor
from data_pipelines.streams import derive_seed
from data_pipelines.text import IMAGE_TEXT_MASK_RATIO, TEXT_MASK_RATIO
from data_pipelines.visual_targets import VisualTargets, build_visual_targets

from ..configurable import ConfigError, Configurable, Registry, config
from ..models import ModelConfig, ModelOutput, MultiwayEncoderConfig
from .base import Task, TaskConfig, TaskOutput, check_group_sizes, data_path
from .streams import StreamConfig, TextStreamConfig, TokenizerConfig

__all__ = ["KMeansTargetsConfig", "MaskedDataModeling", "MaskedDataModelingConfig", "PixelTargetsConfig",
           "VQKDTargetsConfig", "VisualTargetsConfig"]


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


class VisualTargetsConfig(Registry):
    """What masked patches are trained to predict (``data_pipelines.visual_targets``); ``kind``
    selects it: kmeans | vqkd | pixels."""

    def build(self, patch_size: int) -> VisualTargets:
        path = getattr(self, "path", None)
        resolved = None if path is None else data_path(path)
        if resolved is not None and not resolved.is_file():
            raise FileNotFoundError(f"{self.kind} visual targets {path!r} not found (looked at {resolved})")
        targets = build_visual_targets(self.kind, path=resolved, patch_size=patch_size,
                                       normalize=getattr(self, "normalize", True))
        if targets.patch_size != patch_size:
            raise ConfigError("path", f"{path} gives targets for {targets.patch_size}-pixel patches, the model has "
                                      f"{patch_size}-pixel patches")
        return targets


@VisualTargetsConfig.register("kmeans")
@config
class KMeansTargetsConfig(VisualTargetsConfig):
    """The nearest code of a k-means codebook (``mmoe data train-visual-codebook``); the default
    is the bundled one, learned for 8-pixel patches."""

    path: str = "bundled:visual_codebook.safetensors"


@VisualTargetsConfig.register("vqkd")
@config
class VQKDTargetsConfig(VisualTargetsConfig):
    """The codes of a BEiT v2 VQ-KD visual tokenizer (a published state dict file)."""

    path: str


@VisualTargetsConfig.register("pixels")
@config
class PixelTargetsConfig(VisualTargetsConfig):
    """The patch's pixels, each patch standardised when ``normalize`` (MAE's norm_pix_loss)."""

    normalize: bool = True


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

    def check(self) -> None:
        if self.image is None and self.text is None and self.image_text is None:
            raise ConfigError("image", "image, text and image_text are all null; keep at least one stream")
        for name in ("image_mask_ratio", "text_mask_ratio", "image_text_mask_ratio"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(name, f"must be in (0, 1), got {getattr(self, name)}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("crop_scale", f"must be [low, high] with 0 < low <= high <= 1, "
                                            f"got {list(self.crop_scale)}")

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

    def forward(self, step: PretrainStep | WeightedStep) -> TaskOutput:
        w = self.cfg.loss_weights
        parts: dict[str, torch.Tensor] = {}
        total, aux, samples, tokens, stats = 0.0, 0.0, 0, 0, []

        if not isinstance(step, WeightedStep):
            step = self.prepare_step([step])[0]
        weighted, step = step, step.step
        masked, labels = weighted.masked, weighted.labels

        def record(name: str, values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            values = tuple(v * weighted.weights[name] for v in values)
            parts[f"{name}_loss"] = values[0].detach()
            if len(values) > 1:
                parts[f"{name}_acc"] = values[1].detach()
            return values[0]

        def encode(stream: str, **inputs) -> ModelOutput:
            nonlocal aux, tokens
            out = self.model(**inputs)
            aux = aux + out.aux_loss
            tokens += out.hidden.shape[0] * out.num_vision + weighted.text_tokens.get(stream, 0)
            stats.append(out.moe_stats)
            return out

        if (b := step.image) is not None:
            out = encode("image", images=b.images_B3HW, image_mask=b.image_mask_BP)
            total = total + w.image * record("image_mim", self._mim(out, b.images_B3HW, masked["image_mim"]))
            samples += len(b)
        if (b := step.text) is not None:
            out = encode("text", text_ids=b.text_ids_BL, text_padding_mask=b.padding_mask_BL)
            total = total + w.text * record("text_mlm", self._mlm(out, masked["text_mlm"], labels["text_mlm"]))
            samples += len(b)
        if (b := step.image_text) is not None:
            out = encode("image_text", images=b.images_B3HW, image_mask=b.image_mask_BP, text_ids=b.text_ids_BL,
                         text_padding_mask=b.padding_mask_BL)
            total = total + w.image_text * (
                record("image_text_mim", self._mim(out, b.images_B3HW, masked["image_text_mim"]))
                + record("image_text_mlm", self._mlm(out, masked["image_text_mlm"], labels["image_text_mlm"])))
            samples += len(b)
        parts["aux_loss"] = torch.as_tensor(aux).detach()
        return TaskOutput(total + aux, parts, samples, tokens, stats)

    def prepare_step(self, micro_batches: list[PretrainStep]) -> list[WeightedStep]:
        """Each micro-batch with its masked positions read on the host (:class:`WeightedStep`)
        and its parts' weights: this micro-batch's share of the update's masked positions
        (summed over micro-batches, all-reduced over ranks), times the number of micro-batches
        and ranks that the trainer and DDP average over. In one process with one micro-batch
        every weight is exactly 1."""
        read = [_read_masks(step) for step in micro_batches]
        counts = [[len(masked[name]) if name in masked else 0 for name in PARTS] for masked, _, _ in read]
        totals = torch.tensor([sum(c[i] for c in counts) for i in range(len(PARTS))], dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)  # a CPU tensor: the process group always has gloo for it
            world = dist.get_world_size()
        scale, totals = world * len(micro_batches), totals.tolist()
        weights = [{name: c[i] * scale / totals[i] if totals[i] else 0.0 for i, name in enumerate(PARTS)}
                   for c in counts]
        return [WeightedStep(step, w, *facts) for step, w, facts in zip(micro_batches, weights, read)]

    def uses_every_parameter(self) -> bool:
        # a stream with a lower ratio skips steps, and with it a head or a modality's branch
        ratios = {s.ratio for name in ("image", "text", "image_text") if (s := getattr(self.cfg, name)) is not None}
        return len(ratios) == 1

    # -- data --------------------------------------------------------------------------------

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> PretrainMixer:
        cfg, mcfg = self.cfg, self.model.cfg
        grid = mcfg.image_size // mcfg.patch_size
        # BEiT v2's smallest block is 16 of 196 patches; small grids scale it down
        mask = BlockMaskGenerator(grid, ratio=cfg.image_mask_ratio, min_block=min(16, max(1, grid * grid // 12)))
        transform = pretrain_transform(mcfg.image_size, scale=tuple(cfg.crop_scale))
        processors = {
            "image": lambda s: ImageProcessor(transform, mask),
            "text": lambda s: TextProcessor(self.tokenizer, s.max_len, cfg.text_mask_ratio),
            "image_text": lambda s: ImageTextProcessor.build(self.tokenizer, transform, mask=mask, max_len=s.max_len,
                                                            mlm_ratio=cfg.image_text_mask_ratio),
        }
        loaders, ratios = {}, {}
        for i, (name, make) in enumerate(processors.items()):
            if (stream := getattr(cfg, name)) is not None:
                loaders[name] = stream.loader(make(stream), seed=derive_seed(seed, i), num_workers=num_workers,
                                              pin_memory=pin_memory)
                ratios[name] = stream.ratio
        return PretrainMixer(loaders, ratios)

