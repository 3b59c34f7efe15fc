"""Text-side batch transforms: BEiT-3 masked language modelling and document packing.

- :func:`mask_tokens` — the text half of BEiT-3's masked data modelling (Image as a Foreign
  Language, arXiv 2208.10442): 15% of the tokens of a text-only sequence, 50% of an image-text
  pair's, replaced BERT-style (arXiv 1810.04805) by ``<mask>`` 80% / a random token 10% /
  themselves 10%. unilm draws random ids from [3, vocab); we draw from the non-special ids
  [4, vocab) without ``<mask>``, so a random replacement is never ``<unk>`` or a mask in disguise.
- :class:`TokenPacker` — documents joined by eos and cut into fixed-length chunks for
  next-token prediction, with no padding.

Shapes: B batch, L sequence length (tokens, bos and eos included).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

__all__ = ["IMAGE_TEXT_MASK_RATIO", "TEXT_MASK_RATIO", "TokenPacker", "mask_tokens"]

TEXT_MASK_RATIO = 0.15
IMAGE_TEXT_MASK_RATIO = 0.5
# Of the chosen positions: P(<mask>), then P(random id); the rest keep their token.
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1
IGNORE_INDEX = -100  # the label of unchosen positions: F.cross_entropy's default ignore_index


def mask_tokens(ids_BL: torch.Tensor, padding_mask_BL: torch.Tensor, *, ratio: float, mask_id: int,
                vocab_size: int, generator: torch.Generator,
                special_ids: Sequence[int] = (0, 1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and corrupt them; returns ``(input_ids_BL, labels_BL)``.

    In each row, exactly ``round(n * ratio)`` positions are chosen (Python's round, half to
    even; at least one when ``ratio > 0`` and the row has any), uniformly among its n maskable
    tokens: not padding and not in ``special_ids``. Each chosen position independently becomes
    ``mask_id`` with probability 0.8, a uniformly drawn id of [0, vocab_size) other than
    ``special_ids`` and ``mask_id`` with 0.1, and stays as it is with 0.1. ``labels_BL`` holds
    the original id at chosen positions and -100 elsewhere. All randomness comes from
    ``generator``, which must live on ``ids_BL``'s device.

    Args:
        ids_BL: (B, L) token ids, e.g. from ``Tokenizer.encode_for_model`` then padded.
        padding_mask_BL: (B, L) bool, True at padding.
        ratio: share of each row's maskable tokens to choose, in [0, 1]; BEiT-3 uses
            :data:`TEXT_MASK_RATIO` for text and :data:`IMAGE_TEXT_MASK_RATIO` for image-text pairs.
        mask_id: the tokenizer's ``mask_id``.
        vocab_size: the tokenizer's ``vocab_size`` (ids it can emit), not the embedding's rows.
        generator: source of randomness, so a seed reproduces the masking.
        special_ids: ids never chosen nor drawn as replacements (default bos, pad, eos, unk).
    """
    if ids_BL.dim() != 2 or ids_BL.dtype != torch.long:
        raise ValueError(f"ids_BL must be a (B, L) int64 tensor, got shape {tuple(ids_BL.shape)} {ids_BL.dtype}")
    if padding_mask_BL.shape != ids_BL.shape or padding_mask_BL.dtype != torch.bool:
        raise ValueError(f"padding_mask_BL must be a bool tensor of ids_BL's shape {tuple(ids_BL.shape)}, "
                         f"got shape {tuple(padding_mask_BL.shape)} {padding_mask_BL.dtype}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} is outside [0, 1]; BEiT-3 uses {TEXT_MASK_RATIO} for text and "
                         f"{IMAGE_TEXT_MASK_RATIO} for image-text pairs")
    if not 0 <= mask_id < vocab_size or mask_id in special_ids:
        raise ValueError(f"mask_id={mask_id} must be an id of [0, vocab_size={vocab_size}) "
                         f"outside special_ids={tuple(special_ids)}")
    device = ids_BL.device
    special_ids_t = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    replacements = torch.arange(vocab_size, device=device)
    replacements = replacements[~torch.isin(replacements, special_ids_t) & (replacements != mask_id)]
    if replacements.numel() == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special id to draw random replacements from")

    maskable_BL = ~padding_mask_BL & ~torch.isin(ids_BL, special_ids_t)
    n_B = maskable_BL.sum(dim=1)
    # float64 and half-to-even rounding, so the count is exactly Python's round(n * ratio).
    k_B = torch.round(n_B.double() * ratio).long()
    if ratio > 0:
        k_B = torch.where(n_B > 0, k_B.clamp(min=1), k_B)

    # A uniform random subset of k maskable positions per row: rank random scores, with
    # unmaskable positions scored above any uniform draw so they rank last, and take ranks < k.
    scores_BL = torch.rand(ids_BL.shape, generator=generator, device=device)
    scores_BL = scores_BL.masked_fill(~maskable_BL, 2.0)
    rank_BL = scores_BL.argsort(dim=1).argsort(dim=1)
    chosen_BL = rank_BL < k_B[:, None]

    action_BL = torch.rand(ids_BL.shape, generator=generator, device=device)
    random_ids_BL = replacements[torch.randint(replacements.numel(), ids_BL.shape, generator=generator, device=device)]
    input_ids_BL = torch.where(chosen_BL & (action_BL < MASK_FRACTION), mask_id, ids_BL)
    use_random_BL = chosen_BL & (action_BL >= MASK_FRACTION) & (action_BL < MASK_FRACTION + RANDOM_FRACTION)
    input_ids_BL = torch.where(use_random_BL, random_ids_BL, input_ids_BL)
    labels_BL = torch.where(chosen_BL, ids_BL, IGNORE_INDEX)
    return input_ids_BL, labels_BL


