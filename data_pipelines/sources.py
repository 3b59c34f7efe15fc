"""Samples for :class:`~data_pipelines.shards.ShardSink` from ordinary files: a folder of images,
a CSV/JSONL of image-caption pairs, text files, VQA and retrieval records (JSONL).

Each source yields ``(key, fields)`` in a deterministic order (folders sorted, records in file
order). Image bytes are kept as they are for JPEG and PNG and re-encoded as PNG otherwise.
Record files name images relative to ``image_root`` (default: the record file's folder).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .shards import safe_key

__all__ = ["SOURCES", "caption_pairs", "image_folder", "retrieval_records", "text_documents", "vqa_records"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Sample = tuple[str, dict]


def image_field(path: Path) -> dict[str, bytes]:
    """``{"jpg": bytes}`` / ``{"png": bytes}`` for an image file (other formats become PNG)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return {"jpg": path.read_bytes()}
    if suffix == ".png":
        return {"png": path.read_bytes()}
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


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a .jsonl or .csv file."""
    if not path.is_file():
        raise FileNotFoundError(f"record file {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            yield from enumerate(csv.DictReader(f), start=2)
            return
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not a JSON object ({e})") from None


def _need(record: dict, path: Path, line_no: int, *keys: str) -> None:
    """Every key present and not null (a CSV row with fewer cells than the header gives None)."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: not a JSON object but {type(record).__name__}")
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise ValueError(f"{path}:{line_no}: record lacks {missing} (absent, null or an empty trailing CSV cell); "
                         f"it has {sorted(k for k in record if k is not None and record[k] is not None)}")


def caption_pairs(path: str | Path, image_root: str | Path | None = None, *, image_column: str = "image",
                  text_column: str = "caption") -> Iterator[Sample]:
    """Image-caption pairs from a CSV (header row) or JSONL file."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path):
        _need(record, path, line_no, image_column, text_column)
        image = Path(record[image_column])
        yield (safe_key(f"{line_no:08d}_{image.stem}"),
               {**image_field(root / image), "txt": str(record[text_column])})


def text_documents(paths: list[str | Path], *, per_line: bool = True, lang: str | None = None) -> Iterator[Sample]:
    """Documents from text files: one per non-empty line, or one per file; with ``lang``, each
    carries ``{"lang": lang}`` as its ``json`` (LM evaluation reports perplexity per language)."""
    meta = {"json": {"lang": lang}} if lang else {}
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        if not per_line:
            yield safe_key(path.stem), {"txt": text, **meta}
            continue
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield safe_key(f"{path.stem}_{line_no:08d}"), {"txt": line, **meta}


def vqa_records(path: str | Path, image_root: str | Path | None = None) -> Iterator[Sample]:
    """VQA records (JSONL): ``image``, ``question``, ``answers`` (a list), optional
    ``question_id`` (default: the line number), ``question_type`` and ``image_id``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path):
        _need(record, path, line_no, "image", "question", "answers")
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise ValueError(f"{path}:{line_no}: answers must be a non-empty list, got {record['answers']!r}")
        question_id, question_type = record.get("question_id", line_no), record.get("question_type") or ""
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise ValueError(f"{path}:{line_no}: question_id must be an integer or a string, got {question_id!r}")
        if not isinstance(question_type, str) or not isinstance(record["question"], str):
            raise ValueError(f"{path}:{line_no}: question and question_type must be strings")
        meta = {"question_id": question_id, "question": record["question"],
                "answers": [str(a) for a in record["answers"]], "question_type": question_type,
                "image_id": str(record.get("image_id", Path(record["image"]).stem))}
        yield safe_key(f"q{meta['question_id']}"), {**image_field(root / record["image"]), "json": meta}


def retrieval_records(path: str | Path, image_root: str | Path | None = None) -> Iterator[Sample]:
    """Retrieval records (JSONL): ``image``, ``captions`` (a list), optional ``image_id``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    for line_no, record in _records(path):
        _need(record, path, line_no, "image", "captions")
        image_id = str(record.get("image_id", Path(record["image"]).stem))
        captions = record["captions"]
        if not isinstance(captions, list) or not captions:
            raise ValueError(f"{path}:{line_no}: captions must be a non-empty list, got {captions!r}")
        yield safe_key(image_id), {**image_field(root / record["image"]),
                                   "json": {"image_id": image_id, "captions": [str(c) for c in captions]}}


# stream kind -> (source, what its positional input is)
SOURCES = {
    "image": (image_folder, "a folder of images"),
    "image_text": (caption_pairs, "a CSV or JSONL file of image-caption pairs"),
    "text": (text_documents, "text files"),
    "vqa": (vqa_records, "a JSONL file of VQA records"),
    "retrieval": (retrieval_records, "a JSONL file of retrieval records"),
}
