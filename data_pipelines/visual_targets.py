"""Targets for masked image modeling: what the model predicts at each masked patch.

One interface, :class:`VisualTargets` (``forward(images_B3HW) -> targets``, ``num_classes``,
``patch_size``), three kinds:

- :class:`VQKDTokenizer` — the encoder half of BEiT v2's VQ-KD tokenizer (BEiT v2: Masked Image
  Modeling with Vector-Quantized Visual Tokenizers, arXiv 2208.06366), the visual tokens BEiT-3
  (arXiv 2208.10442) predicts: a ViT encoder, a Linear-Tanh-Linear projection to the code
  dimension, and the nearest code of an L2-normalised codebook by cosine similarity. Codes
  (B, P) long. Loads the published ``vqkd_encoder_base_decoder_*`` checkpoints (unilm
  ``beit2/modeling_vqkd.py``) under their own key names; the decoder and the teacher are not
  needed to produce codes and are ignored.
- :class:`KMeansCodebook` — a codebook learned by k-means on per-patch-normalised pixels, a
  cheap stand-in for a learned tokenizer (no teacher network). Codes (B, P) long.
- :class:`PixelTargets` — MAE (Masked Autoencoders Are Scalable Vision Learners, arXiv
  2111.06377) regression targets: each patch's pixels, normalised per patch. (B, P, C) float.

Patches are taken row-major over the (H/p, W/p) grid, the order of a ViT patch embedding and of
``masking.BlockMaskGenerator``; a patch's C = p * p * 3 values are laid out (row, column,
channel) as in MAE's ``patchify``. Targets never carry gradients.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import PatchEmbed
from timm.models.beit import Block as BeitBlock
from torch import Tensor, nn
from tqdm import tqdm

from .images import BEIT3_MEAN, BEIT3_STD, pretrain_transform

__all__ = [
    "KMeansCodebook",
    "PixelTargets",
    "VQKDTokenizer",
    "VisualTargets",
    "build_visual_targets",
    "codebook_from_shards",
    "codebook_patch_size",
    "normalize_patches",
    "patchify",
    "train_kmeans_codebook",
]

log = logging.getLogger("data_pipelines")


def patchify(images_B3HW: Tensor, patch_size: int) -> Tensor:
    """Images (B, 3, H, W) -> patches (B, P, p * p * 3), P = (H / p) * (W / p), row-major."""
    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images_B3HW.shape)}")
    B, _, H, W = images_B3HW.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {patch_size}")
    h, w = H // patch_size, W // patch_size
    x = images_B3HW.reshape(B, 3, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch_size * patch_size * 3)


def normalize_patches(patches_NC: Tensor, eps: float = 1e-6) -> Tensor:
    """(x - mean) / sqrt(var + eps) over each patch's values (last dim), var unbiased as in MAE."""
    mean = patches_NC.mean(dim=-1, keepdim=True)
    var = patches_NC.var(dim=-1, keepdim=True)
    return (patches_NC - mean) / (var + eps) ** 0.5


class VisualTargets(nn.Module):
    """Base class: ``forward(images_B3HW)`` gives one target per patch.

    Attributes:
        num_classes: size of the code vocabulary; None for regression targets.
        patch_size: p; images must have sides divisible by it.
    """

    num_classes: int | None
    patch_size: int

    def __call__(self, images_B3HW: Tensor) -> Tensor:
        """The targets, in fp32 and without gradient whatever autocast is on: in bf16 the
        nearest code of 1.6% of the bundled data's patches changes."""
        with torch.no_grad(), torch.autocast(images_B3HW.device.type, enabled=False):
            return super().__call__(images_B3HW.float())

    def forward(self, images_B3HW: Tensor) -> Tensor:
        raise NotImplementedError


