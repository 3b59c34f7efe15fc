"""The BEiT-3 Multiway Transformer encoder.

Image as a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks
(Wang et al., arXiv 2208.10442), in two layouts:

- ``decoupled`` — the released BEiT-3 (torchscale ``BEiT3``): per-modality q/k/v/out
  projections, Sub-LNs, LayerNorms, FFNs and final LayerNorm; only the attention softmax
  over the joint sequence is shared. Official checkpoints load into this layout.
- ``paper`` — the paper's (and VLMo's, arXiv 2111.02358) Multiway Transformer: shared
  attention, a vision and a text FFN, and a vision-language FFN in the top
  ``vl_ffn_layers`` layers that takes every token of an image-text input.

Inputs are image-only, text-only or image-text; the sequence is ``[image CLS ; patches ;
text]`` and the number of vision tokens is passed to every layer. Each modality has its own
learned absolute position table starting at 0 (torchscale's fairseq offset of 2 is a
checkpoint-conversion detail). Patches flagged in ``image_mask`` are replaced by a learned
mask token (masked image modeling). Padded text is zeroed before the first layer, as in
torchscale. Each modality's FFN (and the VL-FFN) may be any FFN kind. ``text_causal`` gives
unilm's captioning mask (``BEiT3ForCaptioning``): image tokens attend to the image only, text
tokens to the whole image and to the text up to their own position.

Deviations from torchscale's init, which only matter from scratch: positions, CLS and mask
token use trunc-normal(0.02) (unilm's BEiT-3 wrapper) instead of N(0, 1) positions.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..configurable import ConfigError, config
from ..layers.block import Block, run_blocks
from ..layers.ffn import FFNConfig
from ..layers.multiway import TEXT, VISION, VISION_LANGUAGE, per_modality, route
from .base import ModelConfig, ModelOutput

__all__ = ["MultiwayEncoder", "MultiwayEncoderConfig", "captioning_mask"]


def captioning_mask(num_vision: int, num_text: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool, True where query t may attend key s, over ``[vision ; text]``: vision to
    vision, text to vision and to text at or before its own position (unilm's ``uni_mask``,
    negated: there 1 marks what is hidden)."""
    T = num_vision + num_text
    allowed_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed_TT[:, :num_vision] = True
    return allowed_TT


