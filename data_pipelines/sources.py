"""Samples for :class:`~data_pipelines.shards.ShardSink` from ordinary files: a folder of images,
image-caption pairs (CSV/TSV, JSONL or Karpathy's COCO/Flickr30k split file), text
(:mod:`data_pipelines.text_sources`), VQA records (JSONL, or VQAv2's official files:
:mod:`data_pipelines.vqav2`), retrieval records (JSONL, or Karpathy's file), NLVR2's statement
files (:mod:`data_pipelines.nlvr2`) and labelled images in ImageNet's folder layout
(:func:`classification_folder`; :func:`class_images` lists them for reading such a folder directly).

Each source yields ``(key, fields)`` in a deterministic order (folders sorted, records in file
order). Image bytes are kept as they are for JPEG, PNG and WebP and re-encoded as PNG otherwise.
Record files name images relative to ``image_root`` (default: the record file's folder).

A CSV/TSV has a header row; ``sep`` is its separator (default ``,`` for ``.csv``, TAB for
``.tsv``; given, any file is read as a table), and the caption pairs are in the columns
``image_column`` and ``text_column`` (open_clip's ``filepath<TAB>title`` file: ``sep="\\t",
image_column="filepath", text_column="title"``). A JSON-lines record holds the same names as keys.
A ``.json`` shaped like Karpathy's split files (:mod:`data_pipelines.karpathy`) is read as one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .karpathy import coco_caption_images, karpathy_images, read_coco_captions, read_karpathy
from .nlvr2 import nlvr2_source
from .shards import safe_key
from .text_sources import text_documents
from .vqav2 import read_questions, vqav2_images

__all__ = ["SOURCES", "caption_pairs", "class_images", "classification_folder", "image_classes", "image_folder",
           "retrieval_records", "text_documents", "vqa_records", "vqa_source"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Sample = tuple[str, dict]


def image_field(path: Path) -> dict[str, bytes]:
    """``{"jpg": bytes}`` / ``{"png": bytes}`` / ``{"webp": bytes}`` for an image file (other formats
    become PNG)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return {"jpg": path.read_bytes()}
    if suffix in (".png", ".webp"):
        return {suffix[1:]: path.read_bytes()}
    out = io.BytesIO()
    with Image.open(path) as image:
        image.save(out, format="PNG")
    return {"png": out.getvalue()}


def image_folder(root: str | Path) -> Iterator[Sample]:
    """Every image under ``root`` (recursively, sorted); key = the relative path without suffix."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory of images")
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield safe_key(str(path.relative_to(root).with_suffix(""))), image_field(path)


def image_classes(root: str | Path) -> list[str]:
    """The classes of a folder in ImageNet's layout (``<root>/<class>/<image>``): its
    subfolders' names, sorted as torchvision's ``ImageFolder`` sorts them (their index is their place)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory (expected ImageNet's layout: <root>/<class>/<image>)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected ImageNet's layout: <root>/<class>/<image>)")
    return classes


