"""Image classification: the unilm ImageNet head against a unilm-style wrapper over torchscale's
BEiT3, top-k metrics by hand, image folders in ImageNet's layout (read directly and written as
shards), seeded Mixup / CutMix, and a short fine-tune -> results.json -> ``mmoe evaluate`` in a
fresh process -> ``mmoe predict``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import multimodal_moe as mm
from data_pipelines.sources import class_images
from eval_tasks.beit3_convert import ConversionError, from_beit3, to_beit3
from eval_tasks.classification import classification_baselines, top_k_accuracy
from eval_tasks.classification_inputs import ClassificationTrainTransform, MixupCutmix
from multimodal_moe.cli import main
from multimodal_moe.configurable import ConfigError
from multimodal_moe.training import Checkpoint, build_task
from tests.test_convert import SIZES, inputs, random_, torchscale_beit3, unilm_checkpoint

FAST = ["--set=train.steps=3", "--set=train.warmup_steps=1", "--set=train.log_every=1", "--set=train.num_workers=0",
        "--set=train.checkpoint_every=3", "--set=task.train.batch_size=8", "--set=task.train.shuffle_buffer=20",
        "--set=task.mixup=0.8", "--set=task.cutmix=1.0"]
DEBUG = "finetune/classification_debug"


def test_top_k_accuracy_and_baselines_by_hand():
    ranked = [[2, 0, 1], [1, 2, 0], [0, 1, 2], [2, 1, 0]]
    labels = [2, 2, 1, 0]
    # top-1: only the first row is right; top-2: all but the last; top-3: all
    assert top_k_accuracy(ranked, labels, ks=(1, 2, 3)) == {"top1": 25.0, "top2": 75.0, "top3": 100.0}
    baselines = classification_baselines(labels, ["a", "b", "c"], ks=(1, 2))
    # class 2 holds half the labels; the two most frequent (2, then 1 or 0) three quarters
    assert baselines == {"majority_class": "c", "majority_top1": 50.0, "chance_top1": 100 / 3,
                         "majority_top2": 75.0, "chance_top2": 200 / 3}
    assert classification_baselines([0], ["a", "b"], ks=(5,))["chance_top5"] == 100.0  # k beyond C


def test_mixup_cutmix_is_deterministic_under_the_seed_and_its_targets_sum_to_one():
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mix = MixupCutmix(num_classes=5, mixup=0.8, cutmix=1.0, smoothing=0.1, erasing=0.25)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    a_images, a_targets = mix(images, labels, seed=7)
    b_images, b_targets = mix(images, labels, seed=7)
    assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    assert (random.getstate(), torch.random.get_rng_state().tolist()) == (before[0], before[2].tolist())
    assert np.array_equal(np.random.get_state()[1], before[1])  # the global RNGs are left as they were
    assert torch.equal(images, torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))  # not in place
    assert torch.allclose(a_targets.sum(1), torch.ones(8)) and (a_targets > 0).all()  # smoothed: no zero
    # other seeds mix otherwise; each target mixes a row's label with its mirror row's, one lambda a batch
    draws = [mix(images, labels, seed=s) for s in range(6)]
    assert any(not torch.equal(d[0], a_images) for d in draws)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    for _, targets in draws:
        lam = (targets[0, 0].item() - 0.1 / 5) / 0.9  # row 0 is class 0, its mirror (row 7) class 2
        expected = (lam * one_hot + (1 - lam) * one_hot.flip(0)) * 0.9 + 0.1 / 5
        assert torch.allclose(targets, expected, atol=1e-6) and torch.allclose(targets.sum(1), torch.ones(8))
    # smoothing alone: the label gets 1 - 0.1 + 0.1 / C
    plain = MixupCutmix(num_classes=5, mixup=0, cutmix=0, smoothing=0.1, erasing=0)
    out, targets = plain(images, labels, seed=0)
    assert torch.equal(out, images) and torch.allclose(targets[torch.arange(8), labels], torch.full((8,), 0.92))
    with pytest.raises(ValueError, match="even batch"):
        mix(images[:7], labels[:7], seed=0)


def test_the_train_transform_draws_from_its_rng_alone():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    transform = ClassificationTrainTransform(24, scale=(0.08, 1.0), rand_augment="rand-m9-mstd0.5-inc1",
                                             mean=(0.5,) * 3, std=(0.5,) * 3)
    first = transform.pixels(image, random.Random(3))
    random.random(), np.random.rand()  # the global RNGs moving on changes nothing
    assert first.shape == (3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(transform.pixels(image, random.Random(3)), first)
    assert any(not torch.equal(transform.pixels(image, random.Random(s)), first) for s in range(4))
    for seed in range(200):  # magnitudes clamped at 10 once asked Pillow for a 0-bit posterize
        transform.pixels(image, random.Random(seed))


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """ImageNet's layout: root/<class>/<n>.JPEG, each class a colour, one image nested deeper."""
    colours = {"dog": (200, 40, 40), "cat": (40, 200, 40), "bird": (40, 40, 200)}
    for name, n in counts.items():
        for i in range(n):
            folder = root / name / ("nested" if i == n - 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i, 16), colours[name]).save(folder / f"{name}_{i}.JPEG")
    (root / next(iter(counts)) / "notes.txt").write_text("not an image")
    return root