@ModelConfig.register("multiway_encoder")
@config
class MultiwayEncoderConfig(ModelConfig):
    """BEiT-3 encoder; see the module docstring. Fields beyond :class:`ModelConfig`:

    Attributes:
        layout: decoupled | paper.
        vision_ffn / text_ffn: FFN of that modality's branch; defaults to ``ffn``.
        vision_language_ffn: the VL-FFN of the paper layout; defaults to ``ffn``.
        vl_ffn_layers: how many top layers have a VL-FFN (paper layout only; BEiT-3: 3).
        image_size / patch_size / in_chans: square input images, P = (image/patch)^2.
        vocab_size: rows of the text embedding (BEiT-3: 64010).
        max_text_len: rows of the text position table.
        normalize_output: final per-modality LayerNorm (absent in unilm's VQA checkpoints).
        moe_branches: which FFN branches of a MoE layer use ``moe_ffn`` (e.g. [vision] for
            vision MoE with a dense text FFN); the others keep their own FFN.
    """

    layout: Literal["decoupled", "paper"] = "decoupled"
    vision_ffn: FFNConfig | None = None
    text_ffn: FFNConfig | None = None
    vision_language_ffn: FFNConfig | None = None
    vl_ffn_layers: int = 0
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_len: int = 1024
    normalize_output: bool = True
    moe_branches: tuple[Literal["vision", "text", "vision_language"], ...] = ("vision", "text", "vision_language")

    # a fine-tuning config's image size applies to a pretrained backbone (its positions resized)
    FINETUNE_FIELDS: ClassVar[tuple[str, ...]] = (*ModelConfig.FINETUNE_FIELDS, "image_size")

    def check(self) -> None:
        ModelConfig.check(self)
        for name in ("image_size", "patch_size", "in_chans", "vocab_size", "max_text_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError("patch_size", f"image_size {self.image_size} is not divisible by "
                                            f"patch_size {self.patch_size}")
        if self.layout == "decoupled":
            if self.vl_ffn_layers:
                raise ConfigError("vl_ffn_layers", f"is {self.vl_ffn_layers}, but the decoupled layout has no "
                                                   "VL-FFN; set layout: paper or vl_ffn_layers: 0")
            if self.vision_language_ffn is not None:
                raise ConfigError("vision_language_ffn", "is set, but the decoupled layout has no VL-FFN; "
                                                         "set layout: paper or remove it")
        elif not 0 <= self.vl_ffn_layers <= self.depth:
            raise ConfigError("vl_ffn_layers", f"must be between 0 and depth {self.depth}, got {self.vl_ffn_layers}")
        elif self.vision_language_ffn is not None and self.vl_ffn_layers == 0:
            raise ConfigError("vision_language_ffn", "is set but vl_ffn_layers is 0, so no layer would use it")
        if not self.moe_branches and self.moe_ffn is not None:
            raise ConfigError("moe_branches", "is empty, so no branch would use moe_ffn")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def layer_ffns(self, layer: int) -> dict[str, FFNConfig]:
        """Branch name -> FFN config of layer ``layer`` (0-based)."""
        ffns = {VISION: self.vision_ffn or self.ffn, TEXT: self.text_ffn or self.ffn}
        if self.layout == "paper" and layer >= self.depth - self.vl_ffn_layers:
            ffns[VISION_LANGUAGE] = self.vision_language_ffn or self.ffn
        if self.is_moe_layer(layer):
            ffns.update({name: self.moe_ffn for name in ffns if name in self.moe_branches})
        return ffns

    def build(self) -> MultiwayEncoder:
        return MultiwayEncoder(self)


class VisionEmbedding(nn.Module):
    """Patch projection, mask token for masked patches, prepended CLS, positions."""

    def __init__(self, cfg: MultiwayEncoderConfig):
        super().__init__()
        self.image_size, self.in_chans = cfg.image_size, cfg.in_chans
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            trunc_normal_(p, std=0.02)

    def forward(self, images_BCHW: torch.Tensor, image_mask_BP: torch.Tensor | None) -> torch.Tensor:
        expected = (self.in_chans, self.image_size, self.image_size)
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images_BCHW.shape)}")
        x_BPD = self.proj(images_BCHW).flatten(2).transpose(1, 2)
        B, P, _ = x_BPD.shape
        if image_mask_BP is not None:
            if image_mask_BP.shape != (B, P) or image_mask_BP.dtype != torch.bool:
                raise ValueError(f"image_mask must be a bool tensor of shape ({B}, {P}) (True = masked patch), "
                                 f"got {image_mask_BP.dtype} {tuple(image_mask_BP.shape)}")
            x_BPD = torch.where(image_mask_BP[..., None], self.mask_token.to(x_BPD.dtype), x_BPD)
        x_BTD = torch.cat([self.cls_token.expand(B, -1, -1), x_BPD], dim=1)
        return x_BTD + self.pos_embed


class TextEmbedding(nn.Module):
    """Token embedding (normal, std D^-1/2, as torchscale) plus learned positions."""

    def __init__(self, cfg: MultiwayEncoderConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.tokens.weight, std=cfg.dim ** -0.5)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        L, max_len = ids_BL.shape[1], self.pos_embed.shape[1]
        if L > max_len:
            raise ValueError(f"text has {L} tokens but max_text_len is {max_len}")
        return self.tokens(ids_BL) + self.pos_embed[:, :L]


