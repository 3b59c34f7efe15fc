"""Image side of the data pipelines: decoding, transforms, block masking, MIM targets."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

from data_pipelines.images import (
    BEIT3_MEAN,
    BEIT3_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)
from data_pipelines.masking import BlockMaskGenerator
from data_pipelines.skips import SkipSample
from multimodal_moe.configurable import ConfigError, parse
from multimodal_moe.tasks.visual_codebook import train_kmeans_codebook
from multimodal_moe.tasks.visual_targets import (
    KMeansCodebook,
    KMeansTargetsConfig,
    PixelTargets,
    PixelTargetsConfig,
    VisualTargetsConfig,
    VQKDTargetsConfig,
    nearest_code,
    normalize_patches,
    patchify,
)
from multimodal_moe.tasks.vqkd import VQKDTokenizer


def assign(codebook: KMeansCodebook, patches_NC: torch.Tensor) -> torch.Tensor:
    """Codes (N,) of raw patches laid out as ``patchify`` gives them."""
    return nearest_code(normalize_patches(patches_NC.float()), codebook.codebook)[0]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient_image(width: int = 64, height: int = 48) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A few dozen bytes: a valid IHDR declaring width x height RGB, a token IDAT, IEND."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_valid_image(fmt):
    original = gradient_image()
    decoded = decode_image(encode(original, fmt, quality=95) if fmt == "JPEG" else encode(original, fmt))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)
    error = np.abs(np.asarray(decoded, dtype=int) - np.asarray(original, dtype=int))
    assert error.max() == 0 if fmt == "PNG" else error.mean() < 4


def test_truncated_jpeg_is_corrupt():
    data = encode(gradient_image(), "JPEG")
    with pytest.raises(SkipSample) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == "corrupt_image"


@pytest.mark.parametrize("data", [np.random.default_rng(0).bytes(5000), b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_corrupt(data):
    with pytest.raises(SkipSample) as err:
        decode_image(data)
    assert err.value.reason == "corrupt_image"


@pytest.mark.parametrize("side", [20_000, 10_000, 9_000])  # above Pillow's error, in its warning zone, ours only
def test_huge_declared_size_is_rejected_before_decoding(side, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data must not be decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SkipSample) as err:
            decode_image(png_with_declared_size(side, side))
    assert err.value.reason == "image_too_large"
    assert caught == []


def test_max_pixels_is_configurable():
    data = encode(gradient_image(64, 48), "PNG")
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(SkipSample, match="image_too_large"):
        decode_image(data, max_pixels=64 * 48 - 1)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)   # opaque: unchanged
    rgba[0, 1] = (10, 20, 30, 0)     # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)      # half: mid grey
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert decoded.shape == (2, 3, 3)
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in decoded[0, 2])

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    decoded = np.asarray(decode_image(encode(palette, "PNG", transparency=0)))
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[1, 1]) == (200, 0, 0)


def test_grey_and_16_bit_images_become_rgb():
    decoded = decode_image(encode(Image.new("L", (5, 5), 77), "PNG"))
    assert decoded.mode == "RGB" and tuple(np.asarray(decoded)[2, 2]) == (77, 77, 77)
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-range 16-bit grey
    assert deep.mode.startswith("I;16")
    value = np.asarray(decode_image(encode(deep, "PNG")))[0, 0]
    assert all(abs(int(v) - 128) <= 1 for v in value)  # scaled, not clipped to 255


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------

ALL_TRANSFORMS = {
    "pretrain": lambda: pretrain_transform(32),
    "pretrain_jitter": lambda: pretrain_transform(32, color_jitter=0.4),
    "finetune": lambda: finetune_transform(32),
    "eval_squash": lambda: eval_transform(32),
    "eval_center_crop": lambda: eval_transform(32, mode="center_crop"),
}


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_transform_output(name):
    transform = ALL_TRANSFORMS[name]()
    for image in (gradient_image(80, 50), torch.from_numpy(np.array(gradient_image(50, 80))).permute(2, 0, 1)):
        out = transform(image)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
        assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6  # mean = std = 0.5 maps [0, 1] to [-1, 1]


@pytest.mark.parametrize("name", [name for name in ALL_TRANSFORMS if "jitter" not in name])  # brightness moves grey
def test_constant_grey_maps_to_zero(name):
    grey = torch.full((3, 40, 60), 0.5)
    assert torch.allclose(ALL_TRANSFORMS[name]()(grey), torch.zeros(3, 32, 32), atol=1e-5)


def test_normalisation_statistics():
    image = Image.new("RGB", (40, 40), (255, 128, 0))
    out = eval_transform(16, mean=IMAGENET_MEAN, std=IMAGENET_STD)(image)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)
    beit = eval_transform(16, mean=BEIT3_MEAN, std=BEIT3_STD)(image)
    assert torch.allclose(beit[:, 0, 0], torch.tensor([1.0, 128 / 255 * 2 - 1, -1.0]), atol=1e-6)


def test_center_crop_drops_the_sides_and_squash_keeps_them():
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[:, :20] = image[:, -20:] = (255, 0, 0)  # red outer 20% on each side
    image[:, 20:-20] = (0, 255, 0)
    image = Image.fromarray(image)
    cropped = eval_transform(32, mode="center_crop", crop_pct=0.875)(image)
    squashed = eval_transform(32, mode="squash")(image)
    assert (cropped[0] < 0).all()              # no red left
    assert (squashed[0, :, :3] > 0.9).all()    # red border kept


@pytest.mark.parametrize("name", ["pretrain", "pretrain_jitter", "finetune"])
def test_random_transforms_are_reproducible_under_a_seed(name):
    transform, image = ALL_TRANSFORMS[name](), gradient_image(90, 60)

    def run(seed):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for _ in range(4)])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def v2_compose_oracle(name: str) -> v2.Compose:
    """The deterministic transforms as torchvision's class-based v2 pipeline."""
    bicubic = v2.InterpolationMode.BICUBIC
    geometry = {
        "eval_squash": [v2.Resize((32, 32), interpolation=bicubic, antialias=True)],
        "eval_center_crop": [v2.Resize(36, interpolation=bicubic, antialias=True), v2.CenterCrop(32)],
    }[name]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.5] * 3, [0.5] * 3), v2.ToPureTensor()])


