"""Build the bundled demo dataset: real, redistributable images and text, byte-reproducible.

Not a paper method: the tiny real dataset that pretraining and the demo read by default
(``data_pipelines/bundled/``; its ``DATA.md`` lists sources, licenses and counts). Sources, all
offline and all under licenses that allow redistribution:

- Noto Color Emoji glyphs (Debian ``fonts-noto-color-emoji``, SIL OFL 1.1), named by Unicode's
  ``emoji-test.txt`` and ``UnicodeData.txt`` (``unicode-data``) and described by CLDR English
  keywords (``unicode-cldr-core``; both under the Unicode license): image-text, VQA, retrieval;
- scikit-learn's handwritten digits (UCI, CC BY 4.0): image-text and VQA;
- scikit-image's public-domain / CC0 sample photographs: image-only pretraining;
- CPython's ``pydoc_data.topics`` (PSF) and scikit-learn's dataset descriptions (BSD-3): text;
- CLDR emoji names and keywords in the 15 languages of XNLI: multilingual text, for the
  multilingual language modeling of MH-MoE (arXiv 2404.15045), which follows XLM on Wikipedia.

Every image gets one split from a hash of its id, shared by all kinds, so no val image of any
kind is in any train split; identical image bytes are kept once. Same package versions, same
bytes: fixed order, hash-based choices, no clocks.

    python -m data_pipelines.recipes.build_demo --out data_pipelines/bundled --overwrite

Build-time only: ``pip install scikit-learn scikit-image`` and
``apt-get install -y fonts-noto-color-emoji unicode-data unicode-cldr-core``; ``--multilingual-only``
rebuilds the multilingual set and its tokenizer alone and needs only ``unicode-cldr-core``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, features
from tqdm import tqdm

from data_pipelines.paths import BUNDLED
from data_pipelines.recipes import classification_data, nlvr2_data
from data_pipelines.shards import KINDS, ShardSink, safe_key
from data_pipelines.tars import shard_texts
from data_pipelines.tokenizer import train_tokenizer
from multimodal_moe.tasks.visual_codebook import codebook_from_shards

SPLITS = ("train", "val")
VAL_FRACTION = 0.12
# Every kind stores its own copy of an image and a tar member costs a 512-byte header, so each
# kind keeps a hash-chosen fraction of each source's images to stay near 11 MB; the val splits
# of vqa and retrieval, the evaluation sets, keep every val image.
KEEP = {("image_text", "emoji"): 0.5, ("image_text", "digits"): 0.25, ("retrieval", "emoji"): 0.3,
        ("vqa", "emoji"): 0.25, ("vqa", "digits"): 0.25}
EVAL_KINDS = ("vqa", "retrieval")
# kinds made from the shards of the others (the facts of the VQA images), after them
FROM_SHARDS = {"nlvr2": nlvr2_data.build, "classification": classification_data.build}
SHARD_MAXCOUNT = 500  # several shards per train split, so DataLoader workers can share them
EMOJI_SIZE, EMOJI_COLORS = 48, 64  # 64-colour palette PNG: visually lossless, half the bytes
DIGIT_SIZE = 32
PHOTO_CROPS, PHOTO_CROP_SIZE, PHOTO_FULL_SIZE, PHOTO_VAL = 11, 64, 96, 2
TEXT_CHUNK_CHARS = 2000
# Learned from the train splits only, sized for the debug presets (configs/*/debug.yaml):
TOKENIZER, TOKENIZER_VOCAB = "tokenizer.model", 4096
CODEBOOK, CODEBOOK_CODES, CODEBOOK_IMAGE, CODEBOOK_PATCH, CODEBOOK_PATCHES = (
    "visual_codebook.safetensors", 1024, 32, 8, 100_000)
# MH-MoE reports multilingual results on XNLI's 15 languages; CLDR annotates emoji in each.
LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
# A hash-chosen share of the emoji, in documents of this many, keeps the set near 1.4 MB (a document
# in a tar costs two 512-byte headers); its own tokenizer, from its train split, covers the 15
# scripts and spells characters it has no piece for in bytes.
MULTILINGUAL, MULTILINGUAL_KEEP, MULTILINGUAL_EMOJI_PER_DOCUMENT = "multilingual", 0.6, 80
MULTILINGUAL_TOKENIZER, MULTILINGUAL_VOCAB = "tokenizer_multilingual.model", 6000
CLDR = "/usr/share/unicode/cldr/common"
TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# skimage.data loaders whose docstring releases the image into the public domain or under CC0;
# coins, immunohistochemistry ("no known copyright restrictions") and images with no stated
# license (moon, page, logo, colorwheel, motorcycle, lfw_subset) are left out.
PHOTOS = {
    "astronaut": "public domain (NASA)", "brick": "CC0 (CC0Textures)", "camera": "CC0 (Lav Varshney)",
    "cell": "CC0 (Paul Müller et al.)", "chelsea": "CC0 (Stefan van der Walt)",
    "clock": "public domain (Stefan van der Walt)", "coffee": "CC0 (Rachel Michetti)",
    "grass": "CC0 (linolafett, DeviantArt)", "gravel": "CC0 (CC0Textures)", "horse": "CC0 (Andreas Preuss)",
    "hubble_deep_field": "public domain (NASA)", "microaneurysms": "CC0 (Andreas Maier)",
    "retina": "CC0 (Mikael Häggström)", "rocket": "public domain (SpaceX)", "text": "public domain",
}
DEBIAN = {  # package: {file name: known path}
    "fonts-noto-color-emoji": {"NotoColorEmoji.ttf": "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"},
    "unicode-data": {"emoji/emoji-test.txt": "/usr/share/unicode/emoji/emoji-test.txt",
                     "UnicodeData.txt": "/usr/share/unicode/UnicodeData.txt"},
    "unicode-cldr-core": {**{f"annotations/{lang}.xml": f"{CLDR}/annotations/{lang}.xml" for lang in LANGUAGES},
                          "annotationsDerived/en.xml": f"{CLDR}/annotationsDerived/en.xml"},
}


@dataclass
class Question:
    question_id: int
    question_type: str
    question: str
    answers: list[str]
    weight: float = 1.0  # relative chance of being the question asked of its image


@dataclass
class Picture:
    """One image and everything said about it; ``captions`` empty = not a retrieval image."""

    image_id: str
    source: str
    png: bytes
    caption: str
    captions: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


def unit(*parts: str) -> float:
    """A stable number in [0, 1) from strings (sha256: unlike ``hash()``, the same in every run)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(image_id: str) -> str:
    return "val" if unit("split", image_id) < VAL_FRACTION else "train"


