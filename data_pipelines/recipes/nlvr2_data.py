"""Build the bundled NLVR2-style set: pairs of the bundled images with true/false statements.

Not a paper method: a tiny stand-in for NLVR2 (Suhr et al., arXiv 1811.00491; two images and a
statement about them, true or false) that the ``nlvr2_debug`` preset fine-tunes on. It reads the
committed ``vqa/{train,val}`` shards, whose answers tell each image's facts (a digit's value, its
parity, whether it is greater than four; an emoji's group, whether it is a flag), pairs images of
one split with each other and states one of :data:`TEMPLATES` about each pair, half of each
template's statements true and half false. Train pairs come from ``vqa/train`` images and val
pairs from ``vqa/val`` images, so no val image is in any train split (the bundled set's rule).

Deterministic: the images in shard order, every draw from a string-seeded ``random.Random``, the
image bytes as the vqa shards hold them, tar mtimes 0 (:class:`~data_pipelines.shards.ShardSink`).

    python -m data_pipelines.recipes.nlvr2_data --overwrite    # about 5 s; --out DIR to write elsewhere
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.paths import BUNDLED
from data_pipelines.processors import read_vqa_questions
from data_pipelines.shards import ShardSink, shard_urls
from data_pipelines.skips import SkipCounter
from data_pipelines.tars import tar_samples

__all__ = ["PAIRS", "TEMPLATES", "Facts", "build", "image_facts", "statements"]

SPLITS = ("train", "val")
PAIRS = {"train": 32, "val": 18}  # statements per template and split: 256 train, 144 val
SHARD_MAXCOUNT = 128  # two train shards, so DataLoader workers can share them
MAX_DRAWS = 200_000


@dataclass
class Facts:
    """What an image's VQA answer says about it (None: not known)."""

    image_id: str
    png: bytes
    digit: int | None = None
    even: bool | None = None
    big: bool | None = None  # greater than four
    flag: bool | None = None
    group: str | None = None

    @property
    def is_digit(self) -> bool:
        return self.image_id.startswith("digits-")


@dataclass(frozen=True)
class Template:
    """A statement about a pair: which images it can be said of, and whether it is true of (left, right)."""

    sentence: str
    applies: Callable[[Facts], bool]
    truth: Callable[[Facts, Facts], bool]


TEMPLATES = {
    "both_digits": Template("Both images show a digit.", lambda f: True, lambda a, b: a.is_digit and b.is_digit),
    "one_emoji": Template("Exactly one image shows an emoji.", lambda f: True, lambda a, b: a.is_digit != b.is_digit),
    "both_flags": Template("Both images show a flag.", lambda f: not f.is_digit and f.flag is not None,
                           lambda a, b: a.flag and b.flag),
    "same_group": Template("Both images show emoji from the same group.",
                           lambda f: not f.is_digit and f.group is not None, lambda a, b: a.group == b.group),
    "one_even": Template("Exactly one image shows an even digit.", lambda f: f.even is not None,
                         lambda a, b: a.even != b.even),
    "both_big": Template("Both digits are greater than four.", lambda f: f.big is not None,
                         lambda a, b: a.big and b.big),
    "left_larger": Template("The left digit is larger than the right one.", lambda f: f.digit is not None,
                            lambda a, b: a.digit > b.digit),
    "same_digit": Template("Both images show the same digit.", lambda f: f.digit is not None,
                           lambda a, b: a.digit == b.digit),
}


def _learn(facts: Facts, question_type: str, answer: str) -> None:
    """Add what one VQA question's primary answer says (see DATA.md's VQA tables)."""
    yes = answer == "yes"
    if question_type == "what_digit":
        facts.digit = int(answer)
        facts.even, facts.big = facts.digit % 2 == 0, facts.digit > 4
    elif question_type == "digit_even":
        facts.even = yes
    elif question_type == "digit_greater_than_four":
        facts.big = yes
    elif question_type == "is_flag":
        facts.flag = yes
    elif question_type == "which_group":
        facts.group, facts.flag = answer, answer == "flags"
    elif question_type == "skin_tone":  # only the hand emoji have tones
        facts.group, facts.flag = "people & body", False
    elif question_type == "what_is_this" and answer.startswith("flag of "):
        facts.group, facts.flag = "flags", True


