"""Image decoding and the BEiT-family image transforms.

:func:`decode_image` turns encoded bytes into an RGB ``PIL.Image`` or raises
:class:`~data_pipelines.skips.SkipSample`: ``image_too_large`` when the header declares more
pixels than allowed (checked before anything is decoded), ``corrupt_image`` for anything Pillow
cannot decode. Alpha is composited on white; 16-bit greyscale is scaled (not clipped) to 8 bits.
EXIF orientation is not applied, as in the torchvision, timm and unilm loaders whose
checkpoints we want to match.

The transforms (:class:`ImageTransform`, on torchvision's functional ``transforms.v2`` kernels)
return float tensors (3, S, S) normalised with ``mean``/``std``; loaders call their two halves
apart: ``pixels`` per image, ``normalize`` per batch.

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

Randomness: ``pixels(image, rng)`` draws from a ``random.Random`` (the loaders pass one seeded
per sample); without one it seeds one from torch's global RNG, so ``torch.manual_seed``
reproduces a call.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as VF

from .skips import SkipSample

__all__ = ["BEIT3_MEAN", "BEIT3_STD", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_FORMATS", "ImageTransform",
           "RandomCropTransform", "ResizeTransform", "decode_image", "eval_transform", "finetune_transform",
           "pretrain_transform"]

BEIT3_MEAN = (0.5, 0.5, 0.5)
BEIT3_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = v2.InterpolationMode.BICUBIC
_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect range for random resized crops
_LOG_RATIO = (math.log(_RATIO[0]), math.log(_RATIO[1]))
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The formats the toolkit documents; Pillow tries no other plugin (EPS would run Ghostscript,
# and exotic decoders are attack surface), so anything else is a corrupt_image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode ``data`` into an RGB image.

    Args:
        data: the encoded file: JPEG, PNG, WebP, GIF, BMP or TIFF (:data:`IMAGE_FORMATS`; the
            first frame of an animation or page of a TIFF). No other decoder is tried.
        max_pixels: largest width * height accepted, checked from the header before decoding;
            with one frame decoded, this bounds the decoding time (about 1 s for 64M pixels).
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
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
    except UnidentifiedImageError:
        raise SkipSample("corrupt_image", f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} "
                                          f"image") from None
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


class ImageTransform:
    """An image transform split where a loader wants it split: :meth:`pixels` does the geometry
    of one image (in the loader's workers) and returns uint8 (3, S, S) for a PIL input;
    :meth:`normalize` turns a whole batch into normalised float32 at once. Calling the
    transform does both for one image. The geometry uses torchvision's functional v2 kernels
    (one Pillow resample per image); the ``v2.Compose`` of the same steps costs about 2.5x
    more per image, more than decoding and resampling a small image together.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        _check_common(size, mean, std)
        self.size, self.mean, self.std = size, list(mean), list(std)

    def pixels(self, image: Image.Image | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        """The geometry of one image; random transforms draw from ``rng`` (default: one seeded
        from torch's global RNG, so ``torch.manual_seed`` reproduces a call)."""
        raise NotImplementedError

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) (..., 3, S, S) -> float32 normalised with ``mean``/``std``."""
        return VF.normalize(VF.to_dtype(pixels, torch.float32, scale=True), self.mean, self.std)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def _as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    return VF.pil_to_tensor(image) if isinstance(image, Image.Image) else image.as_subclass(torch.Tensor)


class RandomCropTransform(ImageTransform):
    """Optional colour jitter, random resized crop (bicubic) and horizontal flip.

    The crop is drawn as torchvision's ``RandomResizedCrop`` draws it (:meth:`sample_crop`), but
    from a ``random.Random``: a per-sample seed then costs nothing, where seeding and restoring
    torch's global RNG and torchvision's tensor-valued scalar draws cost more than the resample.
    """

    def __init__(self, size: int, *, scale: tuple[float, float], hflip: float, color_jitter: float = 0.0,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__(size, mean, std)
        _check_scale(scale)
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.scale, self.hflip = scale, hflip
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None

    def sample_crop(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, h, w): up to 10 draws of an area share in ``scale`` and a log-uniform
        aspect ratio in [3/4, 4/3] until the box fits; else the largest centred box whose aspect
        ratio is within those bounds (torchvision's rule)."""
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*_LOG_RATIO))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        if width / height < _RATIO[0]:
            w, h = width, round(width / _RATIO[0])
        elif width / height > _RATIO[1]:
            w, h = round(height * _RATIO[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def pixels(self, image: Image.Image | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or _rng_from_torch()
        if self.jitter is not None:
            with _torch_seeded(rng.getrandbits(63)):  # torchvision's jitter draws from torch's RNG
                image = self.jitter(image)
        height, width = VF.get_size(image)
        top, left, h, w = self.sample_crop(height, width, rng)
        image = VF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=_BICUBIC,
                                antialias=True)
        if rng.random() < self.hflip:
            image = VF.horizontal_flip(image)
        return _as_tensor(image)


def _rng_from_torch() -> random.Random:
    return random.Random(int(torch.randint(0, 2**62, ()).item()))


@contextlib.contextmanager
def _torch_seeded(seed: int):
    """Torch's global CPU RNG under ``seed``, restored afterwards. (The generator's own methods:
    torch.manual_seed and fork_rng cost about 1 ms per call.)"""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


class ResizeTransform(ImageTransform):
    """Deterministic: ``squash`` to S x S, or the shorter side to floor(S / crop_pct) and a centre crop."""

    def __init__(self, size: int, *, mode: str, crop_pct: float, mean: Sequence[float], std: Sequence[float]):
        super().__init__(size, mean, std)
        if mode not in ("squash", "center_crop"):
            raise ValueError(f"eval mode must be 'squash' or 'center_crop', got {mode!r}")
        if mode == "center_crop" and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.mode, self.crop_pct = mode, crop_pct

    def pixels(self, image: Image.Image | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if self.mode == "squash":
            return _as_tensor(VF.resize(image, [self.size, self.size], interpolation=_BICUBIC, antialias=True))
        image = VF.resize(image, math.floor(self.size / self.crop_pct), interpolation=_BICUBIC, antialias=True)
        return _as_tensor(VF.center_crop(image, [self.size, self.size]))


def pretrain_transform(size: int, *, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                       color_jitter: float = 0.0, mean: Sequence[float] = BEIT3_MEAN,
                       std: Sequence[float] = BEIT3_STD) -> RandomCropTransform:
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
    return RandomCropTransform(size, scale=scale, hflip=hflip, color_jitter=color_jitter, mean=mean, std=std)


def finetune_transform(size: int, *, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                       mean: Sequence[float] = BEIT3_MEAN, std: Sequence[float] = BEIT3_STD) -> RandomCropTransform:
    """BEiT-3 vision-language fine-tuning: random resized crop (scale 0.5-1, bicubic) + flip.

    Args:
        size: output side S.
        scale: range of the crop's area as a fraction of the image's.
        hflip: probability of a horizontal flip.
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """
    return RandomCropTransform(size, scale=scale, hflip=hflip, mean=mean, std=std)


def eval_transform(size: int, *, mode: str = "squash", crop_pct: float = 0.875, mean: Sequence[float] = BEIT3_MEAN,
                   std: Sequence[float] = BEIT3_STD) -> ResizeTransform:
    """Deterministic evaluation transform.

    Args:
        size: output side S.
        mode: ``squash`` resizes to S x S ignoring the aspect ratio (BEiT-3); ``center_crop``
            resizes the shorter side to floor(S / crop_pct) and crops the centre.
        crop_pct: only for ``center_crop``; in (0, 1].
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """
    return ResizeTransform(size, mode=mode, crop_pct=crop_pct, mean=mean, std=std)


def _check_common(size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")


def _check_scale(scale: tuple[float, float]) -> None:
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
