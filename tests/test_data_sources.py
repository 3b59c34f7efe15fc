"""``mmoe data write-shards`` from the files people have, in their official layouts: JSONL text
(plain, gzip, Zstandard), folders of text, open_clip's TSV, Karpathy's COCO and Flickr30k split
files; each written with the CLI, read back with the shard reader, and two of them trained on."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines.shards import read_manifest, shard_urls
from data_pipelines.skips import SkipCounter
from data_pipelines.tars import tar_samples
from multimodal_moe.cli import main

DOCS = [{"text": 'café "au lait"\nsecond line, {braces} and \\ backslash', "id": 1, "lang": "fr"},
        {"text": "the quick brown fox", "id": 2, "lang": "en"}]
DOC_TEXTS = [d["text"] for d in DOCS]


def write(*argv: str) -> int:
    return main(["data", "write-shards", *map(str, argv)])


def samples(shard_dir) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples(shard_urls(str(shard_dir)),
                                                                                SkipCounter())]


def texts(shard_dir) -> list[str]:
    return [s["txt"].decode() for s in samples(shard_dir)]


def save_image(path, seed: int, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# --- text ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.json.zst", "docs.json"])
def test_jsonl_text_gives_one_document_per_record(tmp_path, name):
    path = tmp_path / name
    data = jsonl(DOCS).encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard

        half = len(data) // 2  # two frames, as concatenated .zst files are
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
    path.write_bytes(data)
    assert write("text", path, "--out", tmp_path / "out") == 0
    got = samples(tmp_path / "out")
    assert [s["txt"].decode() for s in got] == DOC_TEXTS  # the text itself: no braces, no escapes
    assert [s["__key__"] for s in got] == ["docs_00000001", "docs_00000002"] and "json" not in got[0]
    assert read_manifest(tmp_path / "out") == {"kind": "text", "samples": 2, "shards": 1, "fields": {"txt": 2}}

    assert write("text", path, "--out", tmp_path / "lang", "--lang-field", "lang") == 0
    assert [json.loads(s["json"]) for s in samples(tmp_path / "lang")] == [{"lang": "fr"}, {"lang": "en"}]


def test_text_field_names_the_documents_field(tmp_path):
    (tmp_path / "c4.jsonl").write_text(jsonl([{"content": "a document", "url": "x"}, {"content": "another"}]))
    assert write("text", tmp_path / "c4.jsonl", "--text-field", "content", "--lang", "en", "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert [s["txt"].decode() for s in got] == ["a document", "another"]
    assert [json.loads(s["json"]) for s in got] == [{"lang": "en"}] * 2


BOOK = "Chapter one.\nIt was a dark night.\n\n\nChapter two.\n  Indented line.\n\nThe end."


@pytest.mark.parametrize("flags, expected", [
    ([], [BOOK]),  # one document per file: the default
    (["--file-per-document"], [BOOK]),  # the older flag, now the default
    (["--documents", "file"], [BOOK]),
    (["--documents", "paragraph"], ["Chapter one.\nIt was a dark night.", "Chapter two.\n  Indented line.",
                                    "The end."]),
    (["--documents", "line"], ["Chapter one.", "It was a dark night.", "Chapter two.", "  Indented line.", "The end."]),
])
def test_txt_documents(tmp_path, flags, expected):
    (tmp_path / "book.txt").write_text(BOOK + "\n")
    assert write("text", tmp_path / "book.txt", *flags, "--out", tmp_path / "o") == 0
    assert texts(tmp_path / "o") == expected


def test_a_folder_is_read_recursively_sorted_with_other_files_ignored(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deep").mkdir(parents=True)
    (corpus / "a.txt").write_text("first file\n")
    (corpus / "b" / "deep" / "z.txt.gz").write_bytes(gzip.compress(b"gzipped text\n"))
    (corpus / "b" / "records.jsonl").write_text(jsonl(DOCS))
    (corpus / "b" / "README.md").write_text("# not a corpus file\n")
    (corpus / "c.TXT").write_text("upper-case suffix\n")
    assert write("text", corpus, "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert [s["txt"].decode() for s in got] == ["first file", "gzipped text", *DOC_TEXTS, "upper-case suffix"]
    assert [s["__key__"] for s in got] == ["corpus_a", "corpus_b_deep_z", "corpus_b_records_00000001",
                                           "corpus_b_records_00000002", "corpus_c"]
    err = capsys.readouterr().err
    assert "ignored 1 file(s)" in err and "README.md" in err


def test_bad_text_inputs_are_errors_naming_what_and_where(tmp_path, capsys, monkeypatch):
    def error(*argv) -> str:
        capsys.readouterr()
        assert write("text", *argv, "--out", tmp_path / "o") == 2
        assert not (tmp_path / "o").exists()
        return capsys.readouterr().err

    (tmp_path / "a.jsonl").write_text(jsonl([DOCS[0], {"body": "x", "id": 3}]))
    assert "a.jsonl:2: the record has no 'text' field; its keys are ['body', 'id'] (--text-field" in \
        error(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text(jsonl([{"text": ["a", "list"]}]))
    assert "b.jsonl:1: the record holds [\"a\", \"list\"] in 'text', not a string" in error(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    assert "c.jsonl:2: not a JSON object" in error(tmp_path / "c.jsonl")
    assert "a.jsonl:1: the record has no 'language' field" in error(tmp_path / "a.jsonl", "--lang-field", "language")
    (tmp_path / "gz.txt").write_bytes(gzip.compress(b"hidden"))
    assert "gz.txt:1: not UTF-8 text (invalid start byte); a compressed file needs its .gz or .zst suffix" in \
        error(tmp_path / "gz.txt")
    (tmp_path / "plain.jsonl.gz").write_text(jsonl(DOCS))
    assert "plain.jsonl.gz: cannot be decompressed as its suffix says" in error(tmp_path / "plain.jsonl.gz")
    assert f"text input {tmp_path / 'nowhere'} not found" in error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.csv").write_text("a,b\n")
    assert "no .txt/.jsonl/.json files (optionally .gz/.zst) under" in error(tmp_path / "empty")
    (tmp_path / "sub").mkdir()
    (tmp_path / "good.jsonl").write_text(jsonl(DOCS))
    (tmp_path / "sub" / "good.txt").write_text("same name\n")
    assert "give the same sample keys ('good')" in error(tmp_path / "good.jsonl", tmp_path / "sub" / "good.txt")
    assert "--sep: not an option of text shards" in error(tmp_path / "good.jsonl", "--sep", ",")

    import zstandard

    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS * 50).encode())[:-9])
    assert "cut.jsonl.zst: cannot be decompressed as its suffix says (the file ends inside a Zstandard frame: it " \
           "is truncated)" in error(tmp_path / "cut.jsonl.zst")
    (tmp_path / "d.jsonl.zst").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    assert "needs the zstandard package: pip install zstandard" in error(tmp_path / "d.jsonl.zst")


# --- caption pairs -------------------------------------------------------------------------------------------------

def test_open_clip_tsv(tmp_path, capsys):
    red, blue = save_image(tmp_path / "images" / "red.jpg", 0), save_image(tmp_path / "elsewhere" / "blue.png", 1,
                                                                            "PNG")
    # open_clip's CsvDataset file: a filepath<TAB>title header; paths relative or absolute
    (tmp_path / "train.csv").write_text(f"filepath\ttitle\nimages/red.jpg\tA red, \"noisy\" square\n"
                                        f"{tmp_path / 'elsewhere' / 'blue.png'}\ta blue one\n")
    columns = ["--image-column", "filepath", "--text-column", "title"]
    assert write("image_text", tmp_path / "train.csv", "--sep", "\\t", *columns, "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert [s["txt"].decode() for s in got] == ['A red, "noisy" square', "a blue one"]
    assert got[0]["jpg"] == red and got[1]["png"] == blue
    assert [s["__key__"] for s in got] == ["00000002_red", "00000003_blue"]

    (tmp_path / "train.tsv").write_text((tmp_path / "train.csv").read_text())  # .tsv: TAB by default
    assert write("image_text", tmp_path / "train.tsv", *columns, "--out", tmp_path / "tsv") == 0
    assert samples(tmp_path / "tsv") == got

    capsys.readouterr()
    assert write("image_text", tmp_path / "train.tsv", "--out", tmp_path / "bad") == 2
    assert "train.tsv: no column 'image', 'caption' in its header; its columns are ['filepath', 'title']" in \
        capsys.readouterr().err
    assert write("image_text", tmp_path / "train.csv", *columns, "--out", tmp_path / "bad") == 2
    assert "its columns are ['filepath\\ttitle'] (one column: is the separator ',' right? --sep sets it)" in \
        capsys.readouterr().err
    assert write("image_text", tmp_path / "train.csv", "--sep", "::", *columns, "--out", tmp_path / "bad") == 2
    assert "separator '::' is not one character" in capsys.readouterr().err
    (tmp_path / "missing.tsv").write_text("filepath\ttitle\nimages/gone.jpg\ta ghost\n")
    assert write("image_text", tmp_path / "missing.tsv", *columns, "--out", tmp_path / "bad") == 2
    assert f"missing.tsv:2: image {tmp_path / 'images' / 'gone.jpg'} not found" in capsys.readouterr().err
    assert write("image_text", tmp_path / "train.tsv", *columns, "--split", "test", "--out", tmp_path / "bad") == 2
    assert "train.tsv is not one" in capsys.readouterr().err


def sentences(imgid: int, first_sentid: int, *raws: str) -> dict:
    return {"sentids": list(range(first_sentid, first_sentid + len(raws))),
            "sentences": [{"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid,
                           "sentid": first_sentid + i} for i, raw in enumerate(raws)]}


# dataset_coco.json's layout (its first entries, with fewer sentences)
COCO = {"images": [
    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test", "cocoid": 391895,
     **sentences(0, 770337, "A man with a red helmet on a small moped on a dirt road. ",
                 "Man riding a motor bike on a dirt road on the countryside.")},
    {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "imgid": 1, "split": "restval",
     "cocoid": 522418, **sentences(1, 681330, "A woman wearing a net on her head cutting a cake. ",
                                   "A woman cutting a large white sheet cake.", "A woman wearing a hair net.")},
    {"filepath": "train2014", "filename": "COCO_train2014_000000057870.jpg", "imgid": 2, "split": "train",
     "cocoid": 57870, **sentences(2, 787980, "A restaurant has modern wooden tables and chairs.",
                                  "A long restaurant table with rattan rounded back chairs.")},
], "dataset": "coco"}
FLICKR = {"images": [
    {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
     **sentences(0, 0, "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
                 "Two young, White males are outside near many bushes.")},
    {"filename": "10002456.jpg", "imgid": 1, "split": "test",
     **sentences(1, 5, "Several men in hard hats are operating a giant pulley system.")},
], "dataset": "flickr30k"}


@pytest.fixture
def coco(tmp_path):
    """dataset_coco.json in its folder, the images under coco/<filepath>/<filename>."""
    images = {e["cocoid"]: save_image(tmp_path / "coco" / e["filepath"] / e["filename"], i)
              for i, e in enumerate(COCO["images"])}
    (tmp_path / "karpathy").mkdir()
    (tmp_path / "karpathy" / "dataset_coco.json").write_text(json.dumps(COCO))
    return tmp_path / "karpathy" / "dataset_coco.json", tmp_path / "coco", images


def test_karpathy_coco_retrieval_and_caption_pairs(coco, tmp_path, capsys):
    path, root, images = coco
    assert write("retrieval", path, "--split", "test", "--image-root", root, "--out", tmp_path / "test") == 0
    assert "dataset_coco.json (coco): test 1 images / 2 captions" in capsys.readouterr().err
    [sample] = samples(tmp_path / "test")
    assert sample["__key__"] == "391895" and sample["jpg"] == images[391895]
    assert json.loads(sample["json"]) == {"image_id": "391895", "captions": [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside."]}

    assert write("image_text", path, "--split", "train,restval", "--image-root", root, "--out", tmp_path / "pairs") == 0
    err = capsys.readouterr().err
    assert "restval 1 images / 3 captions" in err and "train 1 images / 2 captions" in err
    assert "5 image-caption pairs: one per caption, each image's bytes stored once per caption" in err
    got = samples(tmp_path / "pairs")
    assert [s["__key__"] for s in got] == ["522418_0", "522418_1", "522418_2", "57870_0", "57870_1"]
    assert [s["txt"].decode() for s in got[:2]] == ["A woman wearing a net on her head cutting a cake.",
                                                     "A woman cutting a large white sheet cake."]
    assert [s["jpg"] for s in got] == [images[522418]] * 3 + [images[57870]] * 2

    assert write("retrieval", path, "--image-root", root, "--out", tmp_path / "all") == 0  # default: every split
    assert "restval 1 images / 3 captions, test 1 images / 2 captions, train 1 images / 2 captions" in \
        capsys.readouterr().err
    assert read_manifest(tmp_path / "all")["samples"] == 3


def test_karpathy_flickr30k_images_are_beside_the_file_by_default(tmp_path):
    images = [save_image(tmp_path / e["filename"], i) for i, e in enumerate(FLICKR["images"])]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(FLICKR))
    assert write("retrieval", tmp_path / "dataset_flickr30k.json", "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert [json.loads(s["json"])["image_id"] for s in got] == ["1000092795", "10002456"]
    assert [s["jpg"] for s in got] == images
    assert json.loads(got[1]["json"])["captions"] == ["Several men in hard hats are operating a giant pulley system."]
    assert write("image_text", tmp_path / "dataset_flickr30k.json", "--split", "train", "--out", tmp_path / "p") == 0
    assert texts(tmp_path / "p") == [s["raw"] for s in FLICKR["images"][0]["sentences"]]


def test_karpathy_mistakes_are_errors_naming_them(coco, tmp_path, capsys):
    path, root, _ = coco
    assert write("retrieval", path, "--split", "train,restvall", "--image-root", root, "--out", tmp_path / "o") == 2
    assert "dataset_coco.json has no split 'restvall'; its splits are restval (1 images), test (1 images), " \
           "train (1 images)" in capsys.readouterr().err
    assert write("retrieval", path, "--out", tmp_path / "o") == 2  # the images are not beside the json
    err = capsys.readouterr().err
    first = path.parent / "val2014" / COCO["images"][0]["filename"]
    assert f"3 of the 3 images are not under {path.parent}, e.g. {first}" in err and "--image-root" in err
    broken = {"images": [{**COCO["images"][0], "sentences": [{"tokens": ["a"]}]}], "dataset": "coco"}
    path.write_text(json.dumps(broken))
    assert write("retrieval", path, "--image-root", root, "--out", tmp_path / "o") == 2
    assert "images[0] (COCO_val2014_000000391895.jpg): sentences must be a non-empty list of objects with a string " \
           "'raw'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- trained on ----------------------------------------------------------------------------------------------------

def test_jsonl_gz_text_shards_train_a_language_model(tmp_path):
    docs = [{"text": f"document {i}: the quick brown fox jumps over the lazy dog {i % 3} times."} for i in range(12)]
    (tmp_path / "web.jsonl.gz").write_bytes(gzip.compress(jsonl(docs).encode()))
    assert write("text", tmp_path / "web.jsonl.gz", "--out", tmp_path / "shards") == 0
    run = tmp_path / "run"
    sets = ["train.steps=2", "train.warmup_steps=0", "train.log_every=1", "train.num_workers=0",
            "train.checkpoint_every=2", "task.text.batch_size=4", "task.text.max_len=32", "task.text.shuffle_buffer=4",
            f"task.text.shards=[{tmp_path / 'shards'}]", f"task.eval_shards=[{tmp_path / 'shards'}]"]
    assert main(["pretrain", "--config", "lm/debug", "--run-dir", str(run), "--no-progress",
                 *[f"--set={s}" for s in sets]]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2


def test_karpathy_retrieval_shards_fine_tune_and_evaluate(coco, tmp_path):
    path, root, _ = coco
    assert write("retrieval", path, "--split", "train,restval", "--image-root", root, "--out", tmp_path / "train") == 0
    assert write("retrieval", path, "--split", "test", "--image-root", root, "--out", tmp_path / "test") == 0
    run = tmp_path / "ft"
    sets = ["train.steps=2", "train.warmup_steps=0", "train.log_every=1", "train.num_workers=0",
            "train.checkpoint_every=2", "task.train.batch_size=2", "task.train.shuffle_buffer=4",
            f"task.train.shards=[{tmp_path / 'train'}]", f"task.eval_shards=[{tmp_path / 'test'}]"]
    assert main(["finetune", "--config", "finetune/retrieval_debug", "--run-dir", str(run), "--no-progress",
                 *[f"--set={s}" for s in sets]]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "retrieval" and (results["images"], results["captions"]) == (1, 2)
