"""Targets for masked image modeling: what the model predicts at each masked patch, computed
inside the loss on the training device.

One interface, :class:`VisualTargets` (``forward(images_B3HW) -> targets``, ``num_classes``,
``patch_size``), three kinds, each selected by a :class:`VisualTargetsConfig` kind:

- ``vqkd``: :class:`~multimodal_moe.tasks.vqkd.VQKDTokenizer`, the encoder half of BEiT v2's
  VQ-KD tokenizer (arXiv 2208.06366), the visual tokens BEiT-3 (arXiv 2208.10442) predicts.
  Codes (B, P) long.
- ``kmeans``: :class:`KMeansCodebook`, the nearest code of a codebook learned by k-means on
  per-patch-normalised pixels (learned by ``mmoe data train-visual-codebook``:
  :mod:`.visual_codebook`), a cheap stand-in for a learned tokenizer. Codes (B, P)
  long.
- ``pixels``: :class:`PixelTargets`, MAE's (arXiv 2111.06377) regression targets: each patch's
  pixels, normalised per patch. (B, P, C) float.

Patches are taken row-major over the (H/p, W/p) grid, the order of a ViT patch embedding and of
``masking.BlockMaskGenerator``; a patch's C = p * p * 3 values are laid out (row, column,
channel) as in MAE's ``patchify``. Targets never carry gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from data_pipelines.atomic import atomic_write
from data_pipelines.paths import data_path

from ..configurable import ConfigError, Registry, config

__all__ = ["KMeansCodebook", "KMeansTargetsConfig", "PixelTargets", "PixelTargetsConfig", "VQKDTargetsConfig",
           "VisualTargets", "VisualTargetsConfig", "codebook_patch_size", "nearest_code", "normalize_patches",
           "patchify"]

CHUNK = 4096  # rows per distance block: chunk x K floats (16 MB at K = 1024)


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
        return nearest_code(patches_BPC.reshape(B * P, C), self.codebook)[0].reshape(B, P)

    def save(self, path: str | Path) -> None:
        """A safetensors file: tensor ``codebook``, metadata ``kmeans_codebook_patch_size`` (one
        key: safetensors writes several in no fixed order, and the same codebook should give the
        same bytes). Written under a temporary name and renamed into place."""
        with atomic_write(path) as tmp:
            save_file({"codebook": self.codebook.contiguous()}, str(tmp),
                      metadata={_CODEBOOK_KEY: str(self.patch_size)})

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


def nearest_code(x_NC: Tensor, codebook_KC: Tensor) -> tuple[Tensor, Tensor]:
    """Index (N,) of the nearest row of ``codebook_KC`` in Euclidean distance, and the squared
    distance (N,), computed in row blocks so memory stays at a block x K."""
    codebook_sq_K = (codebook_KC * codebook_KC).sum(1)
    ids_N = torch.empty(x_NC.shape[0], dtype=torch.long, device=x_NC.device)
    dist_N = torch.empty(x_NC.shape[0], device=x_NC.device)
    for start in range(0, x_NC.shape[0], CHUNK):
        x = x_NC[start:start + CHUNK]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin, added after.
        partial_dist = torch.addmm(codebook_sq_K, x, codebook_KC.T, alpha=-2)
        best = partial_dist.min(dim=1)
        ids_N[start:start + CHUNK] = best.indices
        dist_N[start:start + CHUNK] = (best.values + (x * x).sum(1)).clamp_min(0)
    return ids_N, dist_N



# --- configs ---------------------------------------------------------------------------------

class VisualTargetsConfig(Registry):
    """What masked patches are trained to predict; ``kind`` selects it: kmeans | vqkd | pixels."""

    def build(self, patch_size: int) -> VisualTargets:
        """The targets for a model with ``patch_size``-pixel patches (a config error if a saved
        codebook or tokenizer was made for another size)."""
        targets = self._build(patch_size)
        if targets.patch_size != patch_size:
            raise ConfigError("path", f"{getattr(self, 'path', '')} gives targets for {targets.patch_size}-pixel "
                                      f"patches, the model has {patch_size}-pixel patches")
        return targets

    def _build(self, patch_size: int) -> VisualTargets:
        raise NotImplementedError

    def _file(self) -> Path:
        path = data_path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"{self.kind} visual targets {self.path!r} not found (looked at {path})")
        return path


@VisualTargetsConfig.register("kmeans")
@config
class KMeansTargetsConfig(VisualTargetsConfig):
    """The nearest code of a k-means codebook (``mmoe data train-visual-codebook``); the default
    is the bundled one, learned for 8-pixel patches."""

    path: str = "bundled:visual_codebook.safetensors"

    def _build(self, patch_size: int) -> KMeansCodebook:
        return KMeansCodebook.load(self._file())


@VisualTargetsConfig.register("vqkd")
@config
class VQKDTargetsConfig(VisualTargetsConfig):
    """The codes of a BEiT v2 VQ-KD visual tokenizer (a published state dict file)."""

    path: str

    def _build(self, patch_size: int) -> VisualTargets:
        from .vqkd import VQKDTokenizer

        return VQKDTokenizer.load(self._file())


@VisualTargetsConfig.register("pixels")
@config
class PixelTargetsConfig(VisualTargetsConfig):
    """The patch's pixels, each patch standardised when ``normalize`` (MAE's norm_pix_loss)."""

    normalize: bool = True

    def _build(self, patch_size: int) -> PixelTargets:
        return PixelTargets(patch_size, self.normalize)
