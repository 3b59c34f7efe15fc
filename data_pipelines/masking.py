"""Block-wise masking of image patches for masked image modeling.

Implements the masking of BEiT (BERT Pre-Training of Image Transformers, arXiv 2106.08254,
Algorithm 1) in the form of BEiT v2's ``masking_generator.py`` (arXiv 2208.06366). BEiT-3
(arXiv 2208.10442) masks 40% of the patches block-wise; BEiT v2 passes 75 of 196 (38%) on a
14 x 14 grid with blocks of at least 16. Our default, round(0.4 * H * W), is 78 there; pass
``num_masked=75`` for BEiT v2's count.

Blocks are placed until the target count is reached. Each placement makes up to 10 attempts:

1. area ~ U(min_block, min(remaining, max_block)), log aspect ratio ~ U(log min_aspect,
   log max_aspect); h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect));
2. as in the reference, the block must be strictly smaller than the grid in both directions;
3. a uniformly random top-left corner;
4. the block is accepted if it adds between 1 and ``remaining`` new patches.

When a placement fails 10 times the loop stops and random unmasked patches are masked until the
count is exact. A block never adds more than ``remaining`` patches, so the count can only fall
short, never overshoot (the reference's unmasking branch is unreachable and is left out).

Deviations from the reference: randomness comes from the ``numpy.random.Generator`` passed in
(not the global ``random`` module), and the 10 attempts of a placement are drawn at once, so
masks are not bit-identical to the reference's for any seed; the distribution is the same.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BlockMaskGenerator"]

Block = tuple[int, int, int, int]  # top, left, height, width
_ATTEMPTS = 10


class BlockMaskGenerator:
    """Masks of exactly ``num_masked`` patches made of random rectangular blocks.

    Args:
        grid: patch grid (H, W), or one int for a square grid.
        num_masked: patches to mask; default round(ratio * H * W).
        ratio: masked share when ``num_masked`` is not given.
        min_block: smallest block area (in patches) drawn.
        max_block: largest block area drawn; default ``num_masked`` (a block never adds more
            than the patches still to mask anyway).
        min_aspect: smallest height/width ratio drawn.
        max_aspect: largest height/width ratio drawn; default 1 / min_aspect.
    """

    def __init__(self, grid: tuple[int, int] | int, *, num_masked: int | None = None, ratio: float = 0.4,
                 min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if len(grid) != 2 or min(grid) <= 0:
            raise ValueError(f"grid must be (H, W) with positive sides, or one positive int; got {grid}")
        height, width = grid
        num_patches = height * width
        if num_masked is None:
            if not 0 <= ratio <= 1:
                raise ValueError(f"ratio must be in [0, 1], got {ratio}")
            num_masked = round(ratio * num_patches)
        if not 0 <= num_masked <= num_patches:
            raise ValueError(f"num_masked must be between 0 and the {height}x{width} grid's {num_patches} patches, "
                             f"got {num_masked}")
        if min_block <= 0:
            raise ValueError(f"min_block must be positive, got {min_block}")
        if num_masked and min_block > num_masked:
            raise ValueError(f"min_block {min_block} exceeds num_masked {num_masked}: no block could be placed; "
                             f"use min_block <= {num_masked}")
        max_block = max(num_masked, min_block) if max_block is None else max_block
        if max_block < min_block:
            raise ValueError(f"max_block {max_block} is smaller than min_block {min_block}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect <= 0):
            raise ValueError(f"aspect ratios must be positive, got min_aspect={min_aspect}, max_aspect={max_aspect}")
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect {max_aspect} is smaller than min_aspect {min_aspect}")
        self.height, self.width = height, width
        self.num_masked = num_masked
        self.min_block, self.max_block = min_block, max_block
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self._log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator(grid=({self.height}, {self.width}), num_masked={self.num_masked}, "
                f"block={self.min_block}..{self.max_block}, aspect={self.min_aspect:.3g}..{self.max_aspect:.3g})")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A bool mask (H, W) with exactly ``num_masked`` True entries."""
        return self.generate(rng)[0]

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` masks, flattened row-major to patch order: bool (n, H * W)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        masks_NP = np.zeros((n, self.height * self.width), dtype=bool)
        for i in range(n):
            masks_NP[i] = self(rng).reshape(-1)
        return masks_NP

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Block]]:
        """The final mask (H, W) and the blocks placed before the random top-up, in order."""
        mask_HW = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masked:
            placed = self._place_block(mask_HW, min(self.num_masked - count, self.max_block), rng)
            if placed is None:
                break
            block, added = placed
            blocks.append(block)
            count += added
        if count < self.num_masked:
            unmasked = np.flatnonzero(~mask_HW)
            mask_HW.reshape(-1)[rng.choice(unmasked, self.num_masked - count, replace=False)] = True
        return mask_HW, blocks

    def _place_block(self, mask_HW: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[Block, int] | None:
        """Masks one block adding 1..budget new patches; returns it and the patches added, or None.

        Up to 10 attempts from one draw of 4 x 10 uniforms; scalar math in Python, since numpy's
        per-call overhead on 10-element vectors costs more than the arithmetic."""
        u_area, u_aspect, u_top, u_left = rng.random((4, _ATTEMPTS)).tolist()
        low, high = self._log_aspect
        for attempt in range(_ATTEMPTS):
            # Like random.uniform(a, b) in the reference, this also covers budget < min_block.
            area = self.min_block + u_area[attempt] * (budget - self.min_block)
            aspect = math.exp(low + u_aspect[attempt] * (high - low))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < self.height and w < self.width):
                continue
            top = math.floor(u_top[attempt] * max(self.height - h + 1, 1))
            left = math.floor(u_left[attempt] * max(self.width - w + 1, 1))
            window = mask_HW[top:top + h, left:left + w]
            added = h * w - int(np.count_nonzero(window))
            if 0 < added <= budget:
                window[...] = True
                return (top, left, h, w), added
        return None