class PixelTargets(VisualTargets):
    """MAE pixel targets (B, P, p * p * 3): raw, or with ``normalize`` each patch standardised
    as ``(x - mean) / (var + 1e-6) ** 0.5`` (MAE's ``norm_pix_loss``).

    Args:
        patch_size: p.
        normalize: standardise each patch.
    """

    def __init__(self, patch_size: int, normalize: bool = True):
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size, self.normalize, self.num_classes = patch_size, normalize, None

    @torch.no_grad()
    def forward(self, images_B3HW: Tensor) -> Tensor:
        patches_BPC = patchify(images_B3HW.float(), self.patch_size)
        return normalize_patches(patches_BPC) if self.normalize else patches_BPC


# ---------------------------------------------------------------------------------------------
# k-means codebook
# ---------------------------------------------------------------------------------------------

_CHUNK = 4096  # rows per distance block: chunk x K floats (16 MB at K = 1024)
_KMEANS_PP_POINTS_PER_CODE = 8  # k-means++ is sequential (K passes over its points); seed it from a subsample


class KMeansCodebook(VisualTargets):
    """Nearest k-means code of each per-patch-normalised patch: (B, P) long in [0, K).

    Args:
        codebook_KC: the K centroids, in the space of :func:`normalize_patches` of
            :func:`patchify` output (C = p * p * 3).
        patch_size: p.
    """

    def __init__(self, codebook_KC: Tensor, patch_size: int):
        super().__init__()
        if codebook_KC.ndim != 2 or codebook_KC.shape[1] != 3 * patch_size * patch_size:
            raise ValueError(f"codebook must be (K, 3 * p * p) = (K, {3 * patch_size * patch_size}) for patch size "
                             f"{patch_size}, got shape {tuple(codebook_KC.shape)}")
        self.register_buffer("codebook", codebook_KC.detach().float().clone())
        self.patch_size, self.num_classes = patch_size, codebook_KC.shape[0]

    @torch.no_grad()
    def forward(self, images_B3HW: Tensor) -> Tensor:
        patches_BPC = normalize_patches(patchify(images_B3HW.float(), self.patch_size))
        B, P, C = patches_BPC.shape
        return _nearest_code(patches_BPC.reshape(B * P, C), self.codebook)[0].reshape(B, P)

    @torch.no_grad()
    def assign(self, patches_NC: Tensor) -> Tensor:
        """Codes (N,) of raw patches laid out as :func:`patchify` gives them."""
        return _nearest_code(normalize_patches(patches_NC.float()), self.codebook)[0]

    def save(self, path: str | Path) -> None:
        """A safetensors file: tensor ``codebook``, metadata ``kmeans_codebook_patch_size`` (one
        key: safetensors writes several in no fixed order, and the same codebook should give the
        same bytes). Written under a temporary name and renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"codebook": self.codebook.contiguous()}, str(tmp), metadata={_CODEBOOK_KEY: str(self.patch_size)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> KMeansCodebook:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _CODEBOOK_KEY not in metadata or "codebook" not in f.keys():
                raise ValueError(f"{path} is not a k-means codebook file (metadata {metadata}, tensors "
                                 f"{list(f.keys())}); expected metadata {_CODEBOOK_KEY} and a 'codebook' tensor")
            return cls(f.get_tensor("codebook"), int(metadata[_CODEBOOK_KEY]))


_CODEBOOK_KEY = "kmeans_codebook_patch_size"


def codebook_patch_size(path: str | Path) -> int:
    """The patch size a saved :class:`KMeansCodebook` was learned for (reads only the header)."""
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {})[_CODEBOOK_KEY])


def _nearest_code(x_NC: Tensor, codebook_KC: Tensor) -> tuple[Tensor, Tensor]:
    """Index (N,) of the nearest row of ``codebook_KC`` in Euclidean distance, and the squared
    distance (N,), computed in row blocks so memory stays at a block x K."""
    codebook_sq_K = (codebook_KC * codebook_KC).sum(1)
    ids_N = torch.empty(x_NC.shape[0], dtype=torch.long, device=x_NC.device)
    dist_N = torch.empty(x_NC.shape[0], device=x_NC.device)
    for start in range(0, x_NC.shape[0], _CHUNK):
        x = x_NC[start:start + _CHUNK]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin, added after.
        partial_dist = torch.addmm(codebook_sq_K, x, codebook_KC.T, alpha=-2)
        best = partial_dist.min(dim=1)
        ids_N[start:start + _CHUNK] = best.indices
        dist_N[start:start + _CHUNK] = (best.values + (x * x).sum(1)).clamp_min(0)
    return ids_N, dist_N


def train_kmeans_codebook(data: Tensor | Iterable[Tensor], num_codes: int, *, patch_size: int | None = None,
                          iterations: int = 10, seed: int = 0, init: str = "kmeans++",
                          max_patches: int | None = None) -> KMeansCodebook:
    """Learn a :class:`KMeansCodebook` with Lloyd's algorithm.

    Args:
        data: raw patches (N, p * p * 3) laid out as :func:`patchify` gives them, or images
            (B, 3, H, W), or an iterable of image batches. Patches are normalised here.
        num_codes: K.
        patch_size: p; required for images, inferred from C for patches.
        iterations: Lloyd iterations at most; stops earlier when no assignment changes.
        seed: the run is a function of (data, seed).
        init: ``kmeans++`` (run on a random subsample of 8 K patches) or ``random`` (K patches drawn
            without replacement).
        max_patches: stop collecting patches from an iterable after this many.

    Empty clusters are re-seeded with the points farthest from their centroids.
    """
    patches_NC, patch_size = _collect_patches(data, patch_size, max_patches)
    x_NC = normalize_patches(patches_NC.float())
    N = x_NC.shape[0]
    if not 0 < num_codes <= N:
        raise ValueError(f"num_codes must be between 1 and the number of patches {N}, got {num_codes}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    if init == "kmeans++":
        sample = torch.randperm(N, generator=generator)[:_KMEANS_PP_POINTS_PER_CODE * num_codes]
        codebook_KC = _kmeans_plus_plus(x_NC[sample], num_codes, generator)
    elif init == "random":
        codebook_KC = x_NC[torch.randperm(N, generator=generator)[:num_codes]].clone()
    else:
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")

    ids_N = None
    for _ in range(iterations):
        new_ids_N, dist_N = _nearest_code(x_NC, codebook_KC)
        if ids_N is not None and torch.equal(new_ids_N, ids_N):
            break
        ids_N = new_ids_N
        counts_K = torch.bincount(ids_N, minlength=num_codes)
        sums_KC = torch.zeros(num_codes, x_NC.shape[1], dtype=torch.float64)
        for start in range(0, N, _CHUNK):
            sums_KC.index_add_(0, ids_N[start:start + _CHUNK], x_NC[start:start + _CHUNK].double())
        codebook_KC = (sums_KC / counts_K.clamp_min(1).unsqueeze(1)).float()
        empty = (counts_K == 0).nonzero().squeeze(1)
        if len(empty):
            # Points a centroid explains worst are where a new cluster helps most.
            codebook_KC[empty] = x_NC[dist_N.topk(len(empty)).indices]
    return KMeansCodebook(codebook_KC, patch_size)


def codebook_from_shards(shards: Sequence, *, image_size: int, patch_size: int, codes: int = 1024,
                         patches: int = 100_000, iterations: int = 10, seed: int = 0, workers: int = 0,
                         progress: bool = True) -> KMeansCodebook:
    """:func:`train_kmeans_codebook` on ``patches`` patches of pretraining-style random crops
    (``pretrain_transform(image_size)``) of the images in ``shards`` (image or image-text shards),
    read by a seeded resampled stream: the same shards and seed give the same codebook."""
    from .processors import ImageProcessor
    from .streams import ShardStream, StreamLoader

    batch = 64
    stream = ShardStream(shards, ImageProcessor(pretrain_transform(image_size)), batch_size=batch, seed=seed)
    per_batch = batch * (image_size // patch_size) ** 2
    batches = itertools.islice(StreamLoader(stream, num_workers=workers), -(-patches // per_batch))
    images = (b.images_B3HW for b in tqdm(batches, desc="collect patches", unit="batch", disable=not progress,
                                          file=sys.stderr))
    return train_kmeans_codebook(images, codes, patch_size=patch_size, iterations=iterations, seed=seed,
                                 max_patches=patches)


def _kmeans_plus_plus(x_NC: Tensor, num_codes: int, generator: torch.Generator) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest centre so far."""
    N = x_NC.shape[0]
    x_sq_N = (x_NC * x_NC).sum(1)
    centres_KC = torch.empty(num_codes, x_NC.shape[1])
    first = int(torch.randint(N, (1,), generator=generator))
    centres_KC[0] = x_NC[first]
    dist_N = (x_sq_N - 2 * x_NC @ x_NC[first] + x_sq_N[first]).clamp_min(0)
    for k in range(1, num_codes):
        total = float(dist_N.sum())
        # Fewer distinct points than codes: any point will do.
        pick = int(torch.multinomial(dist_N, 1, generator=generator)) if total > 0 else \
            int(torch.randint(N, (1,), generator=generator))
        centres_KC[k] = x_NC[pick]
        dist_N = torch.minimum(dist_N, (x_sq_N - 2 * x_NC @ x_NC[pick] + x_sq_N[pick]).clamp_min(0))
    return centres_KC