@pytest.mark.parametrize("name", ["eval_squash", "eval_center_crop"])
def test_eval_transforms_equal_torchvision_v2_compose(name):
    image = gradient_image(90, 60)
    assert torch.allclose(ALL_TRANSFORMS[name]()(image), v2_compose_oracle(name)(image), atol=1e-6)


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_random_crop_equals_pillow_crop_resize_flip(name):
    """Oracle: Pillow's crop + bicubic resize + mirror of the box the transform samples, then (x - 0.5) / 0.5."""
    transform, image = ALL_TRANSFORMS[name](), gradient_image(90, 60)
    flips = 0
    for seed in range(20):
        replay = random.Random(seed)
        top, left, h, w = transform.sample_crop(60, 90, replay)
        expected = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
        if replay.random() < 0.5:
            expected, flips = ImageOps.mirror(expected), flips + 1
        expected = (torch.from_numpy(np.array(expected)).permute(2, 0, 1) / 255 - 0.5) / 0.5
        got = transform.normalize(transform.pixels(image, random.Random(seed)))
        assert torch.allclose(got, expected, atol=1e-6)
    assert 0 < flips < 20


def test_sampled_crops_follow_torchvision_rule():
    transform, rng = pretrain_transform(32, scale=(0.2, 0.6)), random.Random(0)
    for _ in range(500):
        top, left, h, w = transform.sample_crop(60, 90, rng)
        assert 0 <= top <= 60 - h and 0 <= left <= 90 - w
        assert 0.2 * 5400 - 90 <= h * w <= 0.6 * 5400 + 90          # the area share, up to rounding
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05                 # the aspect range, up to rounding
    # a strip no box of the allowed aspect fits: the largest centred one whose aspect is in range
    assert transform.sample_crop(10, 1000, rng) == (0, 493, 10, 13)
    assert transform.sample_crop(1000, 10, rng) == (493, 0, 13, 10)