def class_images(root: str | Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    """(image, class index) of every image in ``root``'s class folders, in ``ImageFolder``'s order:
    class by class, each walked recursively with names sorted. ``classes``: the class list the
    indices refer to (default: :func:`image_classes` of ``root``; a validation folder takes its
    training folder's), each folder of ``root`` must be in it."""
    root = Path(root)
    found = image_classes(root)
    classes = found if classes is None else list(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not among the "
                         f"{len(classes)} classes (the training folder's)")
    images = []
    for name in found:
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            images += [(Path(folder) / f, classes.index(name)) for f in sorted(files)
                       if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return images


def classification_folder(root: str | Path) -> Iterator[Sample]:
    """One sample per image of a folder in ImageNet's layout (:func:`class_images`): the image,
    ``cls`` (its class index) and ``json`` ``{"label": class}``; key = the relative path without suffix."""
    root = Path(root)
    classes = image_classes(root)
    for path, index in class_images(root, classes):
        yield (safe_key(str(path.relative_to(root).with_suffix(""))),
               {**image_field(path), "cls": str(index), "json": {"label": classes[index]}})


def _separator(path: Path, sep: str | None) -> str | None:
    """The one-character separator of a CSV/TSV file (``\\t`` spelled out is a TAB), or None for JSON lines."""
    if sep is None:
        return {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower())
    sep = "\t" if sep == "\\t" else sep
    if len(sep) != 1:
        raise ValueError(f"separator {sep!r} is not one character; use e.g. ',', ';' or '\\t' (TAB)")
    return sep


def _records(path: Path, sep: str | None = None, columns: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a CSV/TSV file (whose header must hold ``columns``) or a JSON-lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"record file {path} not found")
    sep = _separator(path, sep)
    with open(path, newline="", encoding="utf-8-sig") as f:
        if sep is not None:
            reader = csv.DictReader(f, delimiter=sep)
            header = reader.fieldnames or []
            absent = [c for c in columns if c not in header]
            if absent:
                hint = f" (one column: is the separator {sep!r} right? --sep sets it)" if len(header) == 1 else ""
                raise ValueError(f"{path}: no column {', '.join(map(repr, absent))} in its header; its columns are "
                                 f"{header}{hint} (--image-column / --text-column name the ones to read)")
            for record in reader:
                yield reader.line_num, record
            return
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not a JSON object ({e}); a CSV/TSV file needs its "
                                     f".csv/.tsv suffix") from None


def _need(record: dict, path: Path, line_no: int, *keys: str) -> None:
    """Every key present and not null (a CSV row with fewer cells than the header gives None)."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: not a JSON object but {type(record).__name__}")
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise ValueError(f"{path}:{line_no}: record lacks {missing} (absent, null or an empty trailing CSV cell); "
                         f"it has {sorted(k for k in record if k is not None and record[k] is not None)}")


def _record_image(root: Path, name: str, path: Path, line_no: int) -> dict[str, bytes]:
    if not (root / name).is_file():
        raise FileNotFoundError(f"{path}:{line_no}: image {root / name} not found (record image paths are relative "
                                f"to --image-root, default the record file's folder)")
    return image_field(root / name)


def _karpathy(path: Path, splits: str | list[str] | None) -> dict | None:
    """Karpathy's split file at ``path``, or None; ``splits`` only apply to one."""
    data = read_karpathy(path)
    if data is None and splits is not None:
        raise ValueError(f"splits ({splits}) select images of Karpathy's split files (dataset_coco.json ...); "
                         f"{path} is not one")
    return data


def caption_pairs(path: str | Path, image_root: str | Path | None = None, *, sep: str | None = None,
                  image_column: str = "image", text_column: str = "caption",
                  splits: str | list[str] | None = None) -> Iterator[Sample]:
    """Image-caption pairs from a CSV/TSV (header row) or JSON-lines file, or one pair per
    sentence of Karpathy's split file (each image's bytes then repeat once per caption);
    ``splits``: the Karpathy splits to read (see the module docstring for the rest)."""
    path = Path(path)
    karpathy = _karpathy(path, splits)
    if karpathy is not None:
        images = karpathy_images(path, karpathy, image_root, splits)
        tqdm.write(f"{sum(len(i.captions) for i in images)} image-caption pairs: one per caption, each image's "
                   f"bytes stored once per caption", file=sys.stderr)
        for image in images:
            fields = image_field(image.path)
            for n, caption in enumerate(image.captions):
                yield safe_key(f"{image.image_id}_{n}"), {**fields, "txt": caption}
        return
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path, sep, (image_column, text_column)):
        _need(record, path, line_no, image_column, text_column)
        image = Path(record[image_column])
        yield (safe_key(f"{line_no:08d}_{image.stem}"),
               {**_record_image(root, record[image_column], path, line_no), "txt": str(record[text_column])})


