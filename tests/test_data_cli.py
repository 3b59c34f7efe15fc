"""``mmoe data``: shards from ordinary files, inspection, tokenizer training, refusing to overwrite."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.shards import read_manifest
from data_pipelines.tokenizer import Tokenizer
from multimodal_moe.cli import main


def save_image(path, seed: int, fmt: str = "PNG") -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def files(tmp_path):
    save_image(tmp_path / "imgs" / "a.png", 0)
    save_image(tmp_path / "imgs" / "sub" / "b.v2.jpg", 1, "JPEG")
    save_image(tmp_path / "imgs" / "c.bmp", 2, "BMP")
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/a.png,a red square\nimgs/c.bmp,\"a blue, round dot\"\n")
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": "imgs/a.png", "question": "what colour?",
                                                    "answers": ["red"] * 10, "question_type": "what colour"}) + "\n")
    (tmp_path / "ret.jsonl").write_text(json.dumps({"image": "imgs/a.png", "captions": ["a red square", "red"]}) + "\n")
    (tmp_path / "corpus.txt").write_text("the quick brown fox\n\njumps over the lazy dog\n")
    return tmp_path


def test_write_shards_from_every_source(files, capsys):
    out = files / "out"
    assert main(["data", "write-shards", "image", str(files / "imgs"), "--out", str(out / "image")]) == 0
    assert read_manifest(out / "image") == {"kind": "image", "samples": 3, "shards": 1, "fields": {"jpg": 1, "png": 2}}
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "image" / "shard-000000.tar"), shardshuffle=False)]
    assert keys == ["a", "c", "sub_b_v2"]  # sorted paths, dots and slashes replaced

    assert main(["data", "write-shards", "image_text", str(files / "pairs.csv"), "--out", str(out / "pairs"),
                 "--maxcount", "1"]) == 0
    assert read_manifest(out / "pairs")["shards"] == 2
    sample = next(iter(wds.WebDataset(str(out / "pairs" / "shard-000001.tar"), shardshuffle=False)))
    assert sample["txt"].decode() == "a blue, round dot" and Image.open(io.BytesIO(sample["png"])).size == (14, 10)

    assert main(["data", "write-shards", "vqa", str(files / "vqa.jsonl"), "--out", str(out / "vqa")]) == 0
    record = json.loads(next(iter(wds.WebDataset(str(out / "vqa" / "shard-000000.tar"), shardshuffle=False)))["json"])
    assert record == {"image_id": "a", "questions": [{"question_id": 1, "question": "what colour?",
                                                      "answers": ["red"] * 10, "question_type": "what colour",
                                                      "answer_type": ""}]}
    assert main(["data", "write-shards", "retrieval", str(files / "ret.jsonl"), "--out", str(out / "ret")]) == 0
    assert main(["data", "write-shards", "text", str(files / "corpus.txt"), "--out", str(out / "text")]) == 0
    assert read_manifest(out / "text")["samples"] == 1  # a .txt file is one document unless --documents says

    capsys.readouterr()
    assert main(["data", "write-shards", "text", str(files / "corpus.txt"), "--out", str(out / "text")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "write-shards", "text", str(files / "corpus.txt"), "--out", str(out / "text"),
                 "--overwrite", "--documents", "line"]) == 0
    assert read_manifest(out / "text")["samples"] == 2
    assert main(["data", "write-shards", "text", str(files / "corpus.txt"), "--out", str(out / "text"),
                 "--overwrite", "--lang", "de", "--documents", "line"]) == 0
    samples = list(wds.WebDataset(str(out / "text" / "shard-000000.tar"), shardshuffle=False))
    assert [json.loads(s["json"]) for s in samples] == [{"lang": "de"}] * 2


def test_bad_records_are_clear_errors(files, capsys):
    (files / "bad.jsonl").write_text(json.dumps({"image": "imgs/a.png", "question": "q?"}) + "\n")
    assert main(["data", "write-shards", "vqa", str(files / "bad.jsonl"), "--out", str(files / "o")]) == 2
    assert "bad.jsonl:1: record lacks ['answers']" in capsys.readouterr().err
    assert not (files / "o").exists()


def test_inspect_counts_fields_and_skips(files, capsys):
    shard_dir = files / "shards"
    shard_dir.mkdir()
    with wds.TarWriter(str(shard_dir / "s-0.tar"), encoder=False) as tar:
        tar.write({"__key__": "ok", "png": (files / "imgs" / "a.png").read_bytes(), "txt": b"fine"})
        tar.write({"__key__": "broken", "png": b"\x89PNG not really", "txt": b"fine"})
        tar.write({"__key__": "latin", "png": (files / "imgs" / "a.png").read_bytes(), "txt": b"caf\xe9"})
    capsys.readouterr()
    assert main(["data", "inspect", str(shard_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 samples in 1 shard(s)" in out and "png 3, txt 3" in out
    assert "bad_utf8 1, corrupt_image 1" in out and '"png": "14x10 RGB"' in out


def test_train_tokenizer_from_shards(files, tmp_path):
    corpus = files / "big.txt"
    corpus.write_text("\n".join(f"line {i} of the demo corpus with words {i % 7} and {i % 11}" for i in range(300)))
    assert main(["data", "write-shards", "text", str(corpus), "--out", str(tmp_path / "t")]) == 0
    model = tmp_path / "tok.model"
    assert main(["data", "train-tokenizer", str(tmp_path / "t"), "--out", str(model), "--vocab-size", "80"]) == 0
    tok = Tokenizer.load(model)
    assert tok.layout == "beit3" and tok.vocab_size == 80
    assert main(["data", "train-tokenizer", str(tmp_path / "t"), "--out", str(model), "--vocab-size", "80"]) == 2


def test_train_visual_codebook_from_image_shards(files, tmp_path, capsys):
    from multimodal_moe.tasks.visual_targets import KMeansTargetsConfig

    shards, out = files / "out" / "image", tmp_path / "codes.safetensors"
    assert main(["data", "write-shards", "image", str(files / "imgs"), "--out", str(shards)]) == 0
    args = ["data", "train-visual-codebook", str(shards), "--out", str(out), "--patch-size", "4",
            "--image-size", "8", "--codes", "6", "--patches", "200"]
    assert main(args) == 0
    targets = KMeansTargetsConfig(path=str(out)).build(4)
    assert targets.num_classes == 6 and targets.patch_size == 4
    codes = targets(torch.randn(2, 3, 8, 8))
    assert codes.shape == (2, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 6
    capsys.readouterr()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
