"""The bundled image classification set, ``bundled/classification/{train,val}``, made from the
committed shards alone (no build dependency): every handwritten digit of ``image_text`` is its
digit's class (``digit 0`` ... ``digit 9``, from its caption ``a handwritten digit 7 (seven)``),
and every emoji of ``retrieval`` is its Unicode emoji group's class (``smileys & emotion`` ...,
from its last caption ``a <subgroup> emoji from the <group> group``), 19 classes in all. Train
comes from the train splits and val from the val splits, so the split of each image is the one
it has everywhere. A sample is the image's ``png`` (the bytes as committed) and ``json``
``{"label": class}``, without ``cls``: a tar member costs at least 1 kB, and the class list, the
sorted labels, gives the index. Samples are in the source shards' order, digits first, so two
builds write byte-identical shards.

    python -m data_pipelines.recipes.classification_data [OUT_DIR]   (default: the bundled folder;
                                                                      replaces what is there)
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.paths import BUNDLED
from data_pipelines.shards import ShardSink, shard_urls
from data_pipelines.skips import SkipCounter, decode_json, decode_text
from data_pipelines.tars import tar_samples

__all__ = ["CLASSES", "build", "labelled_images"]

DIGIT = re.compile(r"a handwritten digit (\d) \(\w+\)")
GROUP = re.compile(r"an? .+ emoji from the (.+) group")
GROUPS = ("activities", "animals & nature", "flags", "food & drink", "objects", "people & body", "smileys & emotion",
          "symbols", "travel & places")
CLASSES = tuple(sorted([*(f"digit {d}" for d in range(10)), *GROUPS]))


def _samples(kind: str, split: str, source: Path):
    yield from tar_samples(shard_urls(str(source / kind / split)), SkipCounter())


def labelled_images(split: str, source: Path = BUNDLED) -> list[tuple[str, bytes, str]]:
    """(key, png bytes, class) of every digit of ``image_text/<split>`` and emoji of
    ``retrieval/<split>`` under ``source``, in that order."""
    out = []
    for sample in _samples("image_text", split, source):
        if match := DIGIT.fullmatch(decode_text(sample["txt"])):
            out.append((sample["__key__"], sample["png"], f"digit {match.group(1)}"))
    for sample in _samples("retrieval", split, source):
        captions = decode_json(sample["json"], "captions")["captions"]
        match = GROUP.fullmatch(captions[-1])
        if match is None or match.group(1).lower() not in GROUPS:
            raise ValueError(f"retrieval/{split}:{sample['__key__']}: no emoji group in its last caption "
                             f"{captions[-1]!r}")
        out.append((sample["__key__"], sample["png"], match.group(1).lower()))
    return out


def build(out_dir: str | Path = BUNDLED, *, source: Path = BUNDLED, overwrite: bool = False) -> dict:
    """Write ``<out_dir>/classification/{train,val}`` from the shards under ``source``, and their
    counts into ``<out_dir>/build_info.json``; returns the samples per split and class."""
    counts = {}
    for split in ("train", "val"):
        images = labelled_images(split, source)
        dst = Path(out_dir) / "classification" / split
        with ShardSink(dst, "classification", prefix=f"classification-{split}", maxcount=500,
                       overwrite=overwrite) as sink:
            for key, png, label in images:
                sink.write(key, {"png": png, "json": {"label": label}})
        counts[split] = dict(sorted(Counter(label for _, _, label in images).items()))
    info_path = Path(out_dir) / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("counts", {})["classification"] = {split: sum(n.values()) for split, n in counts.items()}
    info_path.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return counts


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1] if len(sys.argv) > 1 else BUNDLED, overwrite=True), indent=1))
