"""Transition tuning end to end: a trained Mixture-of-Tokens run converted into a top-k MoE run
(``mmoe convert mot-to-topk``), every weight where it belongs, then trained on with
``mmoe pretrain --init``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import multimodal_moe as mm
from eval_tasks.lm_eval import perplexity, read_documents
from multimodal_moe.cli import main
from multimodal_moe.training import build_task
from multimodal_moe.training.checkpoint import Checkpoint, save_checkpoint

LM = ["train.num_workers=0", "train.warmup_steps=2", "train.log_every=5", "train.checkpoint_every=100",
      "task.text.batch_size=8", "task.text.max_len=64", "task.text.shuffle_buffer=50"]


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def mot_keys(state: dict) -> set[str]:
    return {k for k in state if ".controller_DE" in k or ".log_temperature" in k}


def check_converted(source: Checkpoint, converted: Checkpoint, top_k: int) -> None:
    """Every weight of ``source`` in ``converted``: MoT controllers over their temperature as
    routers, the experts and all else bitwise."""
    old, new = source.weights(), converted.weights()
    controllers = sorted(k for k in old if k.endswith(".controller_DE"))
    assert controllers
    for key in controllers:
        layer = key.removesuffix(".controller_DE")
        temperature = old[f"{layer}.log_temperature"].exp()
        torch.testing.assert_close(new[f"{layer}.router.weight_ED"], old[key].t() / temperature, rtol=0, atol=0)
    rest = set(old) - mot_keys(old)
    assert set(new) - rest == {k.replace(".controller_DE", ".router.weight_ED") for k in controllers}
    assert all(torch.equal(old[k], new[k]) for k in rest)
    assert source.weights("heads.safetensors").keys() == converted.weights("heads.safetensors").keys()
    moe = converted.config.model.moe_ffn
    assert (moe.kind, moe.top_k, moe.renormalize, moe.router) == ("topk_moe", top_k, top_k > 1, "softmax")
    assert converted.training_state()["step"] == source.training_state()["step"]


def test_a_trained_mot_lm_converts_and_trains_on(tmp_path, capsys):
    mot_run, topk_run, tuned = tmp_path / "mot", tmp_path / "topk", tmp_path / "tuned"
    assert main(["pretrain", "--config", "lm/mot_debug", "--run-dir", str(mot_run), "--no-progress",
                 *sets(*LM, "train.steps=80")]) == 0
    assert main(["convert", "mot-to-topk", str(mot_run), "--dst", str(topk_run)]) == 0
    assert f"mmoe pretrain --init {topk_run}" in capsys.readouterr().out
    source, converted = Checkpoint.open(mot_run), Checkpoint.open(topk_run)
    check_converted(source, converted, top_k=1)

    # the converted model is the trained one, not a fresh top-k model: far better held-out text
    documents = read_documents(["bundled:text/val"])[:12]
    task = build_task(converted.config)
    converted.load_task_weights(task)
    fresh = build_task(converted.config)
    ours = perplexity(task.model, task.tokenizer, documents, seq_len=64)["perplexity"]
    untrained = perplexity(fresh.model, fresh.tokenizer, documents, seq_len=64)["perplexity"]
    assert ours < untrained / 4, (ours, untrained)  # measured: 80 steps, about 1/10

    # --init takes the converted config and weights; a new run from step 0 that trains on
    assert main(["pretrain", "--init", str(topk_run), "--run-dir", str(tuned), "--no-progress",
                 *sets("train.steps=10")]) == 0
    assert "--init: backbone and heads from" in capsys.readouterr().err
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    first_fresh = main(["pretrain", "--config", str(converted.path / "config.yaml"), "--run-dir",
                        str(tmp_path / "fresh"), "--no-progress", *sets("train.steps=5")])
    assert first_fresh == 0
    fresh_loss = json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert records[0]["loss"] < fresh_loss - 1.0, (records[0]["loss"], fresh_loss)
    assert Checkpoint.open(tuned).config.model.moe_ffn.kind == "topk_moe"

    # the converted dir holds no optimizer state: --resume says to use --init
    assert main(["pretrain", "--run-dir", str(topk_run), "--resume", "--no-progress"]) == 1
    assert "start a new run from it with --init" in capsys.readouterr().err


def test_a_multiway_mot_converts_every_branch_with_top2_settings(tmp_path):
    cfg = mm.load_config("beit3/mot_debug")
    task = build_task(cfg)
    save_checkpoint(tmp_path / "mot" / "checkpoints", 7, task=task, state={}, cfg=cfg)
    assert main(["convert", "mot-to-topk", str(tmp_path / "mot"), "--dst", str(tmp_path / "topk"), "--top-k", "2",
                 "--set", "capacity_factor=1.25"]) == 0
    converted = Checkpoint.open(tmp_path / "topk")
    check_converted(Checkpoint.open(tmp_path / "mot"), converted, top_k=2)
    assert converted.config.model.moe_ffn.capacity_factor == 1.25
    branches = {k.split(".")[3] for k in load_file(converted.path / "model.safetensors") if ".router." in k}
    assert branches == set(cfg.model.moe_branches)


def test_conversion_errors_name_the_problem(tmp_path, capsys):
    cfg = mm.load_config("lm/debug")
    save_checkpoint(tmp_path / "dense" / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    assert main(["convert", "mot-to-topk", str(tmp_path / "dense"), "--dst", str(tmp_path / "x")]) == 2
    assert "has no Mixture-of-Tokens FFN" in capsys.readouterr().err
    cfg = mm.load_config("lm/mot_debug")
    save_checkpoint(tmp_path / "mot" / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    assert main(["convert", "mot-to-topk", str(tmp_path / "mot"), "--dst", str(tmp_path / "y"),
                 "--set", "experts=3"]) == 2
    assert "experts" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["convert", "mot-to-topk", str(tmp_path / "mot"), "--dst", str(tmp_path / "mot")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_config_keeps_the_experts(top_k):
    from multimodal_moe.transition import topk_config

    cfg = topk_config(mm.load_config("lm/mot_debug"), top_k)
    mot = mm.load_config("lm/mot_debug").model.moe_ffn
    assert (cfg.model.moe_ffn.hidden_dim, cfg.model.moe_ffn.num_experts, cfg.model.moe_ffn.activation) == (
        mot.hidden_dim, mot.num_experts, mot.activation)


@pytest.mark.parametrize("answers, loaded", [(("one", "two", "three"), True), (("three", "two", "one"), False)])
def test_init_takes_a_vqa_head_only_with_its_answer_list(tmp_path, capsys, answers, loaded):
    """A VQA head of the same shape over another answer list (or order) means other answers: the
    new run keeps its fresh head and takes the backbone alone."""
    from multimodal_moe.training import Trainer

    saved = mm.load_config("finetune/vqa_debug", ["task.answers=[one,two,three]", "seed=5"])  # other weights
    task = build_task(saved)
    start = save_checkpoint(tmp_path / "vqa" / "checkpoints", 1, task=task, state={}, cfg=saved)
    cfg = mm.load_config("finetune/vqa_debug", [f"task.answers=[{','.join(answers)}]", "train.num_workers=0"])
    with Trainer(cfg, tmp_path / "run", progress=False, init=start) as trainer:
        heads = {n: p for n, p in trainer.task.named_parameters() if n.startswith("head.") and p.dim() > 1}
        assert heads and all(torch.equal(p, task.get_parameter(n)) is loaded for n, p in heads.items())
        assert torch.equal(trainer.task.model.text_embed.tokens.weight, task.model.text_embed.tokens.weight)
    assert f"--init: {'backbone and heads' if loaded else 'backbone'} from" in capsys.readouterr().err