class MultiwayEncoder(nn.Module):
    """BEiT-3 Multiway encoder; returns :class:`ModelOutput` with ``[vision ; text]`` hidden
    states. Build it from a :class:`MultiwayEncoderConfig`."""

    def __init__(self, cfg: MultiwayEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_embed = VisionEmbedding(cfg)
        self.text_embed = TextEmbedding(cfg)
        attention_branches = (VISION, TEXT) if cfg.layout == "decoupled" else ()
        self.layers = nn.ModuleList(
            Block(dim=cfg.dim, heads=cfg.heads, ffns=cfg.layer_ffns(i), make_norm=cfg.norm_factory(),
                  attention_branches=attention_branches, sub_ln=cfg.sub_ln, backend=cfg.attention_backend,
                  drop_path=rate, init_scale=cfg.init_scale, norm_eps=cfg.norm_eps)
            for i, rate in enumerate(cfg.drop_path_rates()))
        self.final_norm = per_modality(cfg.norm_factory(), attention_branches) if cfg.normalize_output else None

    def forward(self, images: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                text_causal: bool = False) -> ModelOutput:
        """Encode an image batch, a text batch, or image-text pairs.

        Args:
            images: (B, C, H, W) float images.
            text_ids: (B, L) token ids.
            text_padding_mask: (B, L) bool, True marks padding (torchscale's convention).
            image_mask: (B, P) bool, True marks patches to replace by the mask token.
            text_causal: :func:`captioning_mask` (needs text): each text token sees the image and
                the text up to itself; the image sees only itself.
        """
        if images is None and text_ids is None:
            raise ValueError("pass images, text_ids or both")
        if images is None and image_mask is not None:
            raise ValueError("image_mask was given without images")
        if text_ids is None and text_padding_mask is not None:
            raise ValueError("text_padding_mask was given without text_ids")
        if text_causal and text_ids is None:
            raise ValueError("text_causal=True masks text attention, but no text_ids were given")
        parts, token_mask_BT = [], None
        if images is not None:
            parts.append(self.vision_embed(images, image_mask))
        if text_ids is not None:
            text_BLD = self.text_embed(text_ids)
            if text_padding_mask is not None:
                if text_padding_mask.shape != text_ids.shape or text_padding_mask.dtype != torch.bool:
                    raise ValueError(f"text_padding_mask must be a bool tensor of shape {tuple(text_ids.shape)}, "
                                     f"got {text_padding_mask.dtype} {tuple(text_padding_mask.shape)}")
                empty = "a text sequence is entirely padding; every sequence needs at least one token"
                if text_padding_mask.device.type == "cpu":
                    if text_padding_mask.all(dim=1).any():
                        raise ValueError(empty)
                else:  # checked on the device: reading the answer would stall the host every step
                    torch._assert_async(~text_padding_mask.all(dim=1).any(), empty)
                text_BLD = text_BLD.masked_fill(text_padding_mask[..., None], 0.0)
                token_mask_BT = ~text_padding_mask
            parts.append(text_BLD)
        num_vision = parts[0].shape[1] if images is not None else 0
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"images and text_ids have different batch sizes: "
                             f"{parts[0].shape[0]} and {parts[1].shape[0]}")
        x_BTD = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]
        if token_mask_BT is not None and num_vision:
            token_mask_BT = torch.cat([token_mask_BT.new_ones(x_BTD.shape[0], num_vision), token_mask_BT], dim=1)

        masks = {"allowed_TT": captioning_mask(num_vision, x_BTD.shape[1] - num_vision, x_BTD.device)
                 } if text_causal else {}
        x_BTD, aux_loss, stats = run_blocks(self.layers, x_BTD, grad_checkpointing=self.cfg.grad_checkpointing,
                                            num_vision=num_vision, token_mask_BT=token_mask_BT, **masks)
        if self.final_norm is not None:
            x_BTD = route(self.final_norm, x_BTD, num_vision)
        return ModelOutput(x_BTD, aux_loss, stats, num_vision=num_vision, token_mask=token_mask_BT)