class TokenPacker:
    """Packs documents into batches of ``batch_size`` chunks of ``seq_len + 1`` tokens and knows,
    after each batch, where the rest of the stream starts, so a resumed reader continues exactly.

    The stream is ``doc_0 + doc_1 + ...`` (each document already ends with eos); batch j holds
    the chunks ``stream[i * seq_len : i * seq_len + seq_len + 1]`` for i = j*batch_size ... so
    consecutive chunks share one token and, with inputs ``chunk[:-1]`` and targets ``chunk[1:]``,
    every stream token after the first is a target exactly once. Documents straddle chunks (no
    cross-document attention mask is implied); the incomplete tail is never emitted.

    ``add(index, doc)`` takes documents with increasing indices (the reader's raw-sample index)
    and returns the batches they complete, each with ``(index, offset)``: the document the next
    batch starts in and how many of its tokens came before. A packer created with
    ``skip=offset``, fed from that document on, continues the stream exactly.
    """

    def __init__(self, batch_size: int, seq_len: int, skip: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}; a chunk needs seq_len >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; a batch needs batch_size >= 1")
        self.batch_size, self.seq_len, self.skip = batch_size, seq_len, skip
        self.buffer: list[int] = []
        self.spans: deque[list[int]] = deque()  # [doc index, its tokens in the buffer, tokens before those]

    def add(self, index: int, doc: Sequence[int]) -> list[tuple[list[list[int]], int, int]]:
        start, self.skip = self.skip, 0
        if len(doc) > start:
            self.buffer.extend(doc[start:])
            self.spans.append([index, len(doc) - start, start])
        batches = []
        step = self.batch_size * self.seq_len
        while len(self.buffer) >= step + 1:
            rows = [self.buffer[i:i + self.seq_len + 1] for i in range(0, step, self.seq_len)]
            del self.buffer[:step]  # the last token stays: it starts the next chunk
            consumed = step
            while consumed:
                span = self.spans[0]
                taken = min(consumed, span[1])
                span[1] -= taken
                span[2] += taken
                consumed -= taken
                if not span[1]:
                    self.spans.popleft()
            batches.append((rows, self.spans[0][0], self.spans[0][2]))
        return batches

    def rest(self) -> list:
        """Nothing: the incomplete tail of the stream is never emitted."""
        return []
