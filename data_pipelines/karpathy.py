"""Karpathy's split files for COCO and Flickr30k: ``dataset_coco.json``, ``dataset_flickr30k.json``
(and ``dataset_flickr8k.json``), the splits that image-text retrieval and captioning results are
reported on (Karpathy & Fei-Fei, Deep Visual-Semantic Alignments for Generating Image
Descriptions, arXiv 1412.2306; BEiT-3 fine-tunes and evaluates retrieval on them).

A file is ``{"images": [entry, ...], "dataset": "coco" | "flickr30k" | ...}``; an entry::

    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test",
     "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...], "cocoid": 391895}

Flickr entries have no ``filepath`` and no ``cocoid`` (``"filename": "1000092795.jpg"``). The
image is ``<image_root>/<filepath>/<filename>``; its id is the ``cocoid`` where there is one, else
the file name's stem; its captions are the sentences' ``raw`` text, stripped of surrounding
whitespace. COCO's splits are train, restval, val and test (BEiT-3 trains on train + restval).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

__all__ = ["KarpathyImage", "coco_caption_images", "is_karpathy_json", "karpathy_images", "read_coco_captions",
           "read_karpathy"]


@dataclasses.dataclass(frozen=True)
class KarpathyImage:
    path: Path
    image_id: str
    split: str
    captions: list[str]


def read_karpathy(path: str | Path) -> dict | None:
    """The parsed file if ``path`` is a ``.json`` file shaped like Karpathy's (an object whose
    ``images`` entries hold ``sentences``), else None (e.g. for JSON lines)."""
    data = _json_object(path)
    return data if is_karpathy_json(data) else None


def read_coco_captions(path: str | Path) -> dict | None:
    """The parsed file if ``path`` is a ``.json`` file shaped like COCO's caption files (an object
    whose ``images`` entries hold ``id`` and ``file_name``), else None."""
    data = _json_object(path)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and {"id", "file_name"} <= set(images[0]):
        return data
    return None


def _json_object(path: str | Path):
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError:  # JSON lines, or not JSON at all: not this format
        return None
    return data


def is_karpathy_json(data) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _entry(path: Path, index: int, entry, root: Path) -> KarpathyImage:
    where = f"{path}: images[{index}]"
    if not isinstance(entry, dict) or not all(k in entry for k in ("filename", "split", "sentences")):
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where} needs filename, split and sentences; it has {keys}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences or \
            not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
        raise ValueError(f"{where} ({entry['filename']}): sentences must be a non-empty list of objects with a "
                         f"string 'raw', got {str(sentences)[:120]}")
    image_id = entry.get("cocoid", Path(entry["filename"]).stem)
    return KarpathyImage(path=root / entry.get("filepath", "") / entry["filename"], image_id=str(image_id),
                         split=str(entry["split"]), captions=[s["raw"].strip() for s in sentences])


def karpathy_images(path: str | Path, data: dict, image_root: str | Path | None = None,
                    splits: str | list[str] | None = None) -> list[KarpathyImage]:
    """The images of ``splits`` (a list or comma-separated; default: every split) in file order.

    Prints the images and captions per split, and checks every image exists before any is read:
    a missing one is an error naming it, so a long write never stops near its end.

    Args:
        path: the file ``data`` came from (for messages, and the default ``image_root``).
        data: the parsed file (:func:`read_karpathy`).
        image_root: the folder image paths are relative to: COCO's holds ``train2014/`` and
            ``val2014/``, Flickr's the images (default: the file's folder).
        splits: e.g. ``"train,restval"``.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    images = [_entry(path, i, entry, root) for i, entry in enumerate(data["images"])]
    counts = Counter(image.split for image in images)
    wanted = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else splits or sorted(counts)
    unknown = [s for s in wanted if s not in counts]
    if unknown:
        raise ValueError(f"{path} has no split {', '.join(map(repr, unknown))}; its splits are "
                         f"{', '.join(f'{s} ({n} images)' for s, n in sorted(counts.items()))}")
    images = [image for image in images if image.split in wanted]
    missing = [image.path for image in images if not image.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images are not under {root}, e.g. "
                                f"{missing[0]}; --image-root names the folder holding each entry's "
                                f"filepath/filename")
    chosen, captions = Counter(image.split for image in images), Counter()
    for image in images:
        captions[image.split] += len(image.captions)
    per_split = ", ".join(f"{s} {chosen[s]} images / {captions[s]} captions" for s in wanted)
    tqdm.write(f"{path.name} ({data.get('dataset', 'Karpathy split file')}): {per_split}", file=sys.stderr)
    return images


def coco_caption_images(path: str | Path, data: dict, image_root: str | Path | None = None) -> list[KarpathyImage]:
    """The images of COCO's caption files, in file order: ``captions_train2014.json`` /
    ``captions_val2014.json`` (``images`` and ``annotations``: ``{"image_id", "caption"}``), or the
    label-free ``image_info_test2014.json`` and NoCaps' ``nocaps_<split>_image_info.json``
    (``images`` alone: every image without captions, to be captioned for an evaluation server).

    The image is ``<image_root>/<file_name>`` (default root: the file's folder; for COCO the
    split's folder, e.g. ``val2014/``), its id COCO's integer ``id``. Every image is checked to
    exist before any is read, as :func:`karpathy_images` does."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    captions: dict = {}
    for n, note in enumerate(data.get("annotations") or []):
        if not isinstance(note, dict) or "image_id" not in note or not isinstance(note.get("caption"), str):
            raise ValueError(f"{path}: annotations[{n}] needs image_id and a string caption, got {str(note)[:120]}")
        captions.setdefault(note["image_id"], []).append(note["caption"].strip())
    images, seen = [], set()
    for n, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{path}: images[{n}] needs id and file_name, got {str(entry)[:120]}")
        if entry["id"] in seen:
            raise ValueError(f"{path}: images[{n}] repeats image id {entry['id']!r}")
        seen.add(entry["id"])
        images.append(KarpathyImage(path=root / entry["file_name"], image_id=str(entry["id"]), split="",
                                    captions=captions.pop(entry["id"], [])))
    if captions:
        raise ValueError(f"{path}: {len(captions)} annotated image ids are not among its images, e.g. "
                         f"{next(iter(captions))!r}")
    missing = [image.path for image in images if not image.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images are not under {root}, e.g. "
                                f"{missing[0]}; --image-root names the folder holding the file_name of each image")
    labelled = sum(bool(image.captions) for image in images)
    tqdm.write(f"{path.name} (COCO caption file): {len(images)} images, "
               + (f"{sum(len(i.captions) for i in images)} captions" if labelled else "no captions (label-free)"),
               file=sys.stderr)
    return images
