"""SentencePiece tokenizer with the token-id layout of BEiT-3 (Image as a Foreign Language,
arXiv 2208.10442), which is XLM-R's (arXiv 1911.02116) as laid out by fairseq and HF
``XLMRobertaTokenizer``.

Model ids, whatever the sentencepiece file underneath::

    <s> = 0 (bos)   <pad> = 1   </s> = 2 (eos)   <unk> = 3   pieces ...   <mask> = mask_id

Two layouts of the sentencepiece model give these ids:

- ``beit3``: a model we train (:func:`train_tokenizer`) with bos=0, pad=1, eos=2, unk=3 and
  ``<mask>`` as a user-defined symbol (piece 4). Spm ids are model ids; ``mask_id`` is the spm id
  of ``<mask>`` and ``vocab_size = len(sp)``.
- ``xlmr``: the official ``beit3.spm``, a stock XLM-R sentencepiece model whose own ids are
  unk=0, bos=1, eos=2 and no pad. As in fairseq (``fairseq_offset = 1``), spm id i >= 3 becomes
  model id i + 1, spm unk (0) becomes 3, and ``<mask>`` is appended after the last piece:
  ``mask_id = len(sp) + 1``, ``vocab_size = len(sp) + 2`` (64002 for ``beit3.spm``; BEiT-3's text
  embedding has 64010 rows, the last 8 never used).

Deviation from HF ``XLMRobertaTokenizer``: a literal ``<mask>`` (or ``<s>``...) in the text is
text, never a special id, in both layouts, so raw documents cannot inject masks the MLM loss does
not know about. In the ``beit3`` layout sentencepiece always matches a user-defined symbol, so
:meth:`Tokenizer.encode` turns the ``<mask>`` it finds in text into ``<unk>``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from .atomic import atomic_write

from .skips import SkipSample, decode_text

__all__ = ["LAYOUTS", "Tokenizer", "train_tokenizer"]

Layout = Literal["beit3", "xlmr"]
LAYOUTS = ("beit3", "xlmr")
MASK_PIECE = "<mask>"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1
# The trainer's flags for each layout; the xlmr one exists only to stand in for beit3.spm in tests.
_TRAIN_IDS = {
    "beit3": dict(bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, user_defined_symbols=[MASK_PIECE]),
    "xlmr": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
}


def _special_ids(sp: spm.SentencePieceProcessor) -> str:
    has_mask = sp.piece_to_id(MASK_PIECE) != sp.unk_id()
    return (f"unk={sp.unk_id()} bos={sp.bos_id()} eos={sp.eos_id()} pad={sp.pad_id()} "
            f"<mask>={'present' if has_mask else 'absent'}")


def _fits(sp: spm.SentencePieceProcessor, layout: str) -> bool:
    if layout == "beit3":
        return ((sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (BOS_ID, PAD_ID, EOS_ID, UNK_ID)
                and sp.piece_to_id(MASK_PIECE) != sp.unk_id())
    return (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


_LAYOUT_NEEDS = "beit3 needs bos=0 pad=1 eos=2 unk=3 and a <mask> piece; xlmr needs unk=0 bos=1 eos=2"


class Tokenizer:
    """Text <-> BEiT-3 model ids over a sentencepiece model; see the module docstring.

    Args:
        sp: a loaded ``SentencePieceProcessor``.
        layout: ``beit3`` or ``xlmr``, how ``sp``'s ids map to model ids. Use
            :meth:`detect_layout` (or :meth:`load` with ``layout="auto"``) when unsure.
    """

    bos_id = BOS_ID
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, sp: spm.SentencePieceProcessor, layout: Layout):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown tokenizer layout {layout!r}; expected one of {LAYOUTS} (or 'auto' in load)")
        if not _fits(sp, layout):
            raise ValueError(f"sentencepiece model does not have the {layout} layout: it has {_special_ids(sp)}; "
                             f"{_LAYOUT_NEEDS}")
        self.sp = sp
        self.layout = layout
        n = len(sp)
        if layout == "beit3":
            self.mask_id = sp.piece_to_id(MASK_PIECE)
            self.vocab_size = n
            self._model_of_spm = list(range(n))
        else:
            self.mask_id = n + FAIRSEQ_OFFSET
            self.vocab_size = n + 2
            self._model_of_spm = [UNK_ID, BOS_ID, EOS_ID] + [i + FAIRSEQ_OFFSET for i in range(3, n)]
        # Model id -> spm id for the ids decode renders; bos/pad/eos/mask map to None and are dropped.
        # <unk> is kept: spm renders it as " ⁇ ", which shows where text was lost.
        self._spm_of_model: list[int | None] = [None] * self.vocab_size
        for spm_id, model_id in enumerate(self._model_of_spm):
            if not sp.is_control(spm_id):
                self._spm_of_model[model_id] = spm_id
        self._spm_of_model[self.mask_id] = None

    @staticmethod
    def detect_layout(sp: spm.SentencePieceProcessor) -> Layout:
        """``beit3`` or ``xlmr`` from the model's special ids; ValueError if it has neither."""
        for layout in LAYOUTS:
            if _fits(sp, layout):
                return layout
        raise ValueError(f"sentencepiece model is in neither tokenizer layout: it has {_special_ids(sp)}; "
                         f"{_LAYOUT_NEEDS}. Train one with data_pipelines.tokenizer.train_tokenizer")

    @classmethod
    def load(cls, path: str | os.PathLike, layout: Layout | Literal["auto"] = "auto") -> Tokenizer:
        """Load a ``.model``/``.spm`` file; ``layout="auto"`` detects it (:meth:`detect_layout`)."""
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"unknown tokenizer layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from e
        return cls(sp, cls.detect_layout(sp) if layout == "auto" else layout)

    def encode(self, text: str) -> list[int]:
        """Model ids of the pieces of ``text``; no bos/eos, never ``mask_id``."""
        spm_ids = self.sp.encode(text)
        ids = [self._model_of_spm[i] for i in spm_ids]
        return [UNK_ID if i == self.mask_id else i for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of model ids, dropping bos, pad, eos and mask (unk renders as spm's `` ⁇ ``)."""
        spm_ids = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary [0, {self.vocab_size}); "
                                 f"restrict the model's logits to the first {self.vocab_size} ids")
            if self._spm_of_model[i] is not None:
                spm_ids.append(self._spm_of_model[i])
        return self.sp.decode(spm_ids)

    def encode_for_model(self, text: str | bytes, max_len: int) -> list[int]:
        """``[bos] + encode(text)[:max_len - 2] + [eos]``, unpadded.

        Bytes are decoded as strict UTF-8. Raises :class:`SkipSample` ``bad_utf8`` when they are
        not UTF-8 and ``empty_text`` when the text has no pieces (empty or whitespace only).
        """
        if max_len < 3:
            raise ValueError(f"max_len={max_len} leaves no room for a token between bos and eos; use max_len >= 3")
        if isinstance(text, (bytes, bytearray)):
            text = decode_text(text)
        elif not isinstance(text, str):
            raise TypeError(f"encode_for_model takes str or bytes, got {type(text).__name__}")
        ids = self.encode_prefix(text, max_len - 2)
        if not ids:
            raise SkipSample("empty_text", f"{len(text)} characters, no pieces")
        return [BOS_ID, *ids, EOS_ID]

    def encode_prefix(self, text: str, count: int) -> list[int]:
        """``encode(text)[:count]``, encoding only as much of ``text`` as that needs.

        Sentencepiece splits text at whitespace before it segments (``split_by_whitespace``, on
        in BEiT-3's and XLM-R's models and ours), so the whole words of a prefix get the pieces
        the whole text starts with. Prefixes of growing length are tried, each ended before a
        space; a document of thousands of characters of which 64 tokens are kept costs ~10x less.
        """
        limit = 8 * count  # ~2x the characters of count pieces of English
        while limit < len(text):
            cut = text.rfind(" ", 0, limit)
            if cut > 0:
                ids = self.encode(text[:cut])
                if len(ids) >= count:
                    return ids[:count]
            limit *= 4
        return self.encode(text)[:count]

    def __repr__(self) -> str:
        return f"Tokenizer(layout={self.layout!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"


def train_tokenizer(texts: Iterable[str], out_path: str | os.PathLike, *, vocab_size: int,
                    model_type: Literal["bpe", "unigram"] = "bpe", overwrite: bool = False,
                    layout: Layout = "beit3", byte_fallback: bool = False) -> Tokenizer:
    """Train a sentencepiece model on ``texts``, write it to ``out_path`` and return its tokenizer.

    Training runs in memory. Each text is split into lines, because sentencepiece treats one item
    as one sentence and silently drops sentences over 4192 bytes. ``character_coverage=1.0``: every
    character of the corpus gets a piece. The vocabulary has exactly ``vocab_size`` pieces (so a
    model config can rely on it): a corpus too small for that is a ValueError, not a smaller
    vocabulary. The file is written under a temporary name and renamed, so an interruption never
    leaves a partial model.

    Args:
        texts: documents (or lines) of training text.
        out_path: where the ``.model`` file goes; must not exist unless ``overwrite``.
        vocab_size: number of sentencepiece pieces, specials and ``<mask>`` included.
        model_type: ``bpe`` (fast) or ``unigram``.
        overwrite: replace an existing file at ``out_path``.
        layout: ``beit3`` (ours, see the module docstring) or ``xlmr``, a stock-layout model
            (unk=0, bos=1, eos=2, no pad, no ``<mask>``) that stands in for ``beit3.spm`` in tests.
        byte_fallback: 256 of the pieces are UTF-8 bytes, which spell a character no piece covers
            instead of ``<unk>`` (for scripts with thousands of characters, such as Chinese).
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass overwrite=True to replace it")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tokenizer layout {layout!r}; expected one of {LAYOUTS}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}; expected 'bpe' or 'unigram'")
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=proto, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=byte_fallback, num_threads=2, minloglevel=1, **_TRAIN_IDS[layout])
    except RuntimeError as e:
        if "Vocabulary size too high" in str(e):
            raise ValueError(f"vocab_size={vocab_size} is more than this corpus supports ({e}); "
                             "pass a smaller vocab_size or more text") from e
        raise
    with atomic_write(out_path, fsync=True) as tmp:
        tmp.write_bytes(proto.getvalue())
        if out_path.exists() and not overwrite:
            raise FileExistsError(f"{out_path} appeared while training; pass overwrite=True to replace it")
    return Tokenizer(spm.SentencePieceProcessor(model_proto=proto.getvalue()), layout)
