"""VQAv2 in its official layout -> ``vqa`` shards, one sample per image with all its questions.

VQAv2 (Goyal et al., Making the V in VQA Matter, arXiv 1612.00837) as visualqa.org distributes it:

- questions, ``v2_OpenEnded_mscoco_<subtype>_questions.json``: ``{"data_subtype": "val2014", "questions":
  [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}, ...], ...}``;
- annotations (train2014 and val2014 only), ``v2_mscoco_<subtype>_annotations.json``: ``{"data_subtype",
  "annotations": [{"question_id", "image_id", "answers": [{"answer": "down", ...}, ... 10 of them],
  "question_type", "answer_type": "yes/no" | "number" | "other", "multiple_choice_answer"}, ...], ...}``;
- images, COCO's: ``<folder>/COCO_<folder>_<image_id:012d>.jpg`` under an image root, the folder being
  the subtype (``train2014``, ``val2014``), and ``test2015`` for both ``test2015`` and ``test-dev2015``
  (test-dev is a subset of test2015's images).

:func:`read_questions` recognises a questions file by its structure (a JSON object with a
``questions`` list); :func:`vqav2_images` gives each image's path with all its questions, in the
order the questions file first names each image, for :func:`data_pipelines.sources.vqa_source` to
write as one sample: the image and ``json`` ``{"image_id", "questions": [{"question_id", "question",
"answers", "question_type", "answer_type"}, ...]}`` (the layout of ``data_pipelines.shards``).
A split without annotations (test2015, test-dev2015) gets ``"answers": []`` and no types: its
shards are label-free, for ``mmoe evaluate --predict``. Kept of the annotations: the ten raw
``answer`` strings (what the official evaluation compares against), ``question_type`` and
``answer_type``; left out: ``answer_confidence``, ``answer_id`` and ``multiple_choice_answer`` (the
majority answer, which the answer vocabulary recomputes from the ten).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .shards import safe_key

__all__ = ["IMAGE_PATTERN", "QuestionsFile", "image_folder_of", "read_questions", "vqav2_images"]

IMAGE_PATTERN = "{folder}/COCO_{folder}_{image_id:012d}.jpg"  # relative to the image root
_IMAGE_FOLDERS = {"test-dev2015": "test2015"}  # subtypes whose images are another subtype's


@dataclasses.dataclass
class QuestionsFile:
    """A parsed official questions file: its path, ``data_subtype`` and ``questions`` list."""
    path: Path
    subtype: str
    questions: list


def image_folder_of(subtype: str) -> str:
    """The COCO image folder of a VQAv2 subtype: itself, or ``test2015`` for ``test-dev2015``."""
    return _IMAGE_FOLDERS.get(subtype, subtype)


def _load_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_questions(path: str | Path) -> QuestionsFile | None:
    """The official questions file at ``path``, or None if it is not one (e.g. JSONL records).

    Only a ``.json`` file is parsed; one holding a single JSON value that is not an object with a
    ``questions`` list is not a questions file either, except VQAv2's annotations file, which is an
    error (it goes with ``--annotations``)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    try:
        content = _load_json(path)
    except json.JSONDecodeError:  # e.g. JSON lines in a .json file
        return None
    if not isinstance(content, dict):
        return None
    if "questions" not in content:
        if "annotations" in content:
            raise ValueError(f"{path} is a VQAv2 annotations file; give the questions file "
                             f"(v2_OpenEnded_mscoco_<split>_questions.json) and this one with --annotations")
        return None
    questions, subtype = content["questions"], content.get("data_subtype")
    if not isinstance(questions, list) or not isinstance(subtype, str) or not subtype:
        raise ValueError(f"{path}: a VQAv2 questions file has a 'questions' list and a 'data_subtype' string "
                         f"(e.g. 'val2014'); got {type(questions).__name__} and {subtype!r}")
    return QuestionsFile(path, subtype, questions)


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _checked_questions(qfile: QuestionsFile) -> list[dict]:
    seen: set = set()
    for i, q in enumerate(qfile.questions):
        where = f"{qfile.path}: questions[{i}]"
        if not isinstance(q, dict) or not all(k in q for k in ("image_id", "question", "question_id")):
            raise ValueError(f"{where} must be an object with image_id, question and question_id, got {q!r:.120}")
        if not (_is_id(q["image_id"]) and _is_id(q["question_id"]) and isinstance(q["question"], str)):
            raise ValueError(f"{where}: image_id and question_id must be integers (or strings) and question a "
                             f"string, got {q!r:.120}")
        if q["question_id"] in seen:
            raise ValueError(f"{where}: question_id {q['question_id']} appears twice")
        seen.add(q["question_id"])
    return qfile.questions