def ten_answers(primary: str, alternates: list[str], n_primary: int) -> list[str]:
    """Ten annotators: ``n_primary`` give ``primary``, the rest cycle through ``alternates``."""
    alternates = [a for a in dict.fromkeys(alternates) if a != primary] or [primary]
    return [primary] * n_primary + [alternates[i % len(alternates)] for i in range(10 - n_primary)]


def debian_file(package: str, name: str) -> Path:
    known = Path(DEBIAN[package][name])
    if known.exists():
        return known
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    for line in listing.splitlines():
        if line.endswith("/" + name):
            return Path(line)
    raise FileNotFoundError(f"{name} not found at {known} nor in `dpkg -L {package}`; "
                            f"install it with `apt-get install -y {package}`")


def import_build_dependency(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"sklearn": "scikit-learn", "skimage": "scikit-image"}.get(module.split(".")[0], module)
        raise ImportError(f"building the bundled data needs {package} ({err}); "
                          f"install the build-time packages with `pip install scikit-learn scikit-image`") from err


def check_build_dependencies() -> None:
    """Fail before any work when a build-time package is missing, naming what to install."""
    for package, files in DEBIAN.items():
        for name in files:
            debian_file(package, name)
    for module in ("sklearn.datasets", "skimage.data"):
        import_build_dependency(module)
    if not features.check("raqm"):
        raise RuntimeError("Pillow has no raqm text layout here, so flags and ZWJ emoji would render as several "
                           "glyphs; install its runtime libraries: `apt-get install -y libraqm0 libfribidi0`")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


# --- emoji ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Emoji:
    index: int
    codepoints: tuple[str, ...]
    name: str
    group: str
    subgroup: str

    @property
    def chars(self) -> str:
        return "".join(chr(int(cp, 16)) for cp in self.codepoints)

    @property
    def tone(self) -> str | None:
        return next((TONES[cp] for cp in self.codepoints if cp in TONES), None)