def test_image_folders_read_directly_and_written_as_shards_give_the_same_evaluation(tmp_path, capsys):
    train = image_folder(tmp_path / "train", {"dog": 3, "cat": 3, "bird": 2})
    val = image_folder(tmp_path / "val", {"dog": 2, "cat": 2})
    listed = class_images(train)
    assert [(p.relative_to(train).as_posix(), c) for p, c in listed][:4] == [
        ("bird/bird_0.JPEG", 0), ("bird/nested/bird_1.JPEG", 0), ("cat/cat_0.JPEG", 1), ("cat/cat_1.JPEG", 1)]
    with pytest.raises(ValueError, match=r"class folders \['dog'\] are not among the 1 classes"):
        class_images(image_folder(tmp_path / "odd", {"dog": 1}), ["cat"])

    assert main(["data", "write-shards", "classification", str(val), "--out", str(tmp_path / "val_shards")]) == 0
    assert main(["data", "inspect", str(tmp_path / "val_shards")]) == 0
    out = capsys.readouterr().out
    assert "4 samples" in out and "checked as classification shards" in out and "skipped: none" in out

    overrides = [f"task.train.shards=[folder:{train}]", f"task.eval_shards=[folder:{val}]", "task.train.batch_size=4",
                 "task.eval_batch_size=3", "train.num_workers=0"]
    cfg = mm.load_config(DEBUG, overrides)
    cfg.task.check_data()
    task = build_task(cfg)
    assert task.classes == ["bird", "cat", "dog"]  # train's folders, sorted
    batch = next(iter(task.train_data(seed=0, num_workers=0)))
    assert batch.images_B3HW.shape == (4, 3, 32, 32) and torch.allclose(batch.targets_BC.sum(1), torch.ones(4))
    again = next(iter(task.train_data(seed=0, num_workers=0)))
    assert batch.keys == again.keys and torch.equal(batch.images_B3HW, again.images_B3HW)
    from_folder = task.evaluate(None)
    assert from_folder["images"] == 4 and from_folder["classes"] == 3
    task.cfg = mm.load_config(DEBUG, [*overrides, f"task.eval_shards=[{tmp_path / 'val_shards'}]"]).task
    from_shards = task.evaluate(None)
    assert from_shards == from_folder

    with pytest.raises(FileNotFoundError, match="image folder .*nowhere not found"):
        mm.load_config(DEBUG, ["task.eval_shards=[folder:/nowhere]"]).task.check_data()
    with pytest.raises(ConfigError, match="mixes image folders"):
        mm.load_config(DEBUG, [f"task.train.shards=[folder:{train},bundled:classification/train]"])