def test_pixels_then_batch_normalisation_equals_the_whole_transform():
    transform, images = eval_transform(32), [gradient_image(90, 60), gradient_image(40, 70)]
    pixels = [transform.pixels(image) for image in images]
    assert all(p.dtype == torch.uint8 and p.shape == (3, 32, 32) for p in pixels)
    assert torch.equal(transform.normalize(torch.stack(pixels)), torch.stack([transform(i) for i in images]))


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="squash"):
        eval_transform(32, mode="crop")
    with pytest.raises(ValueError, match="scale"):
        pretrain_transform(32, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, mode="center_crop", crop_pct=1.5)
    with pytest.raises(ValueError, match="std"):
        finetune_transform(32, std=(0.5, 0.0, 0.5))


# ---------------------------------------------------------------------------------------------
# block masking
# ---------------------------------------------------------------------------------------------

MASK_CONFIGS = [
    dict(grid=14),                                                 # 40%: round(0.4 * 196) = 78
    dict(grid=14, num_masked=75),                                  # BEiT v2's setting
    dict(grid=(14, 14), num_masked=118),                           # BEiT v1 (60%)
    dict(grid=(7, 10), ratio=0.5, min_block=4),
    dict(grid=(16, 12), num_masked=150, min_block=8, max_block=40, min_aspect=0.5),
    dict(grid=6, num_masked=36, min_block=4),                      # everything: needs the random top-up
]


@pytest.mark.parametrize("config", MASK_CONFIGS)
def test_mask_has_exact_count(config):
    generator = BlockMaskGenerator(**config)
    H, W = generator.height, generator.width
    expected = config.get("num_masked", round(config.get("ratio", 0.4) * H * W))
    assert generator.num_masked == expected
    for seed in range(200):
        mask = generator(np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (H, W) and mask.sum() == expected


@pytest.mark.parametrize("config", MASK_CONFIGS)
def test_accepted_blocks_respect_the_bounds(config):
    generator = BlockMaskGenerator(**config)
    H, W = generator.height, generator.width
    for seed in range(100):
        mask, blocks = generator.generate(np.random.default_rng(seed))
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            budget = min(generator.num_masked - int(union.sum()), generator.max_block)
            assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
            assert h < H and w < W  # strictly inside, as in the reference
            # area ~ U(min_block, budget) (or U(budget, min_block) near the end); h and w are
            # rounded from sqrt(area * aspect) and sqrt(area / aspect): undo the rounding.
            area_low, area_high = sorted((generator.min_block, budget))
            assert (h + 0.5) * (w + 0.5) >= area_low and (h - 0.5) * (w - 0.5) <= area_high
            assert (h + 0.5) / (w - 0.5) >= generator.min_aspect and (h - 0.5) / (w + 0.5) <= generator.max_aspect
            before = int(union.sum())
            union[top:top + h, left:left + w] = True
            assert 1 <= int(union.sum()) - before <= budget
        assert (mask | union == mask).all()  # every block is in the final mask
    assert generator.generate(np.random.default_rng(0))[1], "the configuration must place blocks"


def test_blocks_are_large_under_the_default_configuration():
    generator = BlockMaskGenerator(14)
    areas = [h * w for seed in range(100) for *_, h, w in generator.generate(np.random.default_rng(seed))[1]]
    assert np.mean(areas) > 16  # areas ~ U(16, remaining), not single patches
    assert 3 <= np.mean([len(generator.generate(np.random.default_rng(s))[1]) for s in range(100)]) <= 6


def test_masks_are_deterministic_per_seed_and_differ_across_seeds():
    generator = BlockMaskGenerator(14)
    assert np.array_equal(generator(np.random.default_rng(5)), generator(np.random.default_rng(5)))
    masks = {generator(np.random.default_rng(seed)).tobytes() for seed in range(50)}
    assert len(masks) == 50


def test_batch():
    generator = BlockMaskGenerator(14)
    batch = generator.batch(8, np.random.default_rng(0))
    assert batch.shape == (8, 196) and batch.dtype == bool and (batch.sum(1) == 78).all()  # round(0.4 * 196)
    assert np.array_equal(batch, generator.batch(8, np.random.default_rng(0)))
    rng = np.random.default_rng(0)
    assert np.array_equal(batch[0].reshape(14, 14), generator(rng))  # row-major patch order
    assert generator.batch(0, rng).shape == (0, 196)


def test_zero_masked_is_allowed():
    assert BlockMaskGenerator(14, ratio=0.0)(np.random.default_rng(0)).sum() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=14, num_masked=197), "num_masked"),
    (dict(grid=14, num_masked=10), "min_block 16 exceeds num_masked 10"),
    (dict(grid=14, min_aspect=0.0), "aspect"),
    (dict(grid=14, min_aspect=0.5, max_aspect=-1.0), "aspect"),
    (dict(grid=14, min_aspect=2.0, max_aspect=1.0), "max_aspect"),
    (dict(grid=14, max_block=8), "max_block"),
    (dict(grid=(14, 0)), "grid"),
    (dict(grid=(14, 14, 3)), "grid"),
    (dict(grid=14, ratio=1.5), "ratio"),
    (dict(grid=14, min_block=0), "min_block"),
])
def test_mask_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockMaskGenerator(**kwargs)


