"""The committed demo shards (``data_pipelines/bundled/``): complete, decodable, leak-free, small.

Reads the tars with :mod:`tarfile` only, so it needs none of the build-time packages (the
multilingual recipe is tested on CLDR-shaped files written here).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipelines.images import eval_transform
from data_pipelines.shards import IMAGE_FIELDS, KINDS
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.tasks.visual_targets import KMeansCodebook

BUNDLED = Path(__file__).resolve().parents[1] / "data_pipelines" / "bundled"
SPLITS = ("train", "val")
SETS = {**{kind: kind for kind in KINDS}, "multilingual": "text"}  # directory: the kind of its shards
LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
MAX_BYTES = 20_000_000  # the repository carries it: every MB is every clone's


@cache
def samples(kind: str, split: str) -> dict[str, dict[str, bytes]]:
    """``{key: {field: bytes}}`` of one directory, members grouped by key as webdataset does."""
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted((BUNDLED / kind / split).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                found.setdefault(key, {})[field] = tar.extractfile(member).read()
    return found


def images(sample: dict[str, bytes]) -> list[bytes]:
    """A sample's images: its image field, or an NLVR2 pair's left and right ones."""
    return [sample[p + f] for p in ("", "left.", "right.") for f in IMAGE_FIELDS if p + f in sample]


def image_bytes(sample: dict[str, bytes]) -> bytes:
    return images(sample)[0]


def image_id(kind: str, key: str, sample: dict[str, bytes]) -> str:
    return json.loads(sample["json"]).get("image_id", key) if "json" in sample else key


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", SETS)
def test_sizes_and_manifest_match_the_tars(kind, split):
    directory = BUNDLED / kind / split
    sizes = json.loads((directory / "sizes.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    per_tar = {}
    fields: Counter[str] = Counter()
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        per_tar[path.name] = len({name.split(".", 1)[0] for name in names})
        fields.update(name.split(".", 1)[1] for name in names)
    assert sizes == per_tar
    assert manifest["kind"] == SETS[kind]
    assert manifest["samples"] == sum(per_tar.values()) == len(samples(kind, split)) > 0
    assert manifest["shards"] == len(per_tar)
    assert manifest["fields"] == dict(fields)


def test_build_info_and_data_md_give_the_shard_counts():
    counts = {kind: {split: len(samples(kind, split)) for split in SPLITS} for kind in SETS}
    assert json.loads((BUNDLED / "build_info.json").read_text())["counts"] == counts
    rows = re.findall(r"^\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", (BUNDLED / "DATA.md").read_text(), re.M)
    assert {kind: {"train": int(train), "val": int(val)} for kind, train, val in rows} == counts


def test_license_texts_ship_with_the_data():
    names = {path.name for path in (BUNDLED / "licenses").iterdir() if path.stat().st_size > 0}
    assert {"fonts-noto-color-emoji.copyright", "unicode-data.copyright", "unicode-cldr-core.copyright",
            "python-LICENSE.txt", "scikit-learn-COPYING.txt"} <= names


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "text"])
def test_every_image_decodes(kind, split):
    for key, sample in samples(kind, split).items():
        assert images(sample), key
        for data in images(sample):
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                assert min(image.size) >= 8, key


def test_image_text_has_a_thousand_captioned_train_pairs():
    pairs = samples("image_text", "train")
    assert len(pairs) >= 1000
    assert all(sample["txt"].decode("utf-8").strip() for sample in pairs.values())


@pytest.mark.parametrize("split", SPLITS)
def test_text_documents_are_nonempty_utf8(split):
    assert all(sample["txt"].decode("utf-8").strip() for sample in samples("text", split).values())


def multilingual(split: str) -> dict[str, list[str]]:
    """The ``multilingual`` documents of a split by language."""
    found: dict[str, list[str]] = {}
    for sample in samples("multilingual", split).values():
        found.setdefault(json.loads(sample["json"])["lang"], []).append(sample["txt"].decode("utf-8"))
    return found


def test_multilingual_text_is_parallel_in_every_language_and_split():
    train, val = multilingual("train"), multilingual("val")
    assert list(train) == list(val) == list(LANGUAGES)
    for lang in LANGUAGES:
        assert len(train[lang]) == 13 and len(val[lang]) == 2, lang
        assert all(doc.strip() for doc in train[lang] + val[lang]), lang
        lines = {split: {line for doc in docs[lang] for line in doc.splitlines()} for split, docs in
                 (("train", train), ("val", val))}
        assert len(lines["val"]) >= 100 and not lines["val"] & lines["train"], lang  # no val emoji in train


def test_multilingual_tokenizer_covers_every_script():
    """Byte fallback: no ``<unk>``; characters that need bytes are rare but in Chinese, whose val
    split uses characters that no train document has (DATA.md)."""
    tokenizer = Tokenizer.load(BUNDLED / "tokenizer_multilingual.model")
    assert (tokenizer.layout, tokenizer.vocab_size, tokenizer.mask_id) == ("beit3", 6000, 4)
    for lang, docs in multilingual("val").items():
        encoded = [tokenizer.encode(doc) for doc in docs]
        ids = [i for doc_ids in encoded for i in doc_ids]
        byte_share = sum(tokenizer.sp.is_byte(i) for i in ids) / len(ids)
        assert tokenizer.unk_id not in ids and byte_share < (0.2 if lang == "zh" else 0.005), (lang, byte_share)
        normalized = [" ".join(unicodedata.normalize("NFKC", doc).split()) for doc in docs]  # as sentencepiece does
        assert [tokenizer.decode(doc_ids) for doc_ids in encoded] == normalized, lang  # bytes decode back


def test_the_multilingual_recipe_writes_parallel_documents_split_by_emoji(tmp_path, monkeypatch):
    """The recipe's logic on small CLDR-shaped files (the real ones are a build-time package; the
    byte-for-byte rebuild is in DATA.md): a line per emoji, the name not repeated among its
    keywords, one split per emoji in every language, a language's missing emoji left out."""
    from data_pipelines.recipes import build_demo

    emoji = [chr(0x1F400 + i) for i in range(300)]
    for lang in build_demo.LANGUAGES:
        nodes = []
        for i, cp in enumerate(emoji):
            if lang == "sw" and i % 10 == 0:
                continue  # CLDR's Swahili lacks some emoji
            nodes.append(f'<annotation cp="{cp}" type="tts">{lang} name {i}</annotation>'
                         f'<annotation cp="{cp}">k{i} | {lang} name {i} | {lang} other</annotation>')
        (tmp_path / f"{lang}.xml").write_text(f"<ldml><annotations>{''.join(nodes)}</annotations></ldml>",
                                              encoding="utf-8")
    monkeypatch.setattr(build_demo, "debian_file", lambda package, name: tmp_path / Path(name).name)
    samples = build_demo.multilingual_samples()
    seen: dict[str, dict[str, set[int]]] = {split: {} for split in samples}
    for split, docs in samples.items():
        for key, fields in docs:
            lang = fields["json"]["lang"]
            assert re.fullmatch(rf"cldr-{lang}-\d{{3}}", key)
            lines = fields["txt"].split("\n")
            assert 0 < len(lines) <= build_demo.MULTILINGUAL_EMOJI_PER_DOCUMENT
            for line in lines:
                i = int(re.fullmatch(rf"{lang} name (\d+): k\1, {lang} other", line)[1])
                seen[split].setdefault(lang, set()).add(i)
    assert set(seen["train"]) == set(seen["val"]) == set(build_demo.LANGUAGES)
    train, val = seen["train"]["en"], seen["val"]["en"]
    assert not train & val and val and 0.45 < len(train | val) / len(emoji) < 0.75
    for lang in build_demo.LANGUAGES:
        expected = {i for i in train | val if lang != "sw" or i % 10}
        assert seen["train"][lang] | seen["val"][lang] == expected and seen["val"][lang] <= val, lang