def test_the_bundled_split_has_its_19_classes():
    task = build_task(mm.load_config(DEBUG, ["train.num_workers=0"]))
    assert len(task.classes) == 19 and task.classes[:3] == ["activities", "animals & nature", "digit 0"]
    assert task.resolved_config().classes == tuple(task.classes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cls") / "run"
    assert main(["finetune", "--config", DEBUG, "--run-dir", str(run), "--no-progress", *FAST]) == 0
    return run


def test_finetune_writes_results_and_a_fresh_process_evaluates_them_the_same(run, tmp_path):
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "classification" and results["images"] == 319 and results["classes"] == 19
    assert 0 <= results["top1"] <= results["top5"] <= 100
    assert results["baselines"]["majority_class"] == "people & body"
    assert results["baselines"]["chance_top1"] == pytest.approx(100 / 19)
    predictions = json.loads((run / "classification_predictions.json").read_text())
    assert len(predictions) == 319 and set(predictions[0]) == {"key", "label", "top5"}
    assert (run / "plots" / "classification_accuracy_per_class.png").stat().st_size > 1000
    assert Checkpoint.open(run).config.task.classes[:2] == ("activities", "animals & nature")

    proc = subprocess.run([sys.executable, "-m", "multimodal_moe.cli", "evaluate", "--checkpoint", str(run),
                           "--out", str(tmp_path / "again"), "--no-progress"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["top1"] == results["top1"] and again["top5"] == results["top5"]


def test_mmoe_predict_prints_the_top_classes_of_an_image(run, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--top-k", "3"]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    classes = mm.load_checkpoint(run).classes
    assert len(line["classes"]) == 3 and all(c["class"] in classes for c in line["classes"])
    probabilities = [c["probability"] for c in line["classes"]]
    assert probabilities == sorted(probabilities, reverse=True)
    task = mm.load_checkpoint(run)
    batch = next(iter(task.eval_batches()))  # the first held-out image, as evaluation scores it
    from tests.test_inference import _first_sample

    sample = _first_sample("classification/val")
    with torch.no_grad():
        expected = task.logits(batch.images_B3HW[:1])[0][0].softmax(-1).topk(2)
    best = task.predict([sample["png"]], top_k=2)[0]
    assert [c for c, _ in best] == [task.classes[i] for i in expected.indices.tolist()]
    assert main(["predict", "--checkpoint", str(run), "--image", str(image), "--question", "what?"]) == 2
    assert "reads the image alone; it takes no --question" in capsys.readouterr().err


def unilm_imagenet(dim: int, classes: int) -> dict[str, nn.Module]:
    """unilm's BEiT3ForImageClassification heads: fc_norm over the mean patch token, then head."""
    return {"fc_norm": random_(nn.LayerNorm(dim)), "head": random_(nn.Linear(dim, classes))}


def test_unilm_imagenet_checkpoint_converts_to_the_classification_head_and_back(tmp_path):
    overrides = SIZES[1]  # unilm's ImageNet model has no final LayerNorm (normalize_output=False)
    dim = overrides["encoder_embed_dim"]
    backbone = torchscale_beit3(**overrides)
    heads = unilm_imagenet(dim, 7)
    unilm_checkpoint(tmp_path / "in1k.pth", backbone, heads)
    names = [f"n0{i}" for i in range(7)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")

    report = from_beit3(tmp_path / "in1k.pth", tmp_path / "ours", heads=3, answers=tmp_path / "classes.txt")
    assert report.task == "classification" and not report.not_converted
    assert not any("tokenizer" in n for n in report.notes)  # it reads no text
    checkpoint = Checkpoint.open(tmp_path / "ours")
    assert checkpoint.config.task.classes == tuple(names) and not checkpoint.config.model.normalize_output
    task = checkpoint.load_task().eval()
    images = inputs(overrides)[0]
    with torch.no_grad():
        expected = heads["head"](heads["fc_norm"](backbone(visual_tokens=images)["encoder_out"][:, 1:].mean(1)))
        got, _ = task.logits(images)
    assert (got - expected).abs().max() <= 1e-5

    # without the names: class_0 ...; a list of the wrong length is refused
    assert from_beit3(tmp_path / "in1k.pth", tmp_path / "unnamed", heads=3).task == "classification"
    assert Checkpoint.open(tmp_path / "unnamed").config.task.classes[-1] == "class_6"
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ConversionError, match="7 classes, the class list .* 3"):
        from_beit3(tmp_path / "in1k.pth", tmp_path / "bad", heads=3, answers=tmp_path / "three.txt")

    # out again as unilm: the same keys and values, and the class names beside it
    to_beit3(tmp_path / "ours", tmp_path / "again.pth", fmt="unilm")
    again = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    source = torch.load(tmp_path / "in1k.pth", weights_only=True)["model"]
    assert set(again) == set(source)
    for k, v in again.items():
        if "embed_positions" in k:
            v, source[k] = v[2:], source[k][2:]
        assert torch.equal(v, source[k]), k
    assert (tmp_path / "again.pth.classes.txt").read_text().split() == names
    back = from_beit3(tmp_path / "again.pth", tmp_path / "back", heads=3, answers=tmp_path / "again.pth.classes.txt")
    assert back.task == "classification" and Checkpoint.open(tmp_path / "back").config.task.classes == tuple(names)