def _collect_patches(data: Tensor | Iterable[Tensor], patch_size: int | None,
                     max_patches: int | None) -> tuple[Tensor, int]:
    if isinstance(data, Tensor) and data.ndim == 2:
        side = math.isqrt(data.shape[1] // 3)
        if 3 * side * side != data.shape[1]:
            raise ValueError(f"patches have {data.shape[1]} values; expected 3 * p * p for some patch size p")
        if patch_size is not None and patch_size != side:
            raise ValueError(f"patches have {data.shape[1]} = 3 * {side}^2 values but patch_size={patch_size}")
        return data[:max_patches], side
    if patch_size is None:
        raise ValueError("patch_size is required to cut images into patches")
    batches = [data] if isinstance(data, Tensor) else data
    collected, total = [], 0
    for images_B3HW in batches:
        patches_BPC = patchify(images_B3HW.float(), patch_size)
        collected.append(patches_BPC.reshape(-1, patches_BPC.shape[-1]))
        total += collected[-1].shape[0]
        if max_patches is not None and total >= max_patches:
            break
    if not collected:
        raise ValueError("no image batches to learn a codebook from")
    return torch.cat(collected)[:max_patches], patch_size


# ---------------------------------------------------------------------------------------------
# VQ-KD tokenizer (encoder side)
# ---------------------------------------------------------------------------------------------

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

    get_codebook_indices = forward

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
        unexpected = sorted(k for k in state_dict if k not in expected and not k.startswith(_VQKD_IGNORED_PREFIXES))
        missing = sorted(k for k in expected if k not in state_dict)
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
        if mismatched:
            raise ValueError(f"VQ-KD state dict shapes do not fit the sizes inferred from it ({sizes}): "
                             + "; ".join(mismatched))
        if (missing or unexpected) and strict:
            raise ValueError(f"VQ-KD state dict does not match the encoder ({sizes}): missing keys {missing}, "
                             f"unexpected keys {unexpected}; pass strict=False to load the rest")
        if missing or unexpected:
            log.warning("VQ-KD load: missing keys %s (left at init), unexpected keys %s (ignored)", missing, unexpected)
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


def build_visual_targets(kind: str, *, path: str | Path | None = None, patch_size: int = 16,
                         normalize: bool = True) -> VisualTargets:
    """``pixels``: :class:`PixelTargets` (patch_size, normalize); ``kmeans``: a saved
    :class:`KMeansCodebook` at ``path``; ``vqkd``: a VQ-KD checkpoint at ``path``."""
    loaders = {"kmeans": KMeansCodebook.load, "vqkd": VQKDTokenizer.load}
    if kind == "pixels":
        return PixelTargets(patch_size, normalize)
    if kind not in loaders:
        raise ValueError(f"unknown visual target kind {kind!r}; known: pixels, kmeans, vqkd")
    if path is None:
        raise ValueError(f"visual targets {kind!r} are loaded from a file; pass path=")
    return loaders[kind](path)
