"""VQAv2 in its official layout: files -> shards with each image stored once -> fine-tuning,
evaluation per answer type, and EvalAI predictions of the label-free test-dev split; the
one-question-per-sample layout of the bundled shards still reads."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import multimodal_moe as mm
from data_pipelines.cli import inspect_shards
from data_pipelines.images import eval_transform, finetune_transform
from data_pipelines.processors import VQAProcessor, read_vqa_questions
from data_pipelines.shards import ShardSink, read_manifest, shard_urls
from data_pipelines.skips import SkipCounter
from data_pipelines.streams import ShardStream, StreamLoader
from data_pipelines.tars import tar_samples
from data_pipelines.tokenizer import Tokenizer
from eval_tasks.evaluate import evaluate_checkpoint
from eval_tasks.vqa_metric import vqa_accuracy, vqa_report
from multimodal_moe.cli import main
from multimodal_moe.tasks import data_path

# (question, answer type, the ten answers) by question kind
KINDS = [("is there a square?", "yes/no", ["yes"] * 9 + ["no"]),
         ("how many dots are there?", "number", ["2"] * 6 + ["3"] * 3 + ["two"]),
         ("what color is the square?", "other", ["red"] * 7 + ["dark red"] * 3),
         ("is this a photo?", "yes/no", ["no"] * 10),
         ("what shape is it?", "other", ["round"] * 5 + ["circle"] * 5)]
SPLITS = {  # subtype -> (image folder, image ids, questions per image, annotated)
    "train2014": ("train2014", [9, 25, 30, 42], 5, True),
    "val2014": ("val2014", [133, 164, 192], 3, True),
    "test-dev2015": ("test2015", [1, 14], 2, False),
}


def jpeg(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def official_files(root, subtype: str) -> tuple:
    """VQAv2's questions (and annotations) files for ``subtype`` in the official structure, and
    the COCO images in ``root/coco/<folder>/``; the questions name the images interleaved."""
    folder, image_ids, per_image, annotated = SPLITS[subtype]
    (root / "coco" / folder).mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        (root / "coco" / folder / f"COCO_{folder}_{image_id:012d}.jpg").write_bytes(jpeg(image_id))
    questions, annotations = [], []
    for k in range(per_image):
        for image_id in image_ids:
            question, answer_type, answers = KINDS[(k + image_id) % len(KINDS)]
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            annotations.append({"question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answers[0],
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(answers)],
                                "image_id": image_id, "answer_type": answer_type, "question_id": qid})
    info = {"description": "tiny VQAv2", "version": "2.0", "year": 2017}
    license_ = {"name": "Creative Commons Attribution 4.0 International License", "url": "https://example.org"}
    qpath = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    qpath.write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                 "license": license_, "data_subtype": subtype, "questions": questions}))
    apath = None
    if annotated:
        apath = root / f"v2_mscoco_{subtype}_annotations.json"
        apath.write_text(json.dumps({"info": info, "license": license_, "data_subtype": subtype,
                                     "annotations": annotations}))
    return qpath, apath, {a["question_id"]: a for a in annotations}


def write_shards(root, subtype: str, out_name: str) -> tuple:
    qpath, apath, annotations = official_files(root, subtype)
    args = ["data", "write-shards", "vqa", str(qpath), "--image-root", str(root / "coco"), "--out",
            str(root / out_name), "--maxcount", "2"]
    assert main(args + (["--annotations", str(apath)] if apath else [])) == 0
    return root / out_name, annotations


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqav2")
    shards = {}
    for subtype, name in (("train2014", "train"), ("val2014", "val"), ("test-dev2015", "testdev")):
        shards[name] = write_shards(root, subtype, name)
    return root, shards


def members(shard_dir) -> list[str]:
    names = []
    for url in shard_urls(str(shard_dir)):
        with tarfile.open(url) as tar:
            names += tar.getnames()
    return names


def test_official_files_become_one_sample_per_image(vqav2):
    root, shards = vqav2
    for name, subtype in (("train", "train2014"), ("val", "val2014"), ("testdev", "test-dev2015")):
        folder, image_ids, per_image, annotated = SPLITS[subtype]
        shard_dir, annotations = shards[name]
        names = members(shard_dir)
        assert sum(n.endswith(".jpg") for n in names) == len(image_ids)  # each image once
        manifest = read_manifest(shard_dir)
        assert manifest["samples"] == len(image_ids) and manifest["shards"] == (len(image_ids) + 1) // 2  # 2 a shard
        samples = list(tar_samples(shard_urls(str(shard_dir)), SkipCounter()))
        assert [s["__key__"] for s in samples] == [f"COCO_{folder}_{i:012d}" for i in image_ids]
        seen = []
        for sample, image_id in zip(samples, image_ids):
            assert sample["jpg"] == (root / "coco" / folder / f"{sample['__key__']}.jpg").read_bytes()
            record = json.loads(sample["json"])
            assert record["image_id"] == image_id and len(record["questions"]) == per_image
            for k, q in enumerate(record["questions"]):
                assert q["question_id"] == image_id * 1000 + k  # an int, in the file's order
                question, answer_type, answers = KINDS[(k + image_id) % len(KINDS)]
                assert q["question"] == question
                if annotated:
                    assert q == {"question_id": q["question_id"], "question": question, "answers": answers,
                                 "question_type": annotations[q["question_id"]]["question_type"],
                                 "answer_type": answer_type}
                else:  # label-free: no answers, no types
                    assert q == {"question_id": q["question_id"], "question": question, "answers": []}
            seen += [q["question_id"] for q in read_vqa_questions(sample)]
        assert sorted(seen) == sorted(i * 1000 + k for i in image_ids for k in range(per_image))
        report = inspect_shards([str(shard_dir)])
        assert report["kind"] == "vqa" and report["skipped"] == {}


def test_images_stored_once_take_a_fraction_of_the_bytes(vqav2, tmp_path):
    """The same 4 images x 5 questions (64 x 64 JPEGs) in one tar each way: one sample per
    question, the image copied into each (the layout before), and one sample per image."""
    root, shards = vqav2
    samples = list(tar_samples(shard_urls(str(shards["train"][0])), SkipCounter()))
    with ShardSink(tmp_path / "per_question", "vqa") as per_question, \
            ShardSink(tmp_path / "per_image", "vqa") as per_image:
        for sample in samples:
            record = json.loads(sample["json"])
            per_image.write(sample["__key__"], {"jpg": sample["jpg"], "json": record})
            for q in record["questions"]:
                per_question.write(f"q{q['question_id']}", {"jpg": sample["jpg"],
                                                            "json": {**q, "image_id": record["image_id"]}})
    old, new = ((tmp_path / name / "shard-000000.tar").stat().st_size for name in ("per_question", "per_image"))
    print(json.dumps({"images": 4, "questions": 20, "jpeg_bytes": sum(len(s["jpg"]) for s in samples),
                      "one_question_per_sample": old, "one_image_per_sample": new}))
    assert 3 * new < old  # 5 questions an image: towards 5x as images outweigh the tar headers and json
    def questions(name):
        return [q for s in tar_samples(shard_urls(str(tmp_path / name)), SkipCounter()) for q in read_vqa_questions(s)]

    assert questions("per_question") == questions("per_image")  # the same questions either way


def test_bad_official_files_are_clear_errors(tmp_path, capsys):
    qpath, apath, _ = official_files(tmp_path, "val2014")
    out = ["--out", str(tmp_path / "o"), "--image-root", str(tmp_path / "coco")]
    assert main(["data", "write-shards", "vqa", str(qpath), *out]) == 2
    assert "pass that with --annotations" in capsys.readouterr().err
    assert main(["data", "write-shards", "vqa", str(apath), *out]) == 2
    assert "is a VQAv2 annotations file" in capsys.readouterr().err
    train_q, train_a, _ = official_files(tmp_path, "train2014")
    assert main(["data", "write-shards", "vqa", str(qpath), "--annotations", str(train_a), *out]) == 2
    assert "annotates 'train2014'" in capsys.readouterr().err
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000164.jpg").unlink()
    assert main(["data", "write-shards", "vqa", str(qpath), "--annotations", str(apath), *out]) == 2
    err = capsys.readouterr().err
    assert "1 of the 3 images" in err and "COCO_val2014_000000000164.jpg (image_id 164)" in err
    assert "--image-pattern" in err
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": "a.jpg", "question": "q?", "answers": ["a"]}) + "\n")
    assert main(["data", "write-shards", "vqa", str(tmp_path / "vqa.jsonl"), "--annotations", str(apath), *out]) == 2
    assert "read as JSON-lines VQA records" in capsys.readouterr().err
    assert main(["data", "write-shards", "image_text", str(tmp_path / "vqa.jsonl"), "--annotations", str(apath),
                 *out]) == 2
    assert "--annotations: not an option of image_text shards" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_image_pattern_reads_another_layout(tmp_path):
    qpath, apath, _ = official_files(tmp_path, "val2014")
    flat = tmp_path / "flat"
    flat.mkdir()
    for image_id in SPLITS["val2014"][1]:
        (tmp_path / "coco" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg").rename(flat / f"{image_id}.jpg")
    assert main(["data", "write-shards", "vqa", str(qpath), "--annotations", str(apath), "--image-root", str(flat),
                 "--image-pattern", "{image_id}.jpg", "--out", str(tmp_path / "o")]) == 0
    assert read_manifest(tmp_path / "o")["samples"] == 3


def test_jsonl_records_are_grouped_by_image(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        (tmp_path / "imgs" / f"{name}.jpg").write_bytes(jpeg(ord(name)))
    rows = [{"image": "imgs/a.jpg", "question": "what?", "answers": ["one"] * 10, "question_id": 7},
            {"image": "imgs/b.jpg", "question": "and?", "answers": ["two"] * 10, "answer_type": "number"},
            {"image": "imgs/a.jpg", "question": "why?", "answers": ["three"] * 10, "question_type": None}]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "write-shards", "vqa", str(tmp_path / "vqa.jsonl"), "--out", str(tmp_path / "o")]) == 0
    samples = list(wds.WebDataset(str(tmp_path / "o" / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["imgs_a", "imgs_b"]
    assert json.loads(samples[0]["json"]) == {"image_id": "a", "questions": [
        {"question_id": 7, "question": "what?", "answers": ["one"] * 10, "question_type": "", "answer_type": ""},
        {"question_id": 3, "question": "why?", "answers": ["three"] * 10, "question_type": "", "answer_type": ""}]}
    assert json.loads(samples[1]["json"])["questions"][0]["answer_type"] == "number"


# --- streams: an image's questions split across batches, resumed inside an image ---------------

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(data_path("bundled:tokenizer.model"))


def write_grouped(path, counts: list[int], maxcount: int = 3):
    """Images with ``counts[i]`` questions each (ids 100 i + k)."""
    with ShardSink(path, "vqa", maxcount=maxcount) as sink:
        for i, n in enumerate(counts):
            kinds = [KINDS[(i + k) % len(KINDS)] for k in range(n)]
            questions = [{"question_id": 100 * i + k, "question": question, "answers": answers, "answer_type": type_}
                         for k, (question, type_, answers) in enumerate(kinds)]
            sink.write(f"img{i:03d}", {"jpg": jpeg(i), "json": {"image_id": i, "questions": questions}})
    return path


COUNTS = [5, 1, 4, 2, 7, 3, 1, 6, 2, 3]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_vqa_stream_continues_inside_an_image(tmp_path, tokenizer, workers):
    path = write_grouped(tmp_path / "vqa", COUNTS)
    processor = VQAProcessor(tokenizer, finetune_transform(16), answer_vocab={"yes": 0, "no": 1, "2": 2},
                             view_per_question=True)

    def loader():
        return StreamLoader(ShardStream(path, processor, batch_size=3, epoch_batches=4, shuffle_buffer=4, seed=5),
                            num_workers=workers)

    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(it) for _ in range(7)]  # into the next epoch
    assert any(b.position[-1] > 0 for b in head)  # some batch ended inside an image's questions
    assert all(len(b) == 3 for b in head + expected)  # training batches are full: leftovers wait, never spill
    epochs = Counter((b.position[0], b.position[1]) for b in head + expected)
    assert all(n == 4 for (_, epoch), n in epochs.items() if epoch == 0)
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it) for _ in range(7)]
    for a, b in zip(got, expected):
        assert a.question_ids == b.question_ids and a.keys == b.keys
        assert torch.equal(a.images_B3HW, b.images_B3HW) and torch.equal(a.text_ids_BL, b.text_ids_BL)
        assert torch.equal(a.targets_BA, b.targets_BA)
    assert all(isinstance(q, int) for b in got for q in b.question_ids)
    # an image's questions see different crops in training, one image in evaluation
    by_key = {}
    for b in head + expected:
        for key, x in zip(b.keys, b.images_B3HW):
            by_key.setdefault(key, []).append(x)
    assert any(not torch.equal(xs[0], xs[1]) for xs in by_key.values() if len(xs) > 1)


def test_evaluation_sees_each_question_once_across_ranks_and_workers(tmp_path, tokenizer, monkeypatch):
    path = write_grouped(tmp_path / "vqa", COUNTS)
    processor = VQAProcessor(tokenizer, eval_transform(16))
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for batch in StreamLoader(ShardStream(path, processor, batch_size=4, resampled=False), num_workers=2):
            seen += batch.question_ids
            assert all(torch.equal(batch.images_B3HW[i], batch.images_B3HW[j]) for i in range(len(batch))
                       for j in range(len(batch)) if batch.keys[i] == batch.keys[j])
    assert sorted(seen) == sorted(100 * i + k for i, n in enumerate(COUNTS) for k in range(n))


def test_the_bundled_one_question_layout_reads_as_before(tokenizer):
    val = str(data_path("bundled:vqa/val"))
    raw = [json.loads(s["json"]) for s in tar_samples(shard_urls(val), SkipCounter())]
    batches = list(StreamLoader(ShardStream(val, VQAProcessor(tokenizer, eval_transform(16)), batch_size=64,
                                            resampled=False)))
    assert [len(b) for b in batches][:-1] == [64] * (len(batches) - 1)  # one question per sample, as before
    assert [q for b in batches for q in b.question_ids] == [r["question_id"] for r in raw]
    assert [a for b in batches for a in b.answers] == [r["answers"] for r in raw]
    assert [t for b in batches for t in b.question_types] == [r["question_type"] for r in raw]
    assert len(raw) == 472 and all(isinstance(r["question_id"], int) for r in raw)
    first = next(tar_samples(shard_urls(val), SkipCounter()))
    assert read_vqa_questions(first) == [{k: raw[0][k] for k in ("question_id", "question", "answers",
                                                                  "question_type")}]


# --- metrics and the fine-tune -> evaluate -> EvalAI path --------------------------------------

def test_accuracy_per_answer_type_by_hand():
    predictions = ["yes", "no", "2", "red", "cat"]
    answers = [["yes"] * 10,  # 1
               ["yes"] * 10,  # 0
               ["2"] * 2 + ["3"] * 8,  # 2 annotators: (2 x 1/3 + 8 x 2/3) / 10 = 0.6
               ["red"] * 3 + ["blue"] * 7,  # 3 annotators: (3 x 2/3 + 7 x 1) / 10 = 0.9
               ["cat"] * 10]  # 1, with no answer type
    report = vqa_report(predictions, answers, ["is", "is", "how many", "what color", "what"],
                        ["yes/no", "yes/no", "number", "other", ""])
    assert report["vqa_accuracy"] == pytest.approx(70.0)
    assert report["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 90.0})
    assert report["per_question_type"] == pytest.approx({"how many": 60.0, "is": 50.0, "what": 100.0,
                                                         "what color": 90.0})
    with pytest.raises(ValueError, match="5 predictions for 5 questions and 5 question types and 4 answer types"):
        vqa_report(predictions, answers, ["x"] * 5, ["x"] * 4)


FAST = ["--set=train.steps=2", "--set=train.warmup_steps=0", "--set=train.log_every=1",
        "--set=train.num_workers=0", "--set=train.checkpoint_every=2", "--set=task.train.batch_size=4",
        "--set=task.train.shuffle_buffer=4", "--set=task.eval_batch_size=4"]


def test_finetune_then_evaluate_per_answer_type_and_predict_test_dev(vqav2, tmp_path, capsys):
    root, shards = vqav2
    (train, _), (val, val_annotations), (testdev, _) = shards["train"], shards["val"], shards["testdev"]
    run = tmp_path / "ft"
    assert main(["finetune", "--config", "finetune/vqa_debug", "--run-dir", str(run), "--no-progress",
                 f"--set=task.train.shards=[{train}]", f"--set=task.eval_shards=[{val}]", *FAST]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["questions"] == 9 and set(results["per_answer_type"]) == {"yes/no", "number", "other"}
    predictions = json.loads((run / "vqa_predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == sorted(val_annotations)  # ints, by id
    by_type = {}
    for p in predictions:  # the breakdown, recomputed from the predictions file and the annotations
        annotation = val_annotations[p["question_id"]]
        by_type.setdefault(annotation["answer_type"], []).append(
            vqa_accuracy(p["answer"], [a["answer"] for a in annotation["answers"]]))
    assert results["per_answer_type"] == pytest.approx({t: 100 * sum(v) / len(v) for t, v in by_type.items()})

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{testdev}]", "--no-progress",
                 "--out", str(tmp_path / "no")]) == 2
    assert "pass --predict" in capsys.readouterr().err
    out = tmp_path / "testdev"
    assert main(["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{testdev}]", "--predict",
                 "--no-progress", "--out", str(out)]) == 0
    submission = json.loads((out / "vqa_predictions.json").read_text())
    _, image_ids, per_image, _ = SPLITS["test-dev2015"]
    assert [p["question_id"] for p in submission] == sorted(i * 1000 + k for i in image_ids for k in range(per_image))
    assert all(type(p["question_id"]) is int and isinstance(p["answer"], str) and set(p) == {"question_id", "answer"}
               for p in submission)
    tested = json.loads((out / "results.json").read_text())
    assert tested["label_free"] and tested["questions"] == 4 and "vqa_accuracy" not in tested
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{val},{testdev}]", "--predict",
                 "--no-progress", "--out", str(tmp_path / "mixed")]) == 2
    assert "4 of the 13 questions" in capsys.readouterr().err

    both = tmp_path / "val_predict"  # --predict on a labelled split: the predictions and the accuracy
    assert main(["evaluate", "--checkpoint", str(run), "--predict", "--no-progress", "--out", str(both)]) == 0
    again = json.loads((both / "results.json").read_text())
    assert again["vqa_accuracy"] == results["vqa_accuracy"] and again["per_answer_type"] == results["per_answer_type"]
    assert json.loads((both / "vqa_predictions.json").read_text()) == predictions


def test_predict_is_refused_for_tasks_without_label_free_splits(tmp_path):
    with pytest.raises(ValueError, match="the retrieval task scores labelled data only: drop --predict"):
        evaluate_checkpoint(None, mm.load_config("finetune/retrieval_debug"), tmp_path, predict=True)
