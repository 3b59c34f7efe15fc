"""BEiT v2's VQ-KD visual tokenizer, encoder side (BEiT v2: Masked Image Modeling with
Vector-Quantized Visual Tokenizers, arXiv 2208.06366): the visual tokens BEiT-3 (arXiv
2208.10442) predicts. A ViT encoder, a Linear-Tanh-Linear projection to the code dimension, and
the nearest code of an L2-normalised codebook by cosine similarity: codes (B, P) long. Loads the
published ``vqkd_encoder_base_decoder_*`` checkpoints (unilm ``beit2/modeling_vqkd.py``) under
their own key names; the decoder and the teacher are not needed to produce codes and are ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from timm.models.beit import Block as BeitBlock
from torch import Tensor, nn

from data_pipelines.images import BEIT3_MEAN, BEIT3_STD

from ..state_dicts import StateMismatch, compare_state
from .visual_targets import VisualTargets

__all__ = ["VQKDTokenizer"]

log = logging.getLogger("multimodal_moe")

# Parts of a published VQ-KD checkpoint that producing codes does not need: the decoder, the
# teacher, and the quantizer's EMA training statistics.
_VQKD_IGNORED_PREFIXES = ("decoder.", "decode_task_layer.", "teacher_model.", "scaling_layer.", "loss",
                          "quantize.cluster_size", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
                          "quantize.embedding.initted")


class _Encoder(nn.Module):
    """BEiT v2 ``VisionTransformer`` with mean-pooling layout: abs. position embedding, cls
    token, timm's BEiT blocks (bias-free qkv plus separate q and v biases, LayerNorm eps 1e-6, no
    layer scale: the published init_values is 0), and ``fc_norm`` applied to the patch tokens
    (``return_patch_tokens=True``)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.ModuleList(BeitBlock(dim, heads, qkv_bias=True, mlp_ratio=mlp_ratio, norm_layer=norm)
                                    for _ in range(depth))
        self.fc_norm = norm(dim)

    def forward(self, images_B3HW: Tensor) -> Tensor:
        x_BPD = self.patch_embed(images_B3HW)
        x_BTD = torch.cat([self.cls_token.expand(x_BPD.shape[0], -1, -1), x_BPD], dim=1) + self.pos_embed
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.fc_norm(x_BTD[:, 1:])


class _Quantizer(nn.Module):
    """Holds the codebook under the published name ``quantize.embedding.weight``."""

    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)