# ---------------------------------------------------------------------------------------------
# pixel and k-means targets
# ---------------------------------------------------------------------------------------------

def slow_patches(images_B3HW: torch.Tensor, p: int, normalize: bool) -> torch.Tensor:
    """Patch by patch, row-major, each patch's values in (row, column, channel) order."""
    B, _, H, W = images_B3HW.shape
    out = []
    for b in range(B):
        rows = []
        for i in range(H // p):
            for j in range(W // p):
                v = images_B3HW[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if normalize:
                    v = (v - v.mean()) / (v.var() + 1e-6).sqrt()
                rows.append(v)
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_targets_equal_a_loop(normalize):
    images = torch.rand(2, 3, 12, 8)
    targets = PixelTargets(4, normalize=normalize)
    out = targets(images)
    assert targets.num_classes is None and out.shape == (2, 6, 48)
    assert torch.allclose(out.double(), slow_patches(images, 4, normalize), atol=1e-5)


def test_pixel_targets_reject_indivisible_images():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        PixelTargets(4)(torch.rand(1, 3, 10, 8))


def test_kmeans_assignment_equals_brute_force():
    codebook = torch.randn(16, 48)
    targets = KMeansCodebook(codebook, patch_size=4)
    images = torch.rand(3, 3, 16, 20)
    ids = targets(images)
    assert ids.shape == (3, 20) and ids.dtype == torch.long and targets.num_classes == 16
    patches = slow_patches(images, 4, normalize=True)
    brute = torch.stack([torch.stack([((patch - codebook.double()) ** 2).sum(1).argmin() for patch in image])
                         for image in patches])
    assert torch.equal(ids, brute)


def clustered_patches(num_clusters: int, per_cluster: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=g) * 3
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_clusters(seed):
    patches, labels = clustered_patches(num_clusters=8, per_cluster=150, dim=12, seed=seed)  # p = 2
    codebook = train_kmeans_codebook(patches, 8, iterations=20, seed=seed)
    assert codebook.patch_size == 2 and codebook.codebook.shape == (8, 12)
    ids = assign(codebook, patches)
    # purity 1: each true cluster is one code, and no two clusters share one
    assert all(len(ids[labels == c].unique()) == 1 for c in range(8))
    assert len(ids.unique()) == 8
    images = torch.rand(2, 3, 4, 6)
    assert torch.equal(codebook(images).reshape(-1), assign(codebook, patchify(images, 2).reshape(-1, 12)))


def test_empty_clusters_are_reseeded():
    distinct = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    patches = distinct.repeat_interleave(50, dim=0)
    for seed in range(6):  # random init often draws the same point twice: one centroid is left empty
        codebook = train_kmeans_codebook(patches, 3, iterations=10, seed=seed, init="random").codebook
        normalised = (distinct - distinct.mean(1, keepdim=True)) / (distinct.var(1, keepdim=True) + 1e-6).sqrt()
        nearest = torch.cdist(normalised, codebook).argmin(1)
        assert len(nearest.unique()) == 3 and torch.allclose(codebook[nearest], normalised, atol=1e-5)


def test_kmeans_training_is_deterministic_and_takes_images():
    images = torch.rand(4, 3, 16, 16)
    batches = [images[:2], images[2:]]
    first = train_kmeans_codebook(batches, 8, patch_size=4, iterations=5, seed=3)
    again = train_kmeans_codebook(iter(batches), 8, patch_size=4, iterations=5, seed=3)
    assert torch.equal(first.codebook, again.codebook)
    other = train_kmeans_codebook(images, 8, patch_size=4, iterations=5, seed=4)
    assert not torch.equal(first.codebook, other.codebook)
    capped = train_kmeans_codebook(batches, 8, patch_size=4, iterations=1, max_patches=20)
    assert capped.num_classes == 8


def test_kmeans_argument_errors():
    with pytest.raises(ValueError, match="num_codes"):
        train_kmeans_codebook(torch.randn(10, 12), 11)
    with pytest.raises(ValueError, match="3 \\* p \\* p"):
        train_kmeans_codebook(torch.randn(10, 13), 2)
    with pytest.raises(ValueError, match="patch_size is required"):
        train_kmeans_codebook([torch.rand(1, 3, 8, 8)], 2)
    with pytest.raises(ValueError, match="init"):
        train_kmeans_codebook(torch.randn(10, 12), 2, init="farthest")
    with pytest.raises(ValueError, match="codebook must be"):
        KMeansCodebook(torch.randn(4, 12), patch_size=4)


def test_kmeans_save_load_round_trip(tmp_path):
    codebook = train_kmeans_codebook(torch.rand(2, 3, 16, 16), 5, patch_size=4, iterations=3)
    path = tmp_path / "codebook.safetensors"
    codebook.save(path)
    loaded = KMeansCodebook.load(path)
    assert loaded.patch_size == 4 and torch.equal(loaded.codebook, codebook.codebook)
    images = torch.rand(2, 3, 8, 12)
    assert torch.equal(loaded(images), codebook(images))
    assert torch.equal(KMeansTargetsConfig(path=str(path)).build(4)(images), codebook(images))

    from safetensors.torch import save_file
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a k-means codebook"):
        KMeansCodebook.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------
# VQ-KD tokenizer
# ---------------------------------------------------------------------------------------------

TINY = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, codebook_size=64, codebook_dim=8)

# The encoder-side names of unilm beit2 VQKD (vqkd_encoder_base_decoder_3x768x12_clip), per block
PUBLISHED_KEYS = {
    "encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
    "encoder.fc_norm.weight", "encoder.fc_norm.bias",
    "encode_task_layer.0.weight", "encode_task_layer.0.bias", "encode_task_layer.2.weight", "encode_task_layer.2.bias",
    "quantize.embedding.weight",
} | {f"encoder.blocks.{i}.{name}" for i in range(2) for name in (
    "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
    "mlp.fc2.bias")}


@pytest.fixture
def tokenizer() -> VQKDTokenizer:
    torch.manual_seed(0)
    tokenizer = VQKDTokenizer(**TINY)
    with torch.no_grad():  # biases and norms start at 0 / 1; make every parameter matter
        for name, param in tokenizer.named_parameters():
            if name.startswith("encoder.") and name.endswith(("bias", "norm1.weight", "norm2.weight", "norm.weight")):
                param.add_(0.3 * torch.randn_like(param))
    return tokenizer


def images_for(tokenizer: VQKDTokenizer, n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_vqkd_key_names_match_the_published_checkpoint(tokenizer):
    assert set(tokenizer.state_dict()) == PUBLISHED_KEYS
    assert not any(p.requires_grad for p in tokenizer.parameters())


def slow_encoder(tokenizer: VQKDTokenizer, x: torch.Tensor) -> torch.Tensor:
    """BEiT v2's ViT written out: explicit softmax attention with q/v biases and no k bias."""
    enc, p = tokenizer.encoder, tokenizer.patch_size
    patches = slow_patches(x.float(), p, normalize=False).float()  # (B, P, p*p*3) in (row, col, channel)
    w = enc.patch_embed.proj.weight.permute(0, 2, 3, 1).reshape(enc.cls_token.shape[-1], -1)
    h = torch.cat([enc.cls_token.expand(len(x), -1, -1), patches @ w.T + enc.patch_embed.proj.bias], 1) + enc.pos_embed
    for block in enc.blocks:
        a = F.layer_norm(h, h.shape[-1:], block.norm1.weight, block.norm1.bias, eps=1e-6)
        D = a.shape[-1]
        heads, d = block.attn.num_heads, D // block.attn.num_heads
        qkv = a @ block.attn.qkv.weight.T
        q = (qkv[..., :D] + block.attn.q_bias).unflatten(-1, (heads, d)).transpose(1, 2)
        k = qkv[..., D:2 * D].unflatten(-1, (heads, d)).transpose(1, 2)
        v = (qkv[..., 2 * D:] + block.attn.v_bias).unflatten(-1, (heads, d)).transpose(1, 2)
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = h + block.attn.proj((attn @ v).transpose(1, 2).reshape(h.shape))
        m = F.layer_norm(h, h.shape[-1:], block.norm2.weight, block.norm2.bias, eps=1e-6)
        h = h + block.mlp.fc2(F.gelu(block.mlp.fc1(m)))
    return F.layer_norm(h[:, 1:], h.shape[-1:], enc.fc_norm.weight, enc.fc_norm.bias, eps=1e-6)


def test_vqkd_encoder_equals_written_out_vit(tokenizer):
    x = images_for(tokenizer)
    assert torch.allclose(tokenizer.encoder_features(x), slow_encoder(tokenizer, x), atol=1e-4)


def test_vqkd_codes_equal_cosine_argmax_oracle(tokenizer):
    x = images_for(tokenizer)
    codes = tokenizer(x)
    assert codes.shape == (3, 16) and codes.dtype == torch.long and tokenizer.num_classes == 64
    z = tokenizer.encode_task_layer(tokenizer.encoder_features(x)).double()
    codebook = tokenizer.codebook.double()
    oracle = torch.tensor([[max(range(64), key=lambda c: float(z[b, i] @ codebook[c] / (z[b, i].norm() *
                                                                                        codebook[c].norm())))
                            for i in range(16)] for b in range(3)])
    assert torch.equal(codes, oracle)
    assert len(codes.unique()) > 3, "a degenerate tokenizer would make this test vacuous"
    # The reference's formulation: normalised features, Euclidean argmin against the unit-norm codebook.
    distances = torch.cdist(F.normalize(z, dim=-1), codebook)
    assert torch.equal(codes, distances.argmin(-1))


def test_vqkd_state_dict_round_trip(tokenizer):
    x = images_for(tokenizer)
    published = {"model": {**tokenizer.state_dict(), "decoder.blocks.0.norm1.weight": torch.ones(32),
                           "decode_task_layer.0.weight": torch.zeros(32, 32),
                           "quantize.embedding.embed_avg": torch.zeros(64, 8),
                           "quantize.cluster_size": torch.zeros(64)}}
    loaded = VQKDTokenizer.from_state_dict(published)
    assert (loaded.image_size, loaded.patch_size, len(loaded.encoder.blocks), loaded.num_classes) == (32, 8, 2, 64)
    assert loaded.encoder.blocks[0].attn.num_heads == 1  # heads are not in the weights: dim // 64, at least 1
    assert torch.equal(VQKDTokenizer.from_state_dict(published, heads=2)(x), tokenizer(x))
    assert loaded.ignored_keys == ["decode_task_layer.0.weight", "decoder.blocks.0.norm1.weight",
                                   "quantize.cluster_size", "quantize.embedding.embed_avg"]


def test_vqkd_load_errors(tokenizer):
    state_dict = tokenizer.state_dict()
    with pytest.raises(ValueError, match=r"unexpected: encoder.blocks.0.attn.k_bias;"):
        VQKDTokenizer.from_state_dict({**state_dict, "encoder.blocks.0.attn.k_bias": torch.zeros(32)}, heads=2)
    without_bias = {k: v for k, v in state_dict.items() if k != "encoder.blocks.1.attn.v_bias"}
    with pytest.raises(ValueError, match=r"missing: encoder.blocks.1.attn.v_bias;"):
        VQKDTokenizer.from_state_dict(without_bias, heads=2)
    loose = VQKDTokenizer.from_state_dict({**state_dict, "extra.weight": torch.zeros(1)}, heads=2, strict=False)
    assert torch.equal(loose(images_for(tokenizer)), tokenizer(images_for(tokenizer)))
    bad_shape = {**state_dict, "encoder.blocks.1.mlp.fc2.weight": torch.zeros(32, 100)}
    with pytest.raises(ValueError, match=r"shape mismatch: encoder.blocks.1.mlp.fc2.weight \(32, 100\) \(expected \(32, 128\)\)"):
        VQKDTokenizer.from_state_dict(bad_shape, heads=2)
    with pytest.raises(ValueError, match="not a VQ-KD state dict"):
        VQKDTokenizer.from_state_dict({"weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="takes 32x32 images"):
        tokenizer(torch.zeros(1, 3, 48, 48))


def test_vqkd_input_normalisation(tokenizer):
    unit = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imagenet = VQKDTokenizer.from_state_dict(tokenizer.state_dict(), heads=2, input_mean=IMAGENET_MEAN,
                                             input_std=IMAGENET_STD)
    beit3 = tokenizer((unit - 0.5) / 0.5)
    assert torch.equal(imagenet((unit - mean) / std), beit3)
    # The encoder itself sees [-1, 1] pixels, like the published tokenizer's 'default' pre-processing.
    assert torch.allclose(tokenizer.encoder_features((unit - 0.5) / 0.5), slow_encoder(tokenizer, unit * 2 - 1),
                          atol=1e-4)


def test_vqkd_load_from_file_and_factory(tokenizer, tmp_path):
    path = tmp_path / "vqkd.pth"
    torch.save({"model": tokenizer.state_dict()}, path)
    x = images_for(tokenizer)
    assert torch.equal(VQKDTokenizer.load(path, heads=2)(x), tokenizer(x))
    assert VQKDTargetsConfig(path=str(path)).build(tokenizer.patch_size).num_classes == 64
    assert isinstance(PixelTargetsConfig().build(8), PixelTargets)
    with pytest.raises(ConfigError, match="unknown kind 'dall-e'"):
        parse(VisualTargetsConfig, {"kind": "dall-e"})
    with pytest.raises(ConfigError, match="path"):
        parse(VisualTargetsConfig, {"kind": "vqkd"})


def test_default_vqkd_has_published_sizes():
    with torch.device("meta"):
        tokenizer = VQKDTokenizer()
    assert tokenizer.encoder.pos_embed.shape == (1, 197, 768) and tokenizer.codebook.shape == (8192, 32)
    assert tokenizer.encoder.blocks[0].mlp.fc1.weight.shape == (3072, 768) and len(tokenizer.encoder.blocks) == 12
    assert tokenizer.encoder.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert tokenizer.encode_task_layer[2].weight.shape == (32, 768)


@pytest.mark.parametrize("kind", ["kmeans", "vqkd"])
def test_visual_targets_ignore_autocast(kind, tokenizer):
    """Targets are computed in fp32 under bf16 autocast too: in bf16, 1.6% of the bundled
    codebook's nearest codes change."""
    from pathlib import Path

    import data_pipelines

    codebook = Path(data_pipelines.__file__).parent / "bundled" / "visual_codebook.safetensors"
    targets = KMeansCodebook.load(codebook) if kind == "kmeans" else tokenizer
    # smooth images, whose patches lie near the codebook's (patches of noise are far from all codes)
    images = F.interpolate(torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 4 - 2, size=32,
                           mode="bilinear")
    expected = targets(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = targets(images)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
