"""Inference with fine-tuned checkpoints: ``mm.load_checkpoint`` gives the task, whose
``predict`` / ``encode_image`` / ``encode_text`` / ``rank`` preprocess raw inputs exactly as
evaluation does, and ``mmoe predict`` on top."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

import multimodal_moe as mm
from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter
from data_pipelines.tars import tar_samples
from multimodal_moe.cli import main
from multimodal_moe.training import build_task
from multimodal_moe.training.checkpoint import save_checkpoint


DROPLESS = ["model.moe_ffn.capacity_factor=null"]  # tokens dropped at capacity would depend on the batch


def _saved(tmp_path, preset: str, overrides: list[str]):
    """A checkpoint of ``preset``'s task with fresh weights (inference does not care how they came)."""
    cfg = mm.load_config(preset, [*DROPLESS, *overrides])
    save_checkpoint(tmp_path / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    return tmp_path


def _first_sample(split: str) -> dict:
    return next(tar_samples(shard_urls(f"data_pipelines/bundled/{split}"), SkipCounter()))


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("vqa"), "finetune/vqa_debug", [])


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("retrieval"), "finetune/retrieval_debug", [])


def test_a_fine_tuned_checkpoint_loads_as_its_task_and_predicts_as_evaluation_scores(vqa_run):
    task = mm.load_checkpoint(vqa_run)
    assert type(task).__name__ == "VQA" and not task.training
    sample = _first_sample("vqa/val")
    question = json.loads(sample["json"])["question"]
    image = sample.get("jpg", sample.get("png"))
    batch = next(iter(task.eval_batches()))  # evaluation's first batch starts with the same sample
    pixels, (ids, padding) = task.pixels([image]), task.token_ids([question])
    assert torch.equal(pixels[0], batch.images_B3HW[0])
    assert torch.equal(ids[0], batch.text_ids_BL[0][~batch.padding_mask_BL[0]]) and not padding.any()
    with torch.no_grad():
        expected = task.logits(batch)[0][0].sigmoid()
    best = task.predict([image], [question], top_k=3)[0]
    assert [a for a, _ in best] == [task.answers[i] for i in expected.topk(3).indices.tolist()]
    assert [p for _, p in best] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)
    # a path, bytes and a PIL image are the same image
    decoded = Image.open(io.BytesIO(image))
    assert torch.equal(task.pixels([decoded])[0], pixels[0])
    with pytest.raises(ValueError, match="one image per question"):
        task.predict([image, image], ["a?", "b?", "c?"])


def test_retrieval_encodes_images_and_texts_as_evaluation_does(retrieval_run, tmp_path):
    task = mm.load_checkpoint(retrieval_run)
    sample = _first_sample("retrieval/val")
    captions = json.loads(sample["json"])["captions"]
    image = sample.get("jpg", sample.get("png"))
    batch = next(iter(task.eval_batches()))
    with torch.no_grad():
        image_E = task.image_features(batch.images_B3HW)[0][0]
        text_NE = task.text_features(batch.text_ids_NL, batch.padding_mask_NL)[0][batch.caption_image_N == 0]
    assert torch.allclose(task.encode_image([image])[0], image_E, atol=1e-5)
    assert torch.allclose(task.encode_text(captions), text_NE, atol=1e-5)
    ranked = task.rank(image, [*captions, "an unrelated sentence"])
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and len(ranked) == len(captions) + 1
    path = tmp_path / "x.png"
    path.write_bytes(image)
    assert main(["predict", "--checkpoint", str(retrieval_run), "--image", str(path), "--captions", *captions,
                 "--top-k", "2"]) == 0


def test_mmoe_predict_answers_questions_and_refuses_the_wrong_inputs(vqa_run, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    assert main(["predict", "--checkpoint", str(vqa_run), "--image", str(image), "--question", "what color?",
                 "--question", "how many?", "--top-k", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["question"] for x in lines] == ["what color?", "how many?"]
    answers = mm.load_checkpoint(vqa_run).answers
    assert all(len(x["answers"]) == 2 and all(a["answer"] in answers for a in x["answers"]) for x in lines)
    assert main(["predict", "--checkpoint", str(vqa_run), "--image", str(image), "--captions", "a cat"]) == 2
    assert "takes --question, not --captions" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert main(["predict", "--checkpoint", str(vqa_run), "--image", str(tmp_path / "bad.jpg"),
                 "--question", "what?"]) == 2
    assert "bad.jpg" in capsys.readouterr().err


def test_mmoe_predict_refuses_a_pretraining_checkpoint(tmp_path, capsys):
    cfg = mm.load_config("beit3/debug")
    save_checkpoint(tmp_path / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    assert type(mm.load_checkpoint(tmp_path)).__name__ == "MultiwayEncoder"
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", "--checkpoint", str(tmp_path), "--image", str(image), "--question", "what?"]) == 2
    assert "not a fine-tuned task" in capsys.readouterr().err


def test_mmoe_predict_captions_an_image_and_judges_statements_about_a_pair(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    captioning = _saved(tmp_path / "captioning", "finetune/captioning_debug", [])
    assert main(["predict", "--checkpoint", str(captioning), "--image", str(image)]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(line) == {"caption"} and isinstance(line["caption"], str)
    assert line["caption"] == mm.load_checkpoint(captioning).caption([image])[0]
    assert main(["predict", "--checkpoint", str(captioning), "--image", str(image), "--question", "what?"]) == 2
    assert "reads the image alone; it takes no --question" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(captioning), "--image", str(image), "--image", str(image)]) == 2
    assert "a captioning checkpoint reads 1 image; got 2" in capsys.readouterr().err
    # NLVR2: a pair of images, left then right, and statements about them
    nlvr2 = _saved(tmp_path / "nlvr2", "finetune/nlvr2_debug", [])
    right = tmp_path / "y.png"
    Image.new("RGB", (30, 30), (20, 30, 220)).save(right)
    assert main(["predict", "--checkpoint", str(nlvr2), "--image", str(image), "--statement", "both are red"]) == 2
    assert "reads 2 images (--image LEFT --image RIGHT); got 1" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(nlvr2), "--image", str(image), "--image", str(right), "--statement",
                 "both are red", "--statement", "the left one is red"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    p_true = mm.load_checkpoint(nlvr2).predict([image], [right], ["both are red", "the left one is red"])
    assert lines == [{"statement": s, "prediction": p >= 0.5, "p_true": p}
                     for s, p in zip(["both are red", "the left one is red"], p_true)]
