"""Per-kind processors: a raw webdataset sample -> an item -> a typed batch.

Each processor is called as ``processor(sample, seed)`` on one sample (raising
:class:`~data_pipelines.skips.SkipSample` for bad input) and ``processor.collate(items, seed)``
on a batch's items; a processor with a ``batcher`` groups items itself (the LM's packs documents
into rows, VQA's splits an image's questions across batches). All randomness (augmentation,
block masks, MLM masking, caption choice) derives from the seed it is given, so a sample's result
never depends on what came before it (which is what lets a stream resume exactly; see
``data_pipelines.streams``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .batches import ClassificationBatch, ImageBatch, ImageTextBatch, LMBatch, RetrievalBatch, TextBatch, VQABatch
from .images import ImageTransform, decode_image, eval_transform
from .masking import BlockMaskGenerator
from .shards import IMAGE_FIELDS
from .skips import ID, TEXT, TEXTS, SkipSample, decode_record, decode_text
from .streams import derive_seed
from .text import IMAGE_TEXT_MASK_RATIO, TEXT_MASK_RATIO, TokenPacker, mask_tokens
from .tokenizer import Tokenizer

__all__ = ["RETRIEVAL_RECORD", "VQA_QUESTION", "ClassificationProcessor", "ImageProcessor", "ImageTextProcessor",
           "LMProcessor", "QuestionBatcher", "RetrievalProcessor", "TextProcessor", "VQAProcessor",
           "checking_processor", "read_vqa_questions", "sample_field", "vqa_soft_score"]

def sample_field(sample: dict, *names: str) -> bytes:
    for name in names:
        if name in sample:
            return sample[name]
    expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    fields = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "no field"
    raise SkipSample("missing_field", f"expected {expected}; the sample has {fields}")


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (ids_BL, padding_mask_BL with True at padding)."""
    length = max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BL[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    lengths_B = torch.tensor([len(s) for s in seqs])
    return ids_BL, torch.arange(length)[None, :] >= lengths_B[:, None]


@dataclasses.dataclass
class ImageProcessor:
    """Images for masked image modeling: decode, augment, draw a block mask (or none);
    normalised per batch (:meth:`stack`)."""
    transform: ImageTransform
    mask: BlockMaskGenerator | None = None
    max_pixels: int = 64_000_000

    def image(self, sample: dict, seed: int) -> tuple[torch.Tensor, np.ndarray | None]:
        image = decode_image(sample_field(sample, *IMAGE_FIELDS), max_pixels=self.max_pixels)
        x_3HW = self.transform.pixels(image, random.Random(seed))
        mask_P = None if self.mask is None else self.mask(np.random.default_rng(seed)).reshape(-1)
        return x_3HW, mask_P

    def __call__(self, sample: dict, seed: int) -> tuple:
        return (sample["__key__"], *self.image(sample, seed))

    def stack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The images of :meth:`image`, stacked and normalised: (B, 3, S, S) float."""
        return self.transform.normalize(torch.stack(images))

    def collate(self, items: list, seed: int) -> ImageBatch:
        keys, images, masks = zip(*items)
        return ImageBatch(keys=list(keys), images_B3HW=self.stack(images), image_mask_BP=_stack_masks(masks))


def _stack_masks(masks: Sequence[np.ndarray | None]) -> torch.Tensor | None:
    return None if masks[0] is None else torch.from_numpy(np.stack(masks))


@dataclasses.dataclass
class TextProcessor:
    """Text for masked language modeling: ``[bos] + pieces[:max_len-2] + [eos]``, then BEiT-3's
    MLM corruption of ``mlm_ratio`` of the tokens (None: no masking)."""
    tokenizer: Tokenizer
    max_len: int = 64
    mlm_ratio: float | None = TEXT_MASK_RATIO

    def __call__(self, sample: dict, seed: int) -> tuple:
        return sample["__key__"], self.tokenizer.encode_for_model(sample_field(sample, "txt"), self.max_len)

    def text_batch(self, seqs: Sequence[Sequence[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
        ids_BL, padding_BL = _pad(seqs, self.tokenizer.pad_id)
        if self.mlm_ratio is None:
            return ids_BL, padding_BL, None
        ids_BL, labels_BL = mask_tokens(ids_BL, padding_BL, ratio=self.mlm_ratio, mask_id=self.tokenizer.mask_id,
                                        vocab_size=self.tokenizer.vocab_size,
                                        generator=torch.Generator().manual_seed(seed))
        return ids_BL, padding_BL, labels_BL

    def collate(self, items: list, seed: int) -> TextBatch:
        keys, seqs = zip(*items)
        ids_BL, padding_BL, labels_BL = self.text_batch(seqs, seed)
        return TextBatch(keys=list(keys), text_ids_BL=ids_BL, padding_mask_BL=padding_BL, mlm_labels_BL=labels_BL)


@dataclasses.dataclass
class ImageTextProcessor:
    """Image-text pairs: the image side of :class:`ImageProcessor` and the text side of
    :class:`TextProcessor` (BEiT-3 masks 50% of a pair's text)."""
    image: ImageProcessor
    text: TextProcessor

    @classmethod
    def build(cls, tokenizer: Tokenizer, transform: ImageTransform, *, mask: BlockMaskGenerator | None = None,
              max_len: int = 64, mlm_ratio: float | None = IMAGE_TEXT_MASK_RATIO) -> ImageTextProcessor:
        return cls(ImageProcessor(transform, mask), TextProcessor(tokenizer, max_len, mlm_ratio))

    def __call__(self, sample: dict, seed: int) -> tuple:
        ids = self.text(sample, seed)[1]  # text first: it is cheap and fails fast
        return (sample["__key__"], *self.image.image(sample, seed), ids)

    def collate(self, items: list, seed: int) -> ImageTextBatch:
        keys, images, masks, seqs = zip(*items)
        ids_BL, padding_BL, labels_BL = self.text.text_batch(seqs, seed)
        return ImageTextBatch(keys=list(keys), images_B3HW=self.image.stack(images), image_mask_BP=_stack_masks(masks),
                              text_ids_BL=ids_BL, padding_mask_BL=padding_BL, mlm_labels_BL=labels_BL)


def vqa_soft_score(matches: int) -> float:
    """VQAv2's target for an answer given by ``matches`` of the 10 annotators: 0, 0.3, 0.6, 0.9,
    then 1 (equal to the official leave-one-out accuracy of that answer)."""
    return (0.0, 0.3, 0.6, 0.9)[matches] if matches < 4 else 1.0


def _question_id(value) -> int | str:
    """A question id as the JSON has it: an integer stays one (EvalAI's submissions need VQAv2's
    integer ids back), a string stays a string."""
    ID(value)
    return value


VQA_QUESTION = {"question_id": _question_id, "question": TEXT, "answers": TEXTS}  # "answers": [] when label-free
VQA_QUESTION_OPTIONAL = {"question_type": TEXT, "answer_type": TEXT}
RETRIEVAL_RECORD = {"image_id": ID, "captions": TEXTS}


def _question(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"a list of question objects, one is a {type(value).__name__}")
    question = {}
    for key, kind in (*VQA_QUESTION.items(), *VQA_QUESTION_OPTIONAL.items()):
        if value.get(key) is None:
            if key in VQA_QUESTION:
                raise TypeError(f"questions with {key!r}; one has only {sorted(value)}")
            continue
        try:
            question[key] = kind(value[key])
        except TypeError as e:
            raise TypeError(f"questions whose {key!r} is {e}") from None
    return question


def _questions(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise TypeError(f"a non-empty list of questions, got {type(value).__name__} {str(value)[:40]}")
    return [_question(q) for q in value]


def read_vqa_questions(sample: dict) -> list[dict]:
    """The questions of a VQA sample (:data:`VQA_QUESTION` each, optional ``question_type`` and
    ``answer_type``), in either layout of its ``json``: an image's ``{"image_id", "questions": [...]}``,
    or one question's record (the bundled shards' layout). :class:`SkipSample` if the json, or
    any of its questions, is malformed: what training, evaluation and the answer vocabulary read."""
    record = decode_record(sample_field(sample, "json"), {},
                           {"questions": _questions, **VQA_QUESTION, **VQA_QUESTION_OPTIONAL})
    if "questions" in record:
        return record["questions"]
    missing = [k for k in VQA_QUESTION if k not in record]
    if missing:
        raise SkipSample("bad_json", f"missing {missing} (a question's record) or 'questions' (an image's)")
    return [record]


class QuestionBatcher:
    """Batches of ``batch_size`` questions from samples that each hold an image's questions (the
    processor's item is a list, one entry per question), with the interface of
    :class:`~data_pipelines.text.TokenPacker`: ``add(index, questions)`` returns the batches they
    complete, each with ``(index, offset)``, the sample the next batch starts in and how many of
    its questions came before; a batcher created with ``skip=offset``, fed from that sample on,
    continues exactly. ``rest()``: the questions of an unfinished batch (evaluation's last one)."""

    def __init__(self, batch_size: int, skip: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; a batch needs batch_size >= 1")
        self.batch_size, self.skip, self.items = batch_size, skip, []

    def add(self, index: int, questions: list) -> list[tuple[list, int, int]]:
        start, self.skip = self.skip, 0
        batches = []
        for q in range(start, len(questions)):
            self.items.append(questions[q])
            if len(self.items) == self.batch_size:
                full, self.items = self.items, []
                batches.append((full, index, q + 1) if q + 1 < len(questions) else (full, index + 1, 0))
        return batches

    def rest(self) -> list:
        return self.items


@dataclasses.dataclass
class VQAProcessor:
    """An image and its questions: a sample becomes one item per question (batched by
    :meth:`batcher`, which splits an image's questions across batches and resumes inside one).
    With ``answer_vocab`` (normalised answer -> index) also the soft-score targets, answers
    normalised by ``normalize_answer`` before lookup. ``view_per_question``: each question sees
    its own draw of the (random) transform, as when each question was a sample (training); else
    one view of the image serves all its questions (evaluation)."""
    tokenizer: Tokenizer
    transform: ImageTransform
    max_len: int = 64
    answer_vocab: dict[str, int] | None = None
    normalize_answer: Callable[[str], str] = str.strip
    max_pixels: int = 64_000_000
    view_per_question: bool = False

    def __post_init__(self):
        self._image = ImageProcessor(self.transform, max_pixels=self.max_pixels)

    def __call__(self, sample: dict, seed: int) -> list[tuple]:
        questions = read_vqa_questions(sample)
        seqs = [self.tokenizer.encode_for_model(q["question"], self.max_len) for q in questions]  # cheap, fails fast
        if self.view_per_question and len(questions) > 1:
            image = decode_image(sample_field(sample, *IMAGE_FIELDS), max_pixels=self.max_pixels)
            # question 0 keeps the sample's seed: a one-question sample is augmented as it always was
            views = [self.transform.pixels(image, random.Random(seed if q == 0 else derive_seed(seed, q)))
                     for q in range(len(questions))]
        else:
            views = [self._image.image(sample, seed)[0]] * len(questions)
        return [(sample["__key__"], x_3HW, ids, q["question_id"], q.get("question_type", ""), q.get("answer_type", ""),
                 q["answers"]) for q, ids, x_3HW in zip(questions, seqs, views)]

    def batcher(self, batch_size: int, skip: int) -> QuestionBatcher:
        return QuestionBatcher(batch_size, skip)

    def collate(self, items: list, seed: int) -> VQABatch:
        keys, images, seqs, qids, qtypes, atypes, answers = zip(*items)
        ids_BL, padding_BL = _pad(seqs, self.tokenizer.pad_id)
        targets_BA = None
        if self.answer_vocab is not None:
            targets_BA = torch.zeros(len(items), len(self.answer_vocab))
            for b, row in enumerate(answers):
                normalised = [self.normalize_answer(a) for a in row]
                for answer in set(normalised):
                    if answer in self.answer_vocab:
                        targets_BA[b, self.answer_vocab[answer]] = vqa_soft_score(normalised.count(answer))
        return VQABatch(keys=list(keys), images_B3HW=self._image.stack(images), text_ids_BL=ids_BL,
                        padding_mask_BL=padding_BL, question_ids=list(qids), question_types=list(qtypes),
                        answer_types=list(atypes), answers=[list(a) for a in answers], targets_BA=targets_BA)


@dataclasses.dataclass
class RetrievalProcessor:
    """An image and its captions: one caption drawn per image (training) or all of them (evaluation)."""
    tokenizer: Tokenizer
    transform: ImageTransform
    max_len: int = 64
    all_captions: bool = False
    max_pixels: int = 64_000_000

    def __post_init__(self):
        self._image = ImageProcessor(self.transform, max_pixels=self.max_pixels)

    def __call__(self, sample: dict, seed: int) -> tuple:
        record = decode_record(sample_field(sample, "json"), RETRIEVAL_RECORD)
        # training draws among the captions with a token (a first piece is enough to know)
        captions = [c for c in record["captions"] if self.tokenizer.encode_prefix(c, 1)]
        if not captions:
            raise SkipSample("empty_text", "no caption with a token")
        if not self.all_captions:
            captions = [random.Random(seed).choice(captions)]
        seqs = [self.tokenizer.encode_for_model(c, self.max_len) for c in captions]
        x_3HW, _ = self._image.image(sample, seed)
        return sample["__key__"], x_3HW, str(record["image_id"]), seqs

    def collate(self, items: list, seed: int) -> RetrievalBatch:
        keys, images, image_ids, caption_lists = zip(*items)
        seqs = [s for caps in caption_lists for s in caps]
        ids_NL, padding_NL = _pad(seqs, self.tokenizer.pad_id)
        owner_N = torch.tensor([b for b, caps in enumerate(caption_lists) for _ in caps])
        return RetrievalBatch(keys=list(keys), images_B3HW=self._image.stack(images), image_ids=list(image_ids),
                              text_ids_NL=ids_NL, padding_mask_NL=padding_NL, caption_image_N=owner_N)


def _class_index(value: bytes, classes: int | None) -> int:
    text = value.decode("ascii", "replace").strip()
    if not text.isdigit() or (classes is not None and int(text) >= classes):
        expected = "a class index" if classes is None else f"a class index 0..{classes - 1}"
        raise SkipSample("missing_field", f"cls must be {expected}, got {text[:20]!r}")
    return int(text)


@dataclasses.dataclass
class ClassificationProcessor:
    """An image and its class: the ``json`` field's ``label`` (a class name, looked up in
    ``classes``) or else the ``cls`` field (the class index as ASCII digits, webdataset's
    convention); the name decides when there is one (a writer's ``cls`` indexes the classes of
    what it wrote, and a validation folder may have fewer). ``classes``: the class names in head
    order (None: any name or index is accepted, as ``mmoe data inspect`` checks shards). ``batch_augment``:
    ``(images_B3HW, labels_B, seed) -> (images_B3HW, targets_BC)``, what training does to a whole
    batch (Mixup / CutMix, label smoothing), seeded by the batch's seed."""
    transform: ImageTransform
    classes: Sequence[str] | None = None
    batch_augment: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    max_pixels: int = 64_000_000

    def __post_init__(self):
        self._image = ImageProcessor(self.transform, max_pixels=self.max_pixels)
        self._index = None if self.classes is None else {c: i for i, c in enumerate(self.classes)}

    def label(self, sample: dict) -> int:
        """The sample's class index (:class:`SkipSample` if it has none that fits)."""
        if "json" not in sample and "cls" not in sample:
            sample_field(sample, "cls", "json")
        count = None if self.classes is None else len(self.classes)
        if "json" not in sample:
            return _class_index(sample["cls"], count)
        name = decode_record(sample["json"], {"label": TEXT})["label"]
        if self._index is None:
            return -1  # a name without a class list: inspection only
        if name not in self._index:
            raise SkipSample("bad_json", f"label {name[:40]!r} is not one of the {count} classes")
        return self._index[name]

    def __call__(self, sample: dict, seed: int) -> tuple:
        label = self.label(sample)  # cheap, fails fast
        return sample["__key__"], self._image.image(sample, seed)[0], label

    def collate(self, items: list, seed: int) -> ClassificationBatch:
        keys, images, labels = zip(*items)
        images_B3HW, labels_B = self._image.stack(images), torch.tensor(labels)
        targets_BC = None
        if self.batch_augment is not None:
            images_B3HW, targets_BC = self.batch_augment(images_B3HW, labels_B, seed)
        return ClassificationBatch(keys=list(keys), images_B3HW=images_B3HW, labels_B=labels_B, targets_BC=targets_BC)


@dataclasses.dataclass
class LMProcessor:
    """Text documents for the causal LM: each tokenised and closed with eos, then packed across
    documents into rows of ``seq_len + 1`` tokens (:class:`~data_pipelines.text.TokenPacker`)."""
    tokenizer: Tokenizer
    seq_len: int = 256

    def __call__(self, sample: dict, seed: int) -> list[int]:
        ids = self.tokenizer.encode(decode_text(sample_field(sample, "txt")))
        if not ids:
            raise SkipSample("empty_text", "no tokens")
        return [*ids, self.tokenizer.eos_id]

    def batcher(self, batch_size: int, skip: int) -> TokenPacker:
        return TokenPacker(batch_size, self.seq_len, skip)

    def collate(self, rows: list[list[int]], seed: int) -> LMBatch:
        return LMBatch(keys=[], ids_BT=torch.tensor(rows, dtype=torch.long))


def checking_processor(kind: str, tokenizer: Tokenizer, max_pixels: int = 64_000_000) -> Callable[[dict, int], tuple]:
    """The processor a stream of shards of ``kind`` trains with, on 16-pixel images: a sample
    it raises :class:`SkipSample` for is one training skips, for the same reason (what
    ``mmoe data inspect`` reports). Retrieval reads every caption, as evaluation does."""
    small = eval_transform(16)
    processors = {
        "image": lambda: ImageProcessor(small, max_pixels=max_pixels),
        "text": lambda: TextProcessor(tokenizer, mlm_ratio=None),
        "image_text": lambda: ImageTextProcessor(ImageProcessor(small, max_pixels=max_pixels),
                                                 TextProcessor(tokenizer, mlm_ratio=None)),
        "vqa": lambda: VQAProcessor(tokenizer, small, max_pixels=max_pixels),
        "retrieval": lambda: RetrievalProcessor(tokenizer, small, all_captions=True, max_pixels=max_pixels),
        "classification": lambda: ClassificationProcessor(small, max_pixels=max_pixels),
        "nlvr2": lambda: _nlvr2_processor(tokenizer, small, max_pixels),
    }
    if kind not in processors:
        raise ValueError(f"unknown stream kind {kind!r}; known: {', '.join(processors)}")
    return processors[kind]()


def _nlvr2_processor(tokenizer: Tokenizer, transform: ImageTransform, max_pixels: int):
    from .nlvr2 import NLVR2Processor  # it builds on this module

    return NLVR2Processor(tokenizer, transform, max_pixels=max_pixels)
