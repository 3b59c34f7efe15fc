"""Image-text retrieval recall in the COCO / Flickr30k protocol (as BEiT-3's evaluation does).

Images are scored against every caption by the dot product of L2-normalised features:

- image -> text ``i2t_r@k``: an image is a hit when any of *its* captions is among its k
  best-scoring captions;
- text -> image ``t2i_r@k``: a caption is a hit when its image is among its k best images;
- ``r_mean``: the mean of the six recalls; all in percent.

Scores are computed a chunk of query rows at a time, so 25k captions x 5k images need a chunk x
25k block in memory, never the whole matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["retrieval_recall"]


def _hits(queries_QD: torch.Tensor, keys_KD: torch.Tensor, is_match, k_max: int, chunk: int) -> torch.Tensor:
    """(Q, k_max) bool: whether the j-th best key of each query matches it."""
    out = []
    for start in range(0, queries_QD.shape[0], chunk):
        scores = queries_QD[start:start + chunk].float() @ keys_KD.float().t()
        top = scores.topk(min(k_max, keys_KD.shape[0]), dim=1).indices
        out.append(is_match(torch.arange(start, start + top.shape[0])[:, None], top))
    return torch.cat(out)


def retrieval_recall(image_features_ID: torch.Tensor, text_features_ND: torch.Tensor, caption_image_N: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways for I unique images and N captions.

    Args:
        image_features_ID: (I, D) image features (one row per unique image).
        text_features_ND: (N, D) caption features.
        caption_image_N: (N,) the row of each caption's image.
        ks: the k of each recall.
        chunk: query rows scored at a time.
    """
    if caption_image_N.shape != (text_features_ND.shape[0],):
        raise ValueError(f"caption_image_N must have one image row per caption ({text_features_ND.shape[0]}), got "
                         f"shape {tuple(caption_image_N.shape)}")
    owner = caption_image_N.long().cpu()
    if len(owner) and (owner.min() < 0 or owner.max() >= image_features_ID.shape[0]):
        raise ValueError(f"caption_image_N holds rows outside [0, {image_features_ID.shape[0]})")
    k_max = max(ks)
    i2t = _hits(image_features_ID, text_features_ND, lambda q, top: owner[top] == q, k_max, chunk)
    t2i = _hits(text_features_ND, image_features_ID, lambda q, top: top == owner[q], k_max, chunk)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100 * i2t[:, :k].any(dim=1).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100 * t2i[:, :k].any(dim=1).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out
