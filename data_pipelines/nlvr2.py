"""NLVR2 data: the official layout -> ``nlvr2`` shards, and the processor that batches them.

A Corpus for Reasoning About Natural Language Grounded in Photographs (NLVR2, Suhr et al.,
arXiv 1811.00491): two images and a statement about them, true or false. As the NLVR2
repository (github.com/lil-lab/nlvr, ``nlvr2/data/{train,dev,test1}.json``) distributes it:

- JSON lines ``{"identifier": "train-10171-0-0", "sentence": "...", "label": "True" | "False",
  "directory": 4, ...}`` (``directory`` in train only; other keys are not read);
- the pair's images, ``<image-root>/<directory>/<identifier without its last -N>-img0.png`` and
  ``-img1.png`` in train, ``<image-root>/<identifier without its last -N>-img0.png`` and ``-img1``
  in dev and test1 (unilm's ``beit3/datasets.py`` builds the same paths: several statements,
  ``...-0`` and ``...-1``, can share a pair).

A shard sample (:mod:`data_pipelines.shards`, kind ``nlvr2``): ``left.<image>`` (img0),
``right.<image>`` (img1) and ``json`` ``{"identifier", "sentence", "label": true | false}``,
optionally ``"template"`` (the bundled set's statement template, which evaluation reports
accuracy by). One statement per sample: a pair's images are stored once per statement.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from .batches import Batch
from .images import ImageTransform, decode_image
from .processors import _pad, sample_field
from .shards import REQUIRED_FIELDS, safe_key
from .skips import ID, TEXT, decode_record
from .streams import derive_seed
from .tokenizer import Tokenizer

__all__ = ["LEFT_FIELDS", "NLVR2Batch", "NLVR2Processor", "NLVR2_RECORD", "RIGHT_FIELDS", "nlvr2_image_paths",
           "nlvr2_source", "read_nlvr2_record"]

LEFT_FIELDS, RIGHT_FIELDS, _ = REQUIRED_FIELDS["nlvr2"]  # left.jpg, left.png, ...; right.jpg, ...


def _label(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"true or false, got {value!r}")
    return value


NLVR2_RECORD = {"identifier": ID, "sentence": TEXT, "label": _label}


def read_nlvr2_record(sample: dict) -> dict:
    """A sample's ``json`` (:data:`NLVR2_RECORD`, optional ``template``), or :class:`SkipSample`."""
    return decode_record(sample_field(sample, "json"), NLVR2_RECORD, {"template": TEXT})


@dataclasses.dataclass(kw_only=True)
class NLVR2Batch(Batch):
    """Image pairs and their statements: ``labels_B`` is 1 where the statement is true; the
    ``templates`` are "" where the data has none."""
    left_images_B3HW: torch.Tensor
    right_images_B3HW: torch.Tensor
    text_ids_BL: torch.Tensor
    padding_mask_BL: torch.Tensor
    labels_B: torch.Tensor
    identifiers: list[str]
    templates: list[str]


@dataclasses.dataclass
class NLVR2Processor:
    """Two images and a statement: each image decoded and transformed with its own draw of the
    (random) transform, ``[bos] statement [eos]`` of at most ``max_len`` tokens."""
    tokenizer: Tokenizer
    transform: ImageTransform
    max_len: int = 64
    max_pixels: int = 64_000_000

    def __call__(self, sample: dict, seed: int) -> tuple:
        record = read_nlvr2_record(sample)
        ids = self.tokenizer.encode_for_model(record["sentence"], self.max_len)  # cheap, fails fast
        left, right = (self.transform.pixels(decode_image(sample_field(sample, *fields), max_pixels=self.max_pixels),
                                             random.Random(derive_seed(seed, side)))
                       for side, fields in enumerate((LEFT_FIELDS, RIGHT_FIELDS)))
        return (sample["__key__"], left, right, ids, record["identifier"], record["label"],
                record.get("template", ""))

    def collate(self, items: list, seed: int) -> NLVR2Batch:
        keys, lefts, rights, seqs, identifiers, labels, templates = zip(*items)
        ids_BL, padding_BL = _pad(seqs, self.tokenizer.pad_id)
        return NLVR2Batch(keys=list(keys), left_images_B3HW=self.transform.normalize(torch.stack(lefts)),
                          right_images_B3HW=self.transform.normalize(torch.stack(rights)), text_ids_BL=ids_BL,
                          padding_mask_BL=padding_BL, labels_B=torch.tensor(labels, dtype=torch.long),
                          identifiers=list(identifiers), templates=list(templates))


# -- the official layout ------------------------------------------------------------------------

def nlvr2_image_paths(root: Path, record: dict) -> tuple[Path, Path]:
    """img0 and img1 of a statement: ``<root>[/<directory>]/<identifier without its last -N>-img{0,1}.png``."""
    folder = root / str(record["directory"]) if record.get("directory") is not None else root
    pair = record["identifier"].rsplit("-", 1)[0]
    return folder / f"{pair}-img0.png", folder / f"{pair}-img1.png"


def nlvr2_source(path: str | Path, image_root: str | Path | None = None) -> Iterator[tuple[str, dict]]:
    """``nlvr2`` samples of an NLVR2 ``train.json`` / ``dev.json`` / ``test1.json`` (JSON lines,
    see the module docstring), in file order; images relative to ``image_root`` (default: the
    file's folder: ``images/train`` for train, ``dev`` and ``test1`` in unilm's layout)."""
    from .sources import _need, _records, image_field  # sources lists this one among its SOURCES

    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path):
        _need(record, path, line_no, "identifier", "sentence", "label")
        identifier, sentence, label = record["identifier"], record["sentence"], record["label"]
        if not isinstance(identifier, str) or "-" not in identifier or not isinstance(sentence, str):
            raise ValueError(f"{path}:{line_no}: expected an identifier like 'train-10171-0-0' and a sentence "
                             f"string, got {identifier!r} and {sentence!r}")
        if label not in ("True", "False", True, False):
            raise ValueError(f"{path}:{line_no}: label must be \"True\" or \"False\", got {label!r}")
        fields = {}
        for side, image in zip(("left", "right"), nlvr2_image_paths(root, record)):
            if not image.is_file():
                raise FileNotFoundError(f"{path}:{line_no}: image {image} not found (NLVR2 images are "
                                        f"<image-root>/<directory>/<pair>-img0.png in train, <image-root>/"
                                        f"<pair>-img0.png in dev and test1; --image-root sets the root)")
            fields.update({f"{side}.{ext}": data for ext, data in image_field(image).items()})
        yield safe_key(identifier), {**fields, "json": {"identifier": identifier, "sentence": sentence,
                                                        "label": label in ("True", True)}}