def _annotations(path: Path, qfile: QuestionsFile) -> dict:
    """question_id -> annotation, checked against the questions."""
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} not found")
    content = _load_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise ValueError(f"{path} is not a VQAv2 annotations file (a JSON object with an 'annotations' list)")
    subtype = content.get("data_subtype")
    if subtype != qfile.subtype:
        raise ValueError(f"{path} annotates {subtype!r}, the questions of {qfile.path} are of {qfile.subtype!r}")
    by_id = {}
    for i, a in enumerate(content["annotations"]):
        answers = a.get("answers") if isinstance(a, dict) else None
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers)
                or not all(isinstance(a.get(k, ""), str) for k in ("question_type", "answer_type"))):
            raise ValueError(f"{path}: annotations[{i}] needs 'answers' (objects with an 'answer' string) and "
                             f"string 'question_type' and 'answer_type', got {a!r:.160}")
        by_id[a.get("question_id")] = a
    return by_id


def _question(q: dict, annotation: dict | None, where: str) -> dict:
    if annotation is None:
        return {"question_id": q["question_id"], "question": q["question"], "answers": []}
    if annotation.get("image_id") != q["image_id"]:
        raise ValueError(f"{where}: question {q['question_id']} is about image {q['image_id']}, its annotation "
                         f"about image {annotation.get('image_id')}")
    return {"question_id": q["question_id"], "question": q["question"],
            "answers": [x["answer"] for x in annotation["answers"]],
            "question_type": annotation.get("question_type", ""), "answer_type": annotation.get("answer_type", "")}


def _image_path(root: Path, pattern: str, fields: dict) -> Path | None:
    """``root / pattern`` for these fields, or the same file name directly in ``root`` (an image
    root that is the split's folder itself); None if neither is a file."""
    try:
        relative = Path(pattern.format(**fields))
    except ValueError as e:  # e.g. a string image_id in {image_id:012d}
        raise ValueError(f"image_id {fields['image_id']!r} does not fit the image pattern {pattern!r} ({e}); "
                         f"give one that fits with --image-pattern") from None
    return next((c for c in (root / relative, root / relative.name) if c.is_file()), None)


def _check_pattern(pattern: str) -> None:
    if "{image_id" not in pattern:
        raise ValueError(f"--image-pattern {pattern!r} must contain {{image_id}} (e.g. {IMAGE_PATTERN!r})")
    try:
        pattern.format(folder="val2014", subtype="val2014", image_id=1)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--image-pattern {pattern!r} cannot be filled ({e!r}); it may use {{image_id}}, "
                         f"{{folder}} (the COCO image folder) and {{subtype}} (the questions' data_subtype)") from None


def vqav2_images(qfile: QuestionsFile, annotations: str | Path | None = None,
                 image_root: str | Path | None = None, *, image_pattern: str | None = None
                 ) -> list[tuple[str, Path, dict]]:
    """``(key, image path, json)`` per image of ``qfile`` (see the module docstring), every file
    checked before any is read; the key is the image file's name without suffix
    (``COCO_val2014_000000262148``).

    Args:
        qfile: the questions (:func:`read_questions`).
        annotations: the annotations file of the same subtype; required unless the subtype is a
            test split (``test2015``, ``test-dev2015``), whose shards are then label-free.
        image_root: the folder holding ``train2014/``, ``val2014/``, ``test2015/`` (or the split's
            image folder itself); default: the questions file's folder.
        image_pattern: image path relative to ``image_root`` as a format string of ``image_id``,
            ``folder`` and ``subtype``; default :data:`IMAGE_PATTERN`.
    """
    pattern = image_pattern or IMAGE_PATTERN
    _check_pattern(pattern)
    questions = _checked_questions(qfile)
    if annotations is None and not qfile.subtype.startswith("test"):
        raise ValueError(f"{qfile.path} holds {qfile.subtype} questions, whose answers are in "
                         f"v2_mscoco_{qfile.subtype}_annotations.json: pass that with --annotations (only the "
                         f"test splits are written without answers)")
    by_id = None if annotations is None else _annotations(Path(annotations), qfile)
    if by_id is not None and (missing := [q["question_id"] for q in questions if q["question_id"] not in by_id]):
        raise ValueError(f"{annotations} has no annotation for {len(missing)} of the {len(questions)} questions of "
                         f"{qfile.path} (first: {missing[:3]})")
    images: dict = {}  # image_id -> its questions, in the order the file first names each image
    for i, q in enumerate(questions):
        where = f"{qfile.path}: questions[{i}]"
        images.setdefault(q["image_id"], []).append(_question(q, None if by_id is None else by_id[q["question_id"]],
                                                              where))
    root = Path(image_root) if image_root else qfile.path.parent
    folder = image_folder_of(qfile.subtype)
    fields = {image_id: {"image_id": image_id, "folder": folder, "subtype": qfile.subtype} for image_id in images}
    paths = {image_id: _image_path(root, pattern, f) for image_id, f in fields.items()}
    if missing := [image_id for image_id, path in paths.items() if path is None]:
        example = root / pattern.format(**fields[missing[0]])
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images of {qfile.path} are not under {root}, "
                                f"e.g. {example} (image_id {missing[0]}); the official layout under --image-root is "
                                f"{folder}/COCO_{folder}_<12-digit image id>.jpg, another one takes --image-pattern")
    return [(safe_key(paths[image_id].stem), paths[image_id], {"image_id": image_id, "questions": image_questions})
            for image_id, image_questions in images.items()]