def read_emoji_test(path: Path) -> list[Emoji]:
    """Fully-qualified emoji without skin tones, plus the one-tone variants of the hand emoji
    (for the skin-tone questions; the other 1,500 tone variants would repeat their base)."""
    emoji, group, subgroup = [], "", ""
    line_re = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := line_re.match(line):
            codepoints = tuple(match.group(1).split())
            n_tones = sum(cp in TONES for cp in codepoints)
            if n_tones == 0 or (n_tones == 1 and subgroup.startswith("hand")):
                emoji.append(Emoji(index, codepoints, match.group(2).strip(), group, subgroup))
    return emoji


def read_cldr_keywords(paths: list[Path]) -> dict[str, list[str]]:
    """CLDR keyword lists by emoji (without U+FE0F, as CLDR writes them); earlier files win."""
    keywords: dict[str, list[str]] = {}
    for path in paths:
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") != "tts" and node.text:
                keywords.setdefault(node.get("cp"), [k.strip() for k in node.text.split("|") if k.strip()])
    return keywords


def read_cldr_names(path: Path) -> dict[str, str]:
    """CLDR short names (the ``tts`` annotations) by emoji, in the file's order."""
    return {node.get("cp"): node.text.strip() for node in ET.parse(path).getroot().iter("annotation")
            if node.get("type") == "tts" and node.text}


def read_unicode_names(path: Path) -> dict[str, str]:
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        code, name = line.split(";", 2)[:2]
        if not name.startswith("<"):
            names[code] = name.lower()
    return names


def render_emoji(font: ImageFont.FreeTypeFont, chars: str) -> bytes:
    """The glyph on white, cropped to its ink, padded square, resized, palette PNG."""
    if font.getlength(chars) > 136:  # Noto glyphs are 136 px wide: more means several glyphs
        raise RuntimeError(f"{chars!r} lays out as several glyphs; is Pillow's raqm layout working?")
    canvas = Image.new("RGB", (136, 128), "white")
    ImageDraw.Draw(canvas).text((0, 0), chars, font=font, embedded_color=True)
    box = ImageOps.invert(canvas.convert("L")).getbbox()
    if box is None:
        raise RuntimeError(f"{chars!r} rendered as an empty glyph")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    small = square.resize((EMOJI_SIZE, EMOJI_SIZE), Image.Resampling.LANCZOS)
    return encode_png(small.quantize(EMOJI_COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))


def emoji_captions(emoji: Emoji, keywords: list[str], formal_name: str | None) -> list[str]:
    captions = [emoji.name]
    if emoji.group == "Flags" and ": " in emoji.name:
        captions.append(f"the flag of {emoji.name.split(': ', 1)[1]}")
    extra = [k for k in keywords if k.lower() not in (emoji.name.lower(), "flag")]
    if extra:
        captions.append(", ".join(extra))
    if formal_name and formal_name != emoji.name.lower():
        captions.append(formal_name)
    subgroup = emoji.subgroup.replace("-", " ")
    captions.append(f"{'an' if subgroup[0] in 'aeiou' else 'a'} {subgroup} emoji from the {emoji.group} group")
    return captions


EMOJI_QUESTION_TYPES = ("what_is_this", "which_group", "is_flag", "skin_tone")


def emoji_questions(emoji: Emoji, keywords: list[str], tone_keywords: dict[str, list[str]]) -> list[Question]:
    def question(kind: str, text: str, answers: list[str], weight: float = 1.0) -> Question:
        return Question(1_000_000 + 10 * emoji.index + EMOJI_QUESTION_TYPES.index(kind), kind, text, answers, weight)

    if emoji.tone:
        types = [k for k in tone_keywords[emoji.tone] if k.startswith("type ")]
        return [question("skin_tone", "what skin tone is shown?",
                         ten_answers(emoji.tone, [f"{emoji.tone} skin tone", *types], 5))]
    name, group = emoji.name.lower(), emoji.group.lower()
    is_flag = emoji.group == "Flags"
    if is_flag and ": " in name:
        place = name.split(": ", 1)[1]
        primary, alternates = f"flag of {place}", [place, "flag"]
    else:
        primary, alternates = name, [k.lower() for k in keywords]
    group_alternates = [group.replace(" & ", " and ")] if "&" in group else []
    return [
        question("what_is_this", "what is this?", ten_answers(primary, alternates, 6)),
        question("which_group", "which group is this emoji from?",
                 ten_answers(group, [*group_alternates, emoji.subgroup.replace("-", " ")], 8)),
        # one emoji in eight is a flag: asking the others less often evens out the yes and no
        question("is_flag", "is this a flag?", ["yes" if is_flag else "no"] * 10, 1.0 if is_flag else 0.25),
    ]