def image_facts(vqa_dir: str | Path) -> list[Facts]:
    """Each image of a ``vqa`` shard directory with the facts its questions' majority answers give, by image id."""
    found: dict[str, Facts] = {}
    for sample in tar_samples(shard_urls(str(vqa_dir)), SkipCounter()):
        for question in read_vqa_questions(sample):
            image_id = json.loads(sample["json"])["image_id"]
            facts = found.setdefault(image_id, Facts(image_id, sample["png"]))
            if facts.is_digit:
                facts.flag = False
            primary = max(set(question["answers"]), key=lambda a: (question["answers"].count(a), a))
            _learn(facts, question["question_type"], primary)
    return [found[k] for k in sorted(found)]


def _pairs(images: list[Facts], template: Template, n: int, rng: random.Random) -> list[tuple[Facts, Facts, bool]]:
    """``n`` distinct ordered pairs the template applies to, half of them true (the odd one false)."""
    pool = [f for f in images if template.applies(f)]
    want = {True: n // 2, False: n - n // 2}
    drawn, seen = [], set()
    for _ in range(MAX_DRAWS):
        if not any(want.values()):
            return drawn
        left, right = rng.sample(pool, 2)
        label = bool(template.truth(left, right))
        if want[label] and (left.image_id, right.image_id) not in seen:
            want[label] -= 1
            seen.add((left.image_id, right.image_id))
            drawn.append((left, right, label))
    raise RuntimeError(f"{template.sentence!r}: {want[True]} true and {want[False]} false pairs still missing after "
                       f"{MAX_DRAWS} draws from {len(pool)} images; lower PAIRS")


def statements(images: list[Facts], split: str) -> list[tuple[str, dict]]:
    """The split's samples (key, fields) for :class:`ShardSink`, templates interleaved."""
    drawn = [(name, *pair) for name, template in TEMPLATES.items()
             for pair in _pairs(images, template, PAIRS[split], random.Random(f"nlvr2-{split}-{name}"))]
    random.Random(f"nlvr2-{split}-order").shuffle(drawn)
    samples = []
    for n, (name, left, right, label) in enumerate(drawn):
        identifier = f"{split}-{n}-0-0"  # NLVR2's shape: <split>-<set>-<pair>-<sentence>
        samples.append((f"{split}-{n:04d}", {
            "left.png": left.png, "right.png": right.png,
            "json": {"identifier": identifier, "sentence": TEMPLATES[name].sentence, "label": label,
                     "template": name, "left_image_id": left.image_id, "right_image_id": right.image_id}}))
    return samples


def build(out_dir: str | Path = BUNDLED, *, source: str | Path = BUNDLED, overwrite: bool = False) -> dict:
    """Write ``nlvr2/{train,val}`` into ``out_dir`` from ``source``'s ``vqa/{train,val}``, and
    their counts into ``out_dir/build_info.json``; returns ``{split: samples}``."""
    out_dir, source = Path(out_dir), Path(source)
    counts = {}
    for split in SPLITS:
        samples = statements(image_facts(source / "vqa" / split), split)
        with ShardSink(out_dir / "nlvr2" / split, "nlvr2", prefix=f"nlvr2-{split}", maxcount=SHARD_MAXCOUNT,
                       overwrite=overwrite) as sink:
            for key, fields in samples:
                sink.write(key, fields)
        counts[split] = len(samples)
    info_path = out_dir / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("counts", {})["nlvr2"] = counts
    info["nlvr2"] = {"statements_per_template": PAIRS, "templates": {k: t.sentence for k, t in TEMPLATES.items()}}
    info_path.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the bundled NLVR2-style set from the bundled VQA shards.")
    parser.add_argument("--out", type=Path, default=BUNDLED, help=f"output directory (default {BUNDLED})")
    parser.add_argument("--source", type=Path, default=BUNDLED, help="directory holding vqa/{train,val}")
    parser.add_argument("--overwrite", action="store_true", help="replace nlvr2/ if it exists")
    args = parser.parse_args(argv)
    try:
        counts = build(args.out, source=args.source, overwrite=args.overwrite)
    except (OSError, RuntimeError) as err:
        parser.exit(2, f"nlvr2_data: error: {err}\n")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