class VQKDTokenizer(VisualTargets):
    """BEiT v2 VQ-KD tokenizer, encoder side: images -> visual token ids (B, P) long.

    Input: images normalised with ``input_mean``/``input_std`` (default BEiT-3's 0.5/0.5, what
    :mod:`data_pipelines.images` produces). The published tokenizers were trained with
    ``process_type='default'``: they take [0, 1] images and rescale them inside to [-1, 1]
    (``x * 255 / 127.5 - 1``); ImageNet mean/std appears only in the unused ``imagenet_norm``
    option and in the teacher's own scaling layer. So the BEiT-3 normalisation is exactly the
    encoder's input and the conversion is the identity; other normalisations are undone first.
    (The reference rescales by 255 only when ``max() <= 1``; we convert by the stated statistics.)

    Codes: the projected features and the codebook are both L2-normalised and the code with the
    largest cosine similarity is taken. The reference normalises only the features and takes the
    smallest Euclidean distance; the published codebook is unit-norm (EMA updates re-normalise
    it), where the two agree up to float rounding.

    The encoder is frozen (no gradients) and has no dropout, so train/eval mode does not matter.

    Args:
        image_size: square input side; the position embedding is not resampled.
        patch_size: p.
        dim, depth, heads, mlp_ratio: the ViT encoder (published: 768, 12, 12, 4).
        codebook_size, codebook_dim: K codes of dimension c (published: 8192, 32).
        input_mean, input_std: the normalisation of the images passed to ``forward``.
    """

    def __init__(self, *, image_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, codebook_size: int = 8192, codebook_dim: int = 32,
                 input_mean: Sequence[float] = BEIT3_MEAN, input_std: Sequence[float] = BEIT3_STD):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.image_size, self.patch_size, self.num_classes = image_size, patch_size, codebook_size
        self.encoder = _Encoder(image_size, patch_size, dim, depth, heads, mlp_ratio)
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, codebook_dim))
        self.quantize = _Quantizer(codebook_size, codebook_dim)
        # x_encoder = 2 * (x * std + mean) - 1, per channel; identity for mean = std = 0.5.
        self.register_buffer("_input_scale", 2 * torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_shift", (2 * torch.tensor(input_mean) - 1).view(1, 3, 1, 1), persistent=False)
        self.ignored_keys: list[str] = []  # checkpoint keys from_state_dict skipped
        self._init_weights()
        self.requires_grad_(False)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        with torch.no_grad():
            self.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(self.quantize.embedding.weight), dim=-1))

    @property
    def codebook(self) -> Tensor:
        """(K, c), as stored (the published one is unit-norm)."""
        return self.quantize.embedding.weight

    @torch.no_grad()
    def encoder_features(self, images_B3HW: Tensor) -> Tensor:
        """The encoder's normalised patch tokens (B, P, D), before the projection to code space."""
        H, W = images_B3HW.shape[-2:]
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"VQ-KD tokenizer takes {self.image_size}x{self.image_size} images (its position "
                             f"embedding is not resampled), got {H}x{W}")
        return self.encoder(images_B3HW.float() * self._input_scale + self._input_shift)

    @torch.no_grad()
    def forward(self, images_B3HW: Tensor) -> Tensor:
        z_BPc = F.normalize(self.encode_task_layer(self.encoder_features(images_B3HW)), dim=-1)
        return (z_BPc @ F.normalize(self.codebook, dim=-1).T).argmax(dim=-1)


    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], *, strict: bool = True, heads: int | None = None,
                        **kwargs) -> VQKDTokenizer:
        """A tokenizer with the sizes a (published or our own) VQ-KD state dict implies.

        Args:
            state_dict: keys as in unilm's ``VQKD``; may be wrapped as ``{"model": ...}`` (the
                published files) or ``{"state_dict": ...}`` and carry a ``module.`` prefix. The
                decoder, teacher and quantizer EMA statistics are ignored and listed in
                ``ignored_keys`` on the result.
            strict: raise when a key the encoder needs is missing or a key is not recognised;
                otherwise log them and leave missing weights at their initial values.
            heads: attention heads (not recorded in the weights); default dim // 64, as in every
                published BEiT size.
            kwargs: ``input_mean`` / ``input_std`` for the constructor.
        """
        state_dict = _unwrap_state_dict(state_dict)
        sizes = _infer_vqkd_sizes(state_dict, heads)
        tokenizer = cls(**sizes, **kwargs)
        expected = tokenizer.state_dict()
        ignored = sorted(k for k in state_dict if k.startswith(_VQKD_IGNORED_PREFIXES))
        mismatch = compare_state(state_dict, {k: v.shape for k, v in expected.items()},
                                 ignore=lambda k: k.startswith(_VQKD_IGNORED_PREFIXES))
        if mismatch.wrong_shape:
            raise ValueError(f"VQ-KD state dict shapes do not fit the sizes inferred from it ({sizes}): "
                             f"{StateMismatch(wrong_shape=mismatch.wrong_shape)}")
        if mismatch and strict:
            raise ValueError(f"VQ-KD state dict does not match the encoder ({sizes}): {mismatch}; pass strict=False "
                             f"to load the rest")
        if mismatch:
            log.warning("VQ-KD load: %s (missing weights left at init, unexpected ones ignored)", mismatch)
        tokenizer.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
        tokenizer.ignored_keys = ignored
        if ignored:
            log.info("VQ-KD load: ignored %d keys not needed for encoding (%s)", len(ignored),
                     ", ".join(sorted({k.split(".")[0] for k in ignored})))
        return tokenizer

    @classmethod
    def load(cls, path: str | Path, *, strict: bool = True, **kwargs) -> VQKDTokenizer:
        """From a ``.safetensors`` file or a tensors-only ``torch.save`` file (the published ``.pth``)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            return cls.from_state_dict(load_file(str(path)), strict=strict, **kwargs)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} does not load with torch.load(weights_only=True) ({err}); if you trust it, "
                             f"load it yourself and call VQKDTokenizer.from_state_dict") from err
        return cls.from_state_dict(state_dict, strict=strict, **kwargs)


def _unwrap_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _infer_vqkd_sizes(state_dict: Mapping[str, Tensor], heads: int | None) -> dict[str, int | float]:
    needed = ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight",
              "encoder.blocks.0.mlp.fc1.weight", "quantize.embedding.weight")
    absent = [k for k in needed if k not in state_dict]
    if absent:
        raise ValueError(f"not a VQ-KD state dict: no {absent}; found keys such as {sorted(state_dict)[:8]}")
    dim = state_dict["encoder.cls_token"].shape[-1]
    patch_size = state_dict["encoder.patch_embed.proj.weight"].shape[-1]
    num_patches = state_dict["encoder.pos_embed"].shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"encoder.pos_embed has {num_patches} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.blocks."))
    codebook_size, codebook_dim = state_dict["quantize.embedding.weight"].shape
    heads = heads or max(dim // 64, 1)
    return dict(image_size=side * patch_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                mlp_ratio=state_dict["encoder.blocks.0.mlp.fc1.weight"].shape[0] / dim,
                codebook_size=codebook_size, codebook_dim=codebook_dim)