def emoji_pictures(progress: bool) -> list[Picture]:
    font = ImageFont.truetype(str(debian_file("fonts-noto-color-emoji", "NotoColorEmoji.ttf")), 109)
    emoji = read_emoji_test(debian_file("unicode-data", "emoji/emoji-test.txt"))
    keywords = read_cldr_keywords([debian_file("unicode-cldr-core", "annotations/en.xml"),
                                   debian_file("unicode-cldr-core", "annotationsDerived/en.xml")])
    unicode_names = read_unicode_names(debian_file("unicode-data", "UnicodeData.txt"))
    tone_keywords = {tone: keywords.get(chr(int(cp, 16)), []) for cp, tone in TONES.items()}
    pictures = []
    for e in tqdm(emoji, desc="emoji", disable=not progress):
        words = keywords.get(e.chars.replace("\ufe0f", ""), [])
        bare = [cp for cp in e.codepoints if cp != "FE0F"]
        formal = unicode_names.get(bare[0]) if len(bare) == 1 else None
        pictures.append(Picture(f"emoji-{'-'.join(e.codepoints).lower()}", "emoji", render_emoji(font, e.chars),
                                e.name, emoji_captions(e, words, formal), emoji_questions(e, words, tone_keywords)))
    return pictures


# --- digits -----------------------------------------------------------------------------------

def digit_pictures(progress: bool) -> list[Picture]:
    """1,797 8x8 digits (ink 0..16) as black-on-white 32x32 PNG, blocks kept sharp (nearest)."""
    digits = import_build_dependency("sklearn.datasets").load_digits()
    pictures = []
    for index, (pixels, label) in enumerate(tqdm(list(zip(digits.images, digits.target)), desc="digits",
                                                 disable=not progress)):
        grey = Image.fromarray((255 - np.rint(pixels * 255 / 16)).astype(np.uint8), "L")
        png = encode_png(grey.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.NEAREST).convert("RGB"))
        label, word = int(label), NUMBER_WORDS[int(label)]
        qid = 2_000_000 + 10 * index
        questions = [
            Question(qid, "what_digit", "what digit is this?", ten_answers(str(label), [word], 6)),
            Question(qid + 1, "digit_even", "is this digit even?", ["yes" if label % 2 == 0 else "no"] * 10),
            Question(qid + 2, "digit_greater_than_four", "is it greater than four?",
                     ["yes" if label > 4 else "no"] * 10),
        ]
        pictures.append(Picture(f"digits-{index:04d}", "digits", png, f"a handwritten digit {label} ({word})",
                                questions=questions))
    return pictures


# --- photos -----------------------------------------------------------------------------------

def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90, optimize=True)
    return buffer.getvalue()


def photo_samples(progress: bool) -> dict[str, list[tuple[str, dict]]]:
    """Per photo: the whole view (longer side 96) and 11 random square crops (64 px); all views of
    the ``PHOTO_VAL`` photos with the lowest split hash are val."""
    data = import_build_dependency("skimage.data")
    val = sorted(PHOTOS, key=lambda name: unit("split", f"skimage-{name}"))[:PHOTO_VAL]
    samples: dict[str, list[tuple[str, dict]]] = {split: [] for split in SPLITS}
    for name, license_ in tqdm(PHOTOS.items(), desc="photos", disable=not progress):
        pixels = getattr(data, name)()
        photo = Image.fromarray(pixels.astype(np.uint8) * 255 if pixels.dtype == bool else pixels)
        image_id, rng = f"skimage-{name}", random.Random(f"crops-{name}")
        meta = {"image_id": image_id, "source": f"skimage.data.{name}", "license": license_}
        full = photo.copy()
        full.thumbnail((PHOTO_FULL_SIZE, PHOTO_FULL_SIZE), Image.Resampling.LANCZOS)
        views = [("full", full, [0, 0, photo.width, photo.height])]
        for i in range(PHOTO_CROPS):
            side = int(min(photo.size) * rng.uniform(0.3, 0.7))
            left, top = rng.randrange(photo.width - side + 1), rng.randrange(photo.height - side + 1)
            box = [left, top, left + side, top + side]
            views.append((f"crop{i:02d}", photo.crop(box).resize((PHOTO_CROP_SIZE,) * 2, Image.Resampling.LANCZOS),
                          box))
        for view, image, box in views:
            samples["val" if name in val else "train"].append(
                (safe_key(f"{image_id}-{view}"), {"jpg": encode_jpeg(image), "json": {**meta, "box": box}}))
    return samples


