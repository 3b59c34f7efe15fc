"""NLVR2: the head against a unilm-style wrapper over torchscale's BEiT3 (converted in and out),
the accuracy by hand, NLVR2's official layout written with the CLI and read back, the bundled
set, and a short fine-tune whose checkpoint evaluates and predicts the same from a fresh start."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import multimodal_moe as mm
from data_pipelines.nlvr2 import NLVR2Batch, nlvr2_image_paths, nlvr2_source
from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter
from data_pipelines.tars import tar_samples
from eval_tasks.beit3_convert import ConversionError, from_beit3, to_beit3
from eval_tasks.nlvr2 import nlvr2_accuracy, nlvr2_baselines
from multimodal_moe.cli import main
from multimodal_moe.training import Checkpoint

from .test_convert import SIZES, inputs, random_, torchscale_beit3, unilm_checkpoint

FAST = ["--set=train.steps=3", "--set=train.warmup_steps=1", "--set=train.log_every=1", "--set=train.num_workers=0",
        "--set=train.checkpoint_every=3", "--set=task.train.batch_size=8", "--set=task.train.shuffle_buffer=20"]


class UnilmTwoLayerMLP(nn.Module):
    """unilm's ``TwoLayerMLP`` (``beit3/modeling_finetune.py``), its names and order."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.norm1, self.dense1 = nn.LayerNorm(in_features), nn.Linear(in_features, hidden_features)
        self.norm2, self.act = nn.LayerNorm(hidden_features), nn.GELU()
        self.dense2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


def unilm_visual_reasoning(beit3: nn.Module, head: nn.Module, image_a, image_b, text, padding):
    """``BEiT3ForVisualReasoning.forward``: both pairs as one batch, [image CLS ; text CLS] per pair."""
    B = text.shape[0]
    out = beit3(textual_tokens=torch.cat([text, text]), visual_tokens=torch.cat([image_a, image_b]),
                text_padding_position=torch.cat([padding, padding]))
    x, split = out["encoder_out"], out["multiway_split_position"]
    a, b = torch.split(torch.cat([x[:, 0, :], x[:, split, :]], dim=-1), [B, B], dim=0)
    return head(torch.cat([a, b], dim=-1))


def _batch(left, right, ids, padding, labels=None) -> NLVR2Batch:
    B = len(ids)
    return NLVR2Batch(keys=[str(i) for i in range(B)], left_images_B3HW=left, right_images_B3HW=right, text_ids_BL=ids,
                      padding_mask_BL=padding, labels_B=torch.zeros(B, dtype=torch.long) if labels is None else labels,
                      identifiers=[f"dev-{i}-0-0" for i in range(B)], templates=[""] * B)


def test_unilm_nlvr2_checkpoint_converts_to_the_same_function_and_back(tmp_path, capsys):
    overrides = SIZES[0]  # unilm's NLVR2 model keeps the final LayerNorm
    dim = overrides["encoder_embed_dim"]
    backbone = torchscale_beit3(**overrides)
    head = random_(UnilmTwoLayerMLP(4 * dim, 2 * dim, 2))
    unilm_checkpoint(tmp_path / "nlvr2.pth", backbone, {"head": head})
    assert main(["convert", "beit3", "--src", str(tmp_path / "nlvr2.pth"), "--dst", str(tmp_path / "ours"),
                 "--heads", "4", "--tokenizer", "bundled:tokenizer.model", "--tokenizer-layout", "auto"]) == 0
    assert "heads: nlvr2" in capsys.readouterr().out
    task = Checkpoint.open(tmp_path / "ours").load_task().eval()
    assert task.cfg.kind == "nlvr2"
    images, ids, padding, _ = inputs(overrides)
    right = images.flip(0) + 0.1
    with torch.no_grad():
        expected = unilm_visual_reasoning(backbone, head, images, right, ids, padding)
        got, _ = task.logits(_batch(images, right, ids, padding))
    assert got.shape == (3, 2) and (got - expected).abs().max() <= 1e-5

    # out again as unilm: the same keys and values (bar the unused position offset rows)
    report = to_beit3(tmp_path / "ours", tmp_path / "again.pth", fmt="unilm")
    assert report.task == "nlvr2" and not report.notes
    again = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    source = torch.load(tmp_path / "nlvr2.pth", weights_only=True)["model"]
    assert set(again) == set(source)
    for k, v in again.items():
        if "embed_positions" in k:
            v, source[k] = v[2:], source[k][2:]
        assert torch.equal(v, source[k]), k

    # a head of another width does not fit the encoder: refused, naming unilm's key
    bad = random_(UnilmTwoLayerMLP(4 * dim, dim, 2))
    unilm_checkpoint(tmp_path / "bad.pth", backbone, {"head": bad})
    with pytest.raises(ConversionError, match="head.dense1.weight"):
        from_beit3(tmp_path / "bad.pth", tmp_path / "bad", heads=4)