def vqa_records(path: str | Path, image_root: str | Path | None = None) -> Iterator[Sample]:
    """VQA records (JSONL): ``image``, ``question``, ``answers`` (a list), optional
    ``question_id`` (default: the line number), ``question_type``, ``answer_type`` and ``image_id``
    (default: the image's file name without suffix). One sample per image, in the order the file
    first names each, holding all its questions (the image's bytes once)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    images: dict[str, tuple[int, dict]] = {}  # image path -> (first line naming it, its json)
    question_ids: set = set()
    for line_no, record in _records(path):
        _need(record, path, line_no, "image", "question", "answers")
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise ValueError(f"{path}:{line_no}: answers must be a non-empty list, got {record['answers']!r}")
        question_id = record.get("question_id", line_no)
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise ValueError(f"{path}:{line_no}: question_id must be an integer or a string, got {question_id!r}")
        if question_id in question_ids:
            raise ValueError(f"{path}:{line_no}: question_id {question_id!r} appears twice")
        question_ids.add(question_id)
        types = {k: record.get(k) or "" for k in ("question_type", "answer_type")}
        if not all(isinstance(v, str) for v in (record["question"], *types.values())):
            raise ValueError(f"{path}:{line_no}: question, question_type and answer_type must be strings")
        image_id = str(record.get("image_id", Path(record["image"]).stem))
        first, meta = images.setdefault(record["image"], (line_no, {"image_id": image_id, "questions": []}))
        if meta["image_id"] != image_id:
            raise ValueError(f"{path}:{line_no}: image {record['image']} has image_id {meta['image_id']!r} on line "
                             f"{first} and {image_id!r} here")
        meta["questions"].append({"question_id": question_id, "question": record["question"],
                                  "answers": [str(a) for a in record["answers"]], **types})
    for name, (line_no, meta) in images.items():
        yield (safe_key(str(Path(name).with_suffix(""))),
               {**_record_image(root, name, path, line_no), "json": meta})


def vqa_source(path: str | Path, image_root: str | Path | None = None, *, annotations: str | Path | None = None,
               image_pattern: str | None = None) -> Iterator[Sample]:
    """VQA samples from VQAv2's official questions ``.json`` (with its ``annotations`` file;
    :mod:`data_pipelines.vqav2`) or from JSON-lines records (:func:`vqa_records`), told apart by
    the file's structure."""
    questions = read_questions(path)
    if questions is not None:
        return ((key, {**image_field(image), "json": meta})
                for key, image, meta in vqav2_images(questions, annotations, image_root, image_pattern=image_pattern))
    if annotations is not None or image_pattern is not None:
        raise ValueError(f"--annotations and --image-pattern go with VQAv2's questions .json (an object with a "
                         f"'questions' list); {path} is read as JSON-lines VQA records")
    return vqa_records(path, image_root)


def retrieval_records(path: str | Path, image_root: str | Path | None = None, *,
                      splits: str | list[str] | None = None) -> Iterator[Sample]:
    """Retrieval records (JSONL): ``image``, ``captions`` (a list), optional ``image_id``; or one
    record per image of Karpathy's split file, of the Karpathy ``splits`` (default: all); or of
    COCO's caption files (:func:`~data_pipelines.karpathy.coco_caption_images`; the label-free ones
    write images with no captions, which captioning predicts with ``mmoe evaluate --predict``)."""
    path = Path(path)
    karpathy = _karpathy(path, splits)
    coco = read_coco_captions(path) if karpathy is None else None
    if karpathy is not None or coco is not None:
        images = karpathy_images(path, karpathy, image_root, splits) if coco is None else \
            coco_caption_images(path, coco, image_root)
        for image in images:
            yield safe_key(image.image_id), {**image_field(image.path),
                                             "json": {"image_id": image.image_id, "captions": image.captions}}
        return
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path):
        _need(record, path, line_no, "image", "captions")
        image_id = str(record.get("image_id", Path(record["image"]).stem))
        captions = record["captions"]
        if not isinstance(captions, list) or not captions:
            raise ValueError(f"{path}:{line_no}: captions must be a non-empty list, got {captions!r}")
        yield safe_key(image_id), {**_record_image(root, record["image"], path, line_no),
                                   "json": {"image_id": image_id, "captions": [str(c) for c in captions]}}


# stream kind -> (source, what its positional input is)
SOURCES = {
    "image": (image_folder, "a folder of images"),
    "image_text": (caption_pairs, "a CSV/TSV or JSONL file of image-caption pairs, or Karpathy's dataset_coco.json "
                                  "/ dataset_flickr30k.json (one pair per caption)"),
    "text": (text_documents, ".txt / .jsonl files (optionally .gz / .zst) and folders of them"),
    "vqa": (vqa_source, "VQAv2's v2_OpenEnded_mscoco_<split>_questions.json (with --annotations), or a JSONL "
                        "file of VQA records"),
    "retrieval": (retrieval_records, "a JSONL file of retrieval records, Karpathy's dataset_coco.json / "
                                     "dataset_flickr30k.json, or COCO's captions_<split>2014.json / "
                                     "image_info_test2014.json (label-free; NoCaps' image_info too)"),
    "classification": (classification_folder, "a folder with one subfolder of images per class (ImageNet's train/ "
                                              "or val/ layout; classes sorted by name, as torchvision's ImageFolder)"),
    "nlvr2": (nlvr2_source, "NLVR2's train.json / dev.json / test1.json (JSON lines; --image-root holds the pairs' "
                            "-img0.png / -img1.png, in train under their directory)"),
}