# --- text -------------------------------------------------------------------------------------

def chunk_paragraphs(text: str) -> list[str]:
    """Consecutive paragraphs joined up to ``TEXT_CHUNK_CHARS`` (a longer paragraph stands alone)."""
    chunks, current = [], ""
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        if current and len(current) + 2 + len(paragraph) > TEXT_CHUNK_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return [*chunks, current] if current else chunks


def text_samples() -> dict[str, list[tuple[str, dict]]]:
    """pydoc topics and sklearn dataset descriptions, split by source document (so a val
    chunk never shares a document with a train chunk), chunked at paragraph boundaries."""
    from pydoc_data.topics import topics

    descr = Path(import_build_dependency("sklearn.datasets").__file__).parent / "descr"
    documents = [(f"pydoc-{topic}", topics[topic]) for topic in sorted(topics)]
    documents += [(f"sklearn-descr-{path.stem}", path.read_text(encoding="utf-8"))
                  for path in sorted(descr.glob("*.rst"))]
    samples: dict[str, list[tuple[str, dict]]] = {split: [] for split in SPLITS}
    for doc_id, text in documents:
        for i, chunk in enumerate(chunk_paragraphs(text)):
            samples[split_of(doc_id)].append((safe_key(f"{doc_id}-{i:03d}"), {"txt": chunk}))
    return samples


# --- multilingual text ------------------------------------------------------------------------

def annotation_line(name: str, keywords: list[str]) -> str:
    """``name: keyword, keyword, ...`` with the keywords other than the name itself."""
    extra = [k for k in keywords if k.casefold() != name.casefold()]
    return f"{name}: {', '.join(extra)}" if extra else name


def multilingual_samples() -> dict[str, list[tuple[str, dict]]]:
    """Per language, documents of ``MULTILINGUAL_EMOJI_PER_DOCUMENT`` consecutive emoji, a
    ``name: keywords`` line each, with ``{"lang": ...}``. The emoji are a hash-chosen
    ``MULTILINGUAL_KEEP`` of those CLDR names in English, in that file's order; each has one split
    by the hash rule, the same in every language, so val is parallel text about emoji that no
    train document names."""
    files = {lang: debian_file("unicode-cldr-core", f"annotations/{lang}.xml") for lang in LANGUAGES}
    names = {lang: read_cldr_names(path) for lang, path in files.items()}
    keywords = {lang: read_cldr_keywords([path]) for lang, path in files.items()}
    emoji = [cp for cp in names["en"] if cp in keywords["en"] and unit(MULTILINGUAL, cp) < MULTILINGUAL_KEEP]
    samples: dict[str, list[tuple[str, dict]]] = {split: [] for split in SPLITS}
    size = MULTILINGUAL_EMOJI_PER_DOCUMENT
    for split in SPLITS:
        chosen = [cp for cp in emoji if split_of(f"cldr-{cp}") == split]
        for lang in LANGUAGES:
            for i in range(0, len(chosen), size):
                lines = [annotation_line(names[lang][cp], keywords[lang][cp]) for cp in chosen[i:i + size]
                         if cp in names[lang] and cp in keywords[lang]]
                if lines:
                    samples[split].append((f"cldr-{lang}-{i // size:03d}", {"txt": "\n".join(lines),
                                                                              "json": {"lang": lang}}))
    return samples


def multilingual_info() -> dict:
    return {"languages": list(LANGUAGES), "keep": MULTILINGUAL_KEEP,
            "emoji_per_document": MULTILINGUAL_EMOJI_PER_DOCUMENT, "tokenizer_vocab": MULTILINGUAL_VOCAB}