def test_accuracy_and_baselines_by_hand():
    report = nlvr2_accuracy([True, False, True, True], [True, True, False, True], ["a", "a", "b", "b"])
    assert report == {"accuracy": 50.0, "statements": 4, "per_template": {"a": 50.0, "b": 50.0}}
    assert "per_template" not in nlvr2_accuracy([False], [False], [""])
    assert nlvr2_baselines([True, False, False]) == {"majority_label": False, "chance_accuracy": 50.0,
                                                     "majority_accuracy": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        nlvr2_accuracy([True, False], [True])


def _png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(out, format="PNG")
    return out.getvalue()


def test_official_layout_is_written_with_the_cli_and_read_back(tmp_path, capsys):
    """NLVR2's train.json (pairs under their directory) and dev.json (pairs at the root)."""
    train = [{"identifier": "train-10171-0-0", "sentence": "One dog.", "label": "True", "directory": 4,
              "writer": "w"},
             {"identifier": "train-10171-0-1", "sentence": "Two dogs.", "label": "False", "directory": 4},
             {"identifier": "train-7-1-0", "sentence": "A cat.", "label": "False", "directory": 0}]
    dev = [{"identifier": "dev-269-0-0", "sentence": "No birds.", "label": "True"}]
    images = {}
    files = {"train": tmp_path / "train.json", "dev": tmp_path / "dev" / "dev.json"}
    for split, records, root in (("train", train, tmp_path / "images" / "train"), ("dev", dev, tmp_path / "dev")):
        root.mkdir(parents=True)
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
        for n, record in enumerate(records):
            for side, path in enumerate(nlvr2_image_paths(root, record)):
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.write_bytes(_png((40 * n, 100 * side, 7)))
                images[record["identifier"], side] = path.read_bytes()
    assert (tmp_path / "images/train/4/train-10171-0-img1.png").is_file()
    assert (tmp_path / "dev/dev-269-0-img0.png").is_file()
    assert main(["data", "write-shards", "nlvr2", str(files["train"]), "--image-root",
                 str(tmp_path / "images" / "train"), "--out", str(tmp_path / "shards" / "train")]) == 0
    assert main(["data", "write-shards", "nlvr2", str(files["dev"]), "--out",
                 str(tmp_path / "shards" / "dev")]) == 0  # images beside the file by default
    for split, records in (("train", train), ("dev", dev)):
        samples = list(tar_samples(shard_urls(str(tmp_path / "shards" / split)), SkipCounter()))
        assert [s["__key__"] for s in samples] == [r["identifier"] for r in records]
        for sample, record in zip(samples, records):
            assert json.loads(sample["json"]) == {"identifier": record["identifier"], "sentence": record["sentence"],
                                                  "label": record["label"] == "True"}
            assert sample["left.png"] == images[record["identifier"], 0]
            assert sample["right.png"] == images[record["identifier"], 1]
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shards" / "train")]) == 0
    out = capsys.readouterr().out
    assert "3 samples in 1 shard(s); checked as nlvr2 shards" in out and "skipped: none" in out
    assert '"left.png": "12x10 RGB"' in out

    (tmp_path / "bad.json").write_text(json.dumps({**dev[0], "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r'bad.json:1: label must be "True" or "False", got \'yes\''):
        list(nlvr2_source(tmp_path / "bad.json"))
    (tmp_path / "lost.json").write_text(json.dumps({**dev[0], "identifier": "dev-1-0-0"}) + "\n")
    assert main(["data", "write-shards", "nlvr2", str(tmp_path / "lost.json"), "--out", str(tmp_path / "x")]) != 0
    assert "dev-1-0-img0.png not found" in capsys.readouterr().err


def test_bundled_set_is_balanced_per_template_and_leak_free():
    from data_pipelines.recipes.nlvr2_data import PAIRS, TEMPLATES

    vqa = {split: {json.loads(s["json"])["image_id"] for s in
                   tar_samples(shard_urls(f"data_pipelines/bundled/vqa/{split}"), SkipCounter())}
           for split in ("train", "val")}
    for split in ("train", "val"):
        records = [json.loads(s["json"]) for s in
                   tar_samples(shard_urls(f"data_pipelines/bundled/nlvr2/{split}"), SkipCounter())]
        assert len(records) == PAIRS[split] * len(TEMPLATES)
        for name in TEMPLATES:
            labels = [r["label"] for r in records if r["template"] == name]
            assert len(labels) == PAIRS[split] and sum(labels) == PAIRS[split] // 2, (split, name)
        assert {r[k] for r in records for k in ("left_image_id", "right_image_id")} <= vqa[split]


def test_finetune_writes_results_that_evaluate_and_predict_the_same_again(tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--config", "finetune/nlvr2_debug", "--run-dir", str(run), "--no-progress", *FAST]) == 0
    assert "evaluation: accuracy" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "nlvr2" and results["statements"] == 144 and len(results["per_template"]) == 8
    assert results["baselines"] == {"majority_label": True, "majority_accuracy": 50.0, "chance_accuracy": 50.0}
    predictions = json.loads((run / "nlvr2_predictions.json").read_text())
    assert len(predictions) == 144 and set(predictions[0]) == {"identifier", "prediction", "p_true", "label"}
    assert 100 * sum(p["prediction"] == p["label"] for p in predictions) / 144 == pytest.approx(results["accuracy"])
    assert (run / "plots" / "nlvr2_accuracy_per_template.png").stat().st_size > 1000

    # a fresh process: the kind is found through its entry point; the numbers are the same
    code = subprocess.run([sys.executable, "-m", "multimodal_moe.cli", "evaluate", "--checkpoint", str(run), "--out",
                           str(tmp_path / "again"), "--no-progress"], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["accuracy"] == results["accuracy"] and again["per_template"] == results["per_template"]

    # inference: raw images and statements, preprocessed as evaluation does
    task = mm.load_checkpoint(run)
    sample = next(tar_samples(shard_urls("data_pipelines/bundled/nlvr2/val"), SkipCounter()))
    record = json.loads(sample["json"])
    [p_true] = task.predict([sample["left.png"]], [Image.open(io.BytesIO(sample["right.png"]))], [record["sentence"]])
    first = next(p for p in predictions if p["identifier"] == record["identifier"])
    assert p_true == pytest.approx(first["p_true"], abs=1e-4)
    assert len(task.predict([sample["left.png"]], [sample["right.png"]], ["Both images show a digit.", "x"])) == 2
    with pytest.raises(ValueError, match="one left and one right image per statement"):
        task.predict([sample["left.png"]] * 2, [sample["right.png"]], ["a", "b", "c"])


def test_the_loss_is_cross_entropy_of_the_pair_logits():
    cfg = mm.load_config("finetune/nlvr2_debug", ["task.train.batch_size=4"])
    task = mm.training.build_task(cfg)
    batch = next(iter(task.train_data(seed=0, num_workers=0)))
    out = task(batch)
    logits, _ = task.logits(batch)
    assert out.parts["nlvr2_loss"].item() == pytest.approx(F.cross_entropy(logits, batch.labels_B).item(), rel=1e-5)
    assert batch.left_images_B3HW.shape == batch.right_images_B3HW.shape == (4, 3, 32, 32)
    assert not torch.equal(batch.left_images_B3HW, batch.right_images_B3HW)
