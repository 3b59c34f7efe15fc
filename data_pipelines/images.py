"""Image decoding and the BEiT-family image transforms.

:func:`decode_image` turns encoded bytes into an RGB ``PIL.Image`` or raises
:class:`~data_pipelines.skips.SkipSample`: ``image_too_large`` when the header declares more
pixels than allowed (checked before anything is decoded), ``corrupt_image`` for anything Pillow
cannot decode. Alpha is composited on white; 16-bit greyscale is scaled (not clipped) to 8 bits.
EXIF orientation is not applied, as in the torchvision, timm and unilm loaders whose
checkpoints we want to match.

The transforms (torchvision ``transforms.v2``) return float tensors (3, S, S) normalised with
``mean``/``std``:

=====================  ==========================================================================
pretrain_transform     random resized crop (bicubic) + horizontal flip. BEiT (arXiv 2106.08254)
                       uses scale (0.08, 1) plus colour jitter 0.4; BEiT v2 (arXiv 2208.06366)
                       scale (0.2, 1) plus colour jitter 0.4; the VQ-KD tokenizer was trained with
                       scale (0.08, 1) and no jitter. BEiT-3's pretraining code is unreleased.
finetune_transform     BEiT-3 (arXiv 2208.10442) vision-language fine-tuning (unilm
                       ``beit3/datasets.py``): random resized crop scale (0.5, 1), bicubic, + flip.
                       Its optional RandomAugment(2, 7) is not included.
eval_transform         ``squash``: Resize((S, S)) bicubic, as BEiT-3 evaluates; ``center_crop``:
                       shorter side to floor(S / crop_pct), then a centre S x S crop (BEiT/timm
                       ImageNet evaluation, crop_pct 0.875 = 224/256).
=====================  ==========================================================================

BEiT and BEiT-3 normalise with mean = std = (0.5, 0.5, 0.5) (:data:`BEIT3_MEAN`,
:data:`BEIT3_STD`, i.e. pixels in [-1, 1]); BEiT v2 pretraining uses the ImageNet statistics
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).

Randomness: the random transforms draw from torch's global RNG, the way torchvision does.
A DataLoader seeds each worker's torch RNG with ``base_seed + worker_id`` and draws
``base_seed`` from its ``generator``, so passing ``generator=torch.Generator().manual_seed(s)``
to the DataLoader (or calling ``torch.manual_seed(s)`` in-process) makes augmentation
reproducible.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .skips import SkipSample

__all__ = ["BEIT3_MEAN", "BEIT3_STD", "IMAGENET_MEAN", "IMAGENET_STD", "decode_image", "eval_transform",
           "finetune_transform", "pretrain_transform"]

BEIT3_MEAN = (0.5, 0.5, 0.5)
BEIT3_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = v2.InterpolationMode.BICUBIC
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode ``data`` into an RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, ... anything Pillow reads; the first frame
            of an animation).
        max_pixels: largest width * height accepted, checked from the header before decoding.
            Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, doubled) also
            applies and ends the same way; its warning is silenced because this check replaces it.

    Raises:
        SkipSample: ``image_too_large`` above either limit; ``corrupt_image`` when the bytes are
            not an image, are truncated, or fail to decode for any other reason.
    """
    try:
        # catch_warnings is process-wide state, fine in DataLoader worker processes; two threads
        # decoding at once could at worst let one warning through.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipSample("image_too_large", f"{width}x{height} = {width * height} pixels > "
                                                    f"max_pixels {max_pixels}")
            image.load()
            return _to_rgb(image)
    except SkipSample:
        raise
    except Image.DecompressionBombError as err:
        raise SkipSample("image_too_large", str(err)) from err
    # Pillow's plugins fail on bad bytes with many exception types (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, ...); all of them mean the sample is unusable.
    except Exception as err:
        raise SkipSample("corrupt_image", f"{type(err).__name__}: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, turning most of the image white.
        grey = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent regions are background, most often white on the web; black (what a plain
        # convert gives) would invent dark shapes the caption never mentions.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def pretrain_transform(size: int, *, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                       color_jitter: float = 0.0, mean: Sequence[float] = BEIT3_MEAN,
                       std: Sequence[float] = BEIT3_STD) -> v2.Compose:
    """Masked-image-modeling pretraining: random resized crop (bicubic) + flip; see the module
    docstring for the values BEiT and BEiT v2 use.

    Args:
        size: output side S.
        scale: range of the crop's area as a fraction of the image's.
        hflip: probability of a horizontal flip.
        color_jitter: brightness/contrast/saturation jitter strength, applied before the crop
            as in BEiT (0.4 there); 0 disables it.
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """
    _check_common(size, hflip, mean, std)
    _check_scale(scale)
    if color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    jitter = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
    return v2.Compose([*jitter, v2.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(hflip), *_to_normalised_tensor(mean, std)])


def finetune_transform(size: int, *, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                       mean: Sequence[float] = BEIT3_MEAN, std: Sequence[float] = BEIT3_STD) -> v2.Compose:
    """BEiT-3 vision-language fine-tuning: random resized crop (scale 0.5-1, bicubic) + flip.

    Args:
        size: output side S.
        scale: range of the crop's area as a fraction of the image's.
        hflip: probability of a horizontal flip.
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """
    _check_common(size, hflip, mean, std)
    _check_scale(scale)
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(hflip), *_to_normalised_tensor(mean, std)])


def eval_transform(size: int, *, mode: str = "squash", crop_pct: float = 0.875, mean: Sequence[float] = BEIT3_MEAN,
                   std: Sequence[float] = BEIT3_STD) -> v2.Compose:
    """Deterministic evaluation transform.

    Args:
        size: output side S.
        mode: ``squash`` resizes to S x S ignoring the aspect ratio (BEiT-3); ``center_crop``
            resizes the shorter side to floor(S / crop_pct) and crops the centre.
        crop_pct: only for ``center_crop``; in (0, 1].
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """
    _check_common(size, 0.0, mean, std)
    if mode == "squash":
        resize = [v2.Resize((size, size), interpolation=_BICUBIC, antialias=True)]
    elif mode == "center_crop":
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        resize = [v2.Resize(math.floor(size / crop_pct), interpolation=_BICUBIC, antialias=True),
                  v2.CenterCrop(size)]
    else:
        raise ValueError(f"eval mode must be 'squash' or 'center_crop', got {mode!r}")
    return v2.Compose([*resize, *_to_normalised_tensor(mean, std)])


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # Geometry comes first so PIL inputs are resampled by Pillow, as in the reference pipelines.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor()]


def _check_common(size: int, hflip: float, mean: Sequence[float], std: Sequence[float]) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")


def _check_scale(scale: tuple[float, float]) -> None:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
