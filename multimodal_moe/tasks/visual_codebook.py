"""Learning a k-means visual codebook (the ``kmeans`` visual targets of masked image modeling,
:class:`~multimodal_moe.tasks.visual_targets.KMeansCodebook`) from images or from shards: ``mmoe
data train-visual-codebook`` and the bundled dataset's recipe."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from data_pipelines.images import pretrain_transform

from .visual_targets import CHUNK, KMeansCodebook, nearest_code, normalize_patches, patchify

__all__ = ["codebook_from_shards", "train_kmeans_codebook"]

_KMEANS_PP_POINTS_PER_CODE = 8  # k-means++ is sequential (K passes over its points); seed it from a subsample


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
        new_ids_N, dist_N = nearest_code(x_NC, codebook_KC)
        if ids_N is not None and torch.equal(new_ids_N, ids_N):
            break
        ids_N = new_ids_N
        counts_K = torch.bincount(ids_N, minlength=num_codes)
        sums_KC = torch.zeros(num_codes, x_NC.shape[1], dtype=torch.float64)
        for start in range(0, N, CHUNK):
            sums_KC.index_add_(0, ids_N[start:start + CHUNK], x_NC[start:start + CHUNK].double())
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
    from data_pipelines.processors import ImageProcessor
    from data_pipelines.streams import ShardStream, StreamLoader

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