def write_multilingual(out_dir: Path, *, overwrite: bool, progress: bool) -> dict[str, int]:
    """``multilingual/{train,val}`` (shards of kind ``text``) and ``MULTILINGUAL_TOKENIZER``,
    learned from that train split alone; returns the documents per split."""
    tokenizer = out_dir / MULTILINGUAL_TOKENIZER
    existing = [str(p) for p in (out_dir / MULTILINGUAL, tokenizer) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite)")
    counts = {split: write_shards(out_dir / MULTILINGUAL / split, "text", samples, overwrite=overwrite,
                                  progress=progress)
              for split, samples in multilingual_samples().items()}
    train_tokenizer(shard_texts([str(out_dir / MULTILINGUAL / "train")]), tokenizer, vocab_size=MULTILINGUAL_VOCAB,
                    byte_fallback=True, overwrite=overwrite)
    return counts


# --- assembling -------------------------------------------------------------------------------

def keep(kind: str, picture: Picture, split: str) -> bool:
    if split == "val" and kind in EVAL_KINDS:
        return True
    return unit(kind, picture.image_id) < KEEP.get((kind, picture.source), 1.0)


def pick_question(picture: Picture) -> Question:
    """One question per image (each VQA sample carries its own image copy), drawn by weight."""
    point = unit("question", picture.image_id) * sum(q.weight for q in picture.questions)
    for q in picture.questions:
        point -= q.weight
        if point < 0:
            return q
    return picture.questions[-1]


def picture_samples(kind: str, split: str, pictures: list[Picture]):
    for p in pictures:
        if split_of(p.image_id) != split or not keep(kind, p, split):
            continue
        if kind == "image_text":
            yield p.image_id, {"png": p.png, "txt": p.caption}
        elif kind == "retrieval" and p.captions:
            yield p.image_id, {"png": p.png, "json": {"image_id": p.image_id, "captions": p.captions}}
        elif kind == "vqa":
            q = pick_question(p)
            yield f"q{q.question_id}", {"png": p.png, "json": {
                "question_id": q.question_id, "question": q.question, "answers": q.answers,
                "question_type": q.question_type, "image_id": p.image_id}}


def drop_duplicate_images(pictures: list[Picture]) -> tuple[list[Picture], list[str]]:
    """Distinct emoji can share a glyph (the flags of Norway, Bouvet Island and Svalbard; "family"
    and "family: man, man, boy"). Keep the shortest name of each (the country rather than its
    territories; ties: the first), so identical bytes never sit in both a train and a val split."""
    by_bytes: dict[bytes, list[Picture]] = {}
    for p in pictures:
        by_bytes.setdefault(hashlib.sha256(p.png).digest(), []).append(p)
    chosen = {id(min(same, key=lambda p: len(p.caption))) for same in by_bytes.values()}
    return [p for p in pictures if id(p) in chosen], [p.image_id for p in pictures if id(p) not in chosen]


def debian_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for package in ("pillow", "numpy", "webdataset", "scikit-learn", "scikit-image"):
        found[package] = metadata.version(package)
    for package in DEBIAN:
        found[package] = debian_version(package)
    return found


