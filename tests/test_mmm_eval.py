"""Held-out masked data modeling (``MaskedDataModeling.evaluate``): each part is the training
loss of the held-out batches, a mean over all masked positions however they are batched, the
same masks every time, Mixture-of-Tokens batches filled without scoring the filling, and
``mmoe evaluate`` of a pretraining checkpoint reports it with the expert usage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import multimodal_moe as mm
from data_pipelines.mixer import PretrainStep
from data_pipelines.streams import ShardStream, StreamLoader
from multimodal_moe.cli import main
from data_pipelines.paths import data_path
from multimodal_moe.tasks.mmm import PARTS, _filled
from multimodal_moe.training import build_task
from multimodal_moe.training.checkpoint import save_checkpoint

WHOLE_SPLIT = 512  # more than any bundled val split holds: one batch per stream


def task_of(preset: str = "beit3/debug", *overrides: str):
    return build_task(mm.load_config(preset, list(overrides))).eval()


def whole_split_batches(task) -> PretrainStep:
    """Each stream's held-out split as one batch, made as evaluate makes it."""
    batches = {}
    for name, processor in task._processors().items():
        stream = ShardStream([str(data_path(s)) for s in getattr(task.cfg.eval_shards, name)], processor,
                             batch_size=WHOLE_SPLIT, resampled=False, shuffle_buffer=0)
        (batches[name],) = list(StreamLoader(stream))
    return PretrainStep(0, **batches)


def test_each_part_is_the_training_loss_of_the_held_out_split():
    task = task_of("beit3/debug", f"task.eval_batch_size={WHOLE_SPLIT}", "task.loss_weights.text=0.5")
    report = task.evaluate()
    step = whole_split_batches(task)
    with torch.no_grad():
        parts = task(step).parts
    for part in PARTS:
        assert report[f"{part}_loss"] == pytest.approx(float(parts[f"{part}_loss"]), rel=1e-5), part
        assert report[f"{part}_acc"] == pytest.approx(float(parts[f"{part}_acc"]), abs=1e-6), part
    assert report["samples"] == {name: len(b) for name, b in step.batches().items()}
    assert report["masked"]["image_mim"] == int(step.image.image_mask_BP.sum())
    assert report["masked"]["text_mlm"] == int((step.text.mlm_labels_BL != -100).sum())
    assert report["loss"] == pytest.approx(report["image_mim_loss"] + 0.5 * report["text_mlm_loss"]
                                           + report["image_text_mim_loss"] + report["image_text_mlm_loss"])
    assert task.evaluate() == report  # the same masks and crops every time


def test_image_parts_are_the_mean_over_all_masked_patches_however_batched():
    # image crops and masks are drawn per sample, so small batches hold the same masked patches,
    # in unequal numbers per batch: a mean of batch means would differ (text masks are drawn per
    # batch, and an image-text pair's patches attend to its text, so only images alone compare)
    task = task_of("beit3/debug", f"task.eval_batch_size={WHOLE_SPLIT}")
    whole = task.evaluate()
    task.cfg = dataclasses.replace(task.cfg, eval_batch_size=7)
    small = task.evaluate()
    assert small["masked"]["image_text_mim"] == whole["masked"]["image_text_mim"]
    assert small["masked"]["image_mim"] == whole["masked"]["image_mim"]
    assert small["image_mim_loss"] == pytest.approx(whole["image_mim_loss"], rel=1e-6)
    assert small["image_mim_acc"] == pytest.approx(whole["image_mim_acc"], abs=1e-6)


def test_a_stream_the_task_leaves_out_is_not_scored():
    report = task_of("beit3/debug", "task.image=null", "task.image_text=null").evaluate()
    assert set(report["masked"]) == {"text_mlm"} and set(report["samples"]) == {"text"}
    assert report["loss"] == report["text_mlm_loss"] and "image_mim_loss" not in report


def test_filled_batches_repeat_their_first_rows():
    step = whole_split_batches(task_of("beit3/debug", "task.text=null", "task.image_text=null"))
    batch = step.image  # 24 images
    filled = _filled(batch, 5)
    assert filled.images_B3HW.shape[0] == 25 and torch.equal(filled.images_B3HW[24], batch.images_B3HW[0])
    assert torch.equal(filled.image_mask_BP[:24], batch.image_mask_BP)
    assert _filled(batch, 4) is batch


def test_a_mixture_of_tokens_model_scores_short_batches_on_the_masks_a_dense_one_sees():
    # group_size 2 and batches of 5: each is filled to 6 with a repeat that is not scored
    mot = task_of("beit3/mot_debug", "task.eval_batch_size=5").evaluate()
    dense = task_of("beit3/debug", "task.eval_batch_size=5").evaluate()
    assert mot["masked"] == dense["masked"] and mot["samples"] == dense["samples"]
    assert all(torch.isfinite(torch.tensor(mot[f"{part}_loss"])) for part in PARTS)


def test_a_missing_held_out_split_is_named_before_training(tmp_path):
    cfg = mm.load_config("beit3/debug", [f"task.eval_shards.image=['{tmp_path}/nowhere']"])
    with pytest.raises(FileNotFoundError, match=r"task\.eval_shards\.image: .*nowhere"):
        cfg.task.check_data()


def test_evaluate_a_pretraining_checkpoint(tmp_path, capsys):
    cfg = mm.load_config("beit3/xmoe_debug")
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    assert "loss" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "mmm" and results["loss"] > 0
    usage = results["expert_usage"]["layers"]
    assert set(usage) == {"layer2.vision", "layer2.text"}
    # top-1: every image patch (CLS included) and every real text token is routed once
    assert usage["layer2.vision"]["assignments"] == sum(results["samples"][s] for s in ("image", "image_text")) * 17
    assert (tmp_path / "run" / "plots" / "expert_usage.png").is_file()