def test_vqa_questions():
    ids = []
    for split in SPLITS:
        questions = [json.loads(sample["json"]) for sample in samples("vqa", split).values()]
        assert len({q["question_type"] for q in questions}) >= 3, split
        for q in questions:
            assert set(q) >= {"question_id", "question", "answers", "question_type", "image_id"}
            assert len(q["answers"]) == 10 and all(isinstance(a, str) and a for a in q["answers"]), q
        ids += [q["question_id"] for q in questions]
    assert len(ids) == len(set(ids))
    assert len(samples("vqa", "val")) >= 200


def test_retrieval_images_have_several_captions():
    for split in SPLITS:
        for key, sample in samples("retrieval", split).items():
            meta = json.loads(sample["json"])
            assert meta["image_id"] == key
            assert len(meta["captions"]) >= 2 and all(c.strip() for c in meta["captions"]), meta
    assert len(samples("retrieval", "val")) >= 200


def test_no_evaluation_image_is_in_any_train_split():
    train_ids, train_digests = set(), set()
    for kind in KINDS:
        if kind != "text":
            for key, sample in samples(kind, "train").items():
                train_ids.add(image_id(kind, key, sample))
                train_digests.update(hashlib.sha256(data).digest() for data in images(sample))
    for kind in ("vqa", "retrieval", "nlvr2", "classification"):
        for key, sample in samples(kind, "val").items():
            assert image_id(kind, key, sample) not in train_ids, (kind, key)
            assert not {hashlib.sha256(data).digest() for data in images(sample)} & train_digests, (kind, key)


def test_total_size_stays_small():
    total = sum(path.stat().st_size for path in BUNDLED.rglob("*") if path.is_file())
    assert total < MAX_BYTES, f"bundled data is {total:,} bytes; the budget is {MAX_BYTES:,}"


def test_tokenizer_covers_the_bundled_text_in_beit3_layout():
    tokenizer = Tokenizer.load(BUNDLED / "tokenizer.model")
    assert (tokenizer.layout, tokenizer.vocab_size, tokenizer.mask_id) == ("beit3", 4096, 4)
    for sample in list(samples("image_text", "val").values())[:50]:
        ids = tokenizer.encode(sample["txt"].decode())
        assert ids and tokenizer.unk_id not in ids


def test_visual_codebook_fits_the_debug_preset():
    codebook = KMeansCodebook.load(BUNDLED / "visual_codebook.safetensors")
    assert codebook.num_classes == 1024 and codebook.patch_size == 8
    assert torch.isfinite(codebook.codebook).all() and len(torch.unique(codebook.codebook, dim=0)) == 1024
    image = Image.open(io.BytesIO(image_bytes(next(iter(samples("image_text", "val").values())))))
    codes = codebook(eval_transform(32)(image)[None])
    assert codes.shape == (1, 16) and len(codes.unique()) > 1  # different patches, different codes