def copy_license(source: Path, target: Path) -> None:
    if not source.exists():
        raise FileNotFoundError(f"license file {source} is missing; reinstall the package that ships it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def copy_licenses(out_dir: Path) -> None:
    """License texts the sources require to travel with copies (Debian copyright files hold the
    OFL and Unicode texts verbatim)."""
    sources = {f"{package}.copyright": Path(f"/usr/share/doc/{package}/copyright") for package in DEBIAN}
    sources["python-LICENSE.txt"] = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    sources["scikit-learn-COPYING.txt"] = Path(next(str(f.locate()) for f in metadata.files("scikit-learn")
                                                    if f.name == "COPYING"))
    for name, source in sources.items():
        copy_license(source, out_dir / "licenses" / name)


def write_shards(directory: Path, kind: str, samples, *, overwrite: bool, progress: bool) -> int:
    """``samples`` (key, fields) as shards of ``kind`` in ``directory`` (``<set>/<split>``); how many."""
    name = f"{directory.parent.name}-{directory.name}"
    written = 0
    with ShardSink(directory, kind, prefix=name, maxcount=SHARD_MAXCOUNT, overwrite=overwrite) as sink:
        for key, fields in tqdm(samples, desc=name, disable=not progress, leave=False):
            sink.write(key, fields)
            written += 1
    return written


def write_build_info(out_dir: Path, info: dict) -> None:
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")


def build_demo(out_dir: str | Path = BUNDLED, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Write every kind's train/val shards, ``licenses/`` and ``build_info.json`` into ``out_dir``;
    returns ``{kind: {split: samples}}``. Refuses to replace existing shards unless ``overwrite``."""
    out_dir = Path(out_dir)
    existing = [kind for kind in (*KINDS, MULTILINGUAL) if (out_dir / kind).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True (--overwrite) "
                              f"to rebuild them")
    check_build_dependencies()
    pictures, duplicates = drop_duplicate_images(emoji_pictures(progress) + digit_pictures(progress))
    fixed = {"image": photo_samples(progress), "text": text_samples()}
    counts: dict[str, dict[str, int]] = {}
    for kind in (k for k in KINDS if k not in FROM_SHARDS):
        for split in SPLITS:
            samples = fixed[kind][split] if kind in fixed else picture_samples(kind, split, pictures)
            counts.setdefault(kind, {})[split] = write_shards(out_dir / kind / split, kind, samples,
                                                              overwrite=overwrite, progress=progress)
    counts[MULTILINGUAL] = write_multilingual(out_dir, overwrite=overwrite, progress=progress)
    copy_licenses(out_dir)
    build_derived(out_dir, overwrite=overwrite, progress=progress)
    info = {"counts": counts, "versions": versions(), "val_fraction": VAL_FRACTION,
            "keep": {f"{k}/{s}": f for (k, s), f in sorted(KEEP.items())},
            "dropped_duplicate_images": duplicates, MULTILINGUAL: multilingual_info()}
    write_build_info(out_dir, info)
    for kind, build in FROM_SHARDS.items():  # each adds its counts to build_info.json
        counts[kind] = build(out_dir, source=out_dir, overwrite=overwrite)
    return counts


def build_multilingual(out_dir: str | Path = BUNDLED, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Only the multilingual set, its tokenizer and CLDR's license text (needs ``unicode-cldr-core``
    alone), with their entries in ``build_info.json``: the bytes of a whole build."""
    out_dir = Path(out_dir)
    counts = write_multilingual(out_dir, overwrite=overwrite, progress=progress)
    package = "unicode-cldr-core"
    copy_license(Path(f"/usr/share/doc/{package}/copyright"), out_dir / "licenses" / f"{package}.copyright")
    path = out_dir / "build_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.setdefault("counts", {})[MULTILINGUAL] = counts
    info.setdefault("versions", {})[package] = debian_version(package)
    info[MULTILINGUAL] = multilingual_info()
    write_build_info(out_dir, info)
    return {MULTILINGUAL: counts}


def build_derived(out_dir: str | Path = BUNDLED, *, overwrite: bool = False, progress: bool = True) -> dict:
    """From the train shards in ``out_dir`` (needs no build dependency): the sentencepiece
    tokenizer (BEiT-3 id layout) and the k-means visual codebook the debug presets use. Both are
    deterministic, so a rebuild gives the same files."""
    out_dir = Path(out_dir)
    paths = {"tokenizer": out_dir / TOKENIZER, "visual_codebook": out_dir / CODEBOOK}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite)")
    texts = shard_texts([str(out_dir / kind / "train") for kind in ("text", "image_text", "vqa", "retrieval")])
    train_tokenizer(texts, paths["tokenizer"], vocab_size=TOKENIZER_VOCAB, overwrite=overwrite)
    codebook = codebook_from_shards([out_dir / "image" / "train", out_dir / "image_text" / "train"],
                                    image_size=CODEBOOK_IMAGE, patch_size=CODEBOOK_PATCH, codes=CODEBOOK_CODES,
                                    patches=CODEBOOK_PATCHES, progress=progress)
    codebook.save(paths["visual_codebook"])
    return {name: str(path) for name, path in paths.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the bundled demo shards from offline real data.")
    parser.add_argument("--out", type=Path, default=BUNDLED, help=f"output directory (default {BUNDLED})")
    parser.add_argument("--overwrite", action="store_true", help="replace shards that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--derived-only", action="store_true",
                      help="only the tokenizer and visual codebook, from the shards already there")
    only.add_argument("--multilingual-only", action="store_true",
                      help="only the multilingual text and its tokenizer (needs unicode-cldr-core alone)")
    args = parser.parse_args(argv)
    build = build_derived if args.derived_only else build_multilingual if args.multilingual_only else build_demo
    try:
        counts = build(args.out, overwrite=args.overwrite, progress=not args.quiet)
    except (OSError, ImportError, RuntimeError) as err:  # a missing package or existing output: say which
        parser.exit(2, f"build_demo: error: {err}\n")
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
