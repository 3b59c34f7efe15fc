"""Fine-tuning tasks end to end: from a pretraining checkpoint of any FFN kind, or from random
weights, to results.json."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import multimodal_moe as mm
from eval_tasks.vqa import build_answer_vocab
from eval_tasks.vqa_metric import normalize_answer
from multimodal_moe.cli import main
from multimodal_moe.training import build_task

FAST = ["--set=train.steps=3", "--set=train.warmup_steps=1", "--set=train.log_every=1", "--set=train.num_workers=0",
        "--set=train.checkpoint_every=3"]
VQA_FAST = [*FAST, "--set=task.train.batch_size=8", "--set=task.train.shuffle_buffer=20"]


def test_answer_vocabulary_is_normalised_and_ordered():
    vocab = build_answer_vocab(["bundled:vqa/train"], 1)
    assert vocab[:2] == ["no", "yes"] and "four" not in vocab and "4" in vocab
    assert all(normalize_answer(a) == a for a in vocab)
    assert len(build_answer_vocab(["bundled:vqa/train"], 20)) < len(vocab)


def test_vqa_loss_is_bce_summed_over_answers_and_averaged_over_the_batch():
    cfg = mm.load_config("finetune/vqa_debug", ["task.train.batch_size=4"])
    task = build_task(cfg)
    batch = next(iter(task.train_data(seed=0, num_workers=0)))
    out = task(batch)
    logits, _ = task.logits(batch)
    p, y = logits.sigmoid(), batch.targets_BA
    manual = -(y * p.log() + (1 - y) * (1 - p).log()).sum() / len(batch)
    assert out.parts["vqa_loss"] == pytest.approx(manual.item(), rel=1e-4)
    assert set(y.unique().tolist()) <= {0.0, 0.3, 0.6, 0.9, 1.0} and (y > 0).any()


def test_vqa_head_learns_at_its_own_rate(tmp_path):
    from multimodal_moe.training import Trainer

    trainer = Trainer(mm.load_config("finetune/vqa_debug", ["train.num_workers=0"]), tmp_path, progress=False)
    scales = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(trainer.task.named_parameters())
    assert scales[id(params["head.3.weight"])] == 20.0 and scales[id(params["pooler.1.weight"])] == 20.0
    assert scales[id(params["model.text_embed.tokens.weight"])] == 1.0


@pytest.mark.parametrize("pretrain_preset", [None, "beit3/mhmoe_debug"])
def test_vqa_finetune_writes_results(tmp_path, capsys, pretrain_preset):
    init = []
    if pretrain_preset is not None:  # a pretraining checkpoint of another FFN kind than the finetune preset's
        assert main(["pretrain", "--config", pretrain_preset, "--run-dir", str(tmp_path / "pre"), "--no-progress",
                     *FAST, "--set=task.image.batch_size=8", "--set=task.text.batch_size=8",
                     "--set=task.image_text.batch_size=8"]) == 0
        init = ["--init", str(tmp_path / "pre")]
    run = tmp_path / "ft"
    assert main(["finetune", "--config", "finetune/vqa_debug", "--run-dir", str(run), "--no-progress", *init,
                 *VQA_FAST]) == 0
    assert "vqa_accuracy" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "vqa" and results["questions"] == 472
    assert 0 <= results["vqa_accuracy"] <= 100 and len(results["per_question_type"]) == 7
    assert results["baselines"]["majority_answer"] == "no"
    predictions = json.loads((run / "vqa_predictions.json").read_text())
    assert len(predictions) == 472 and set(predictions[0]) == {"question_id", "answer"}
    assert (run / "plots" / "vqa_accuracy_per_type.png").stat().st_size > 1000
    if pretrain_preset is not None:
        from multimodal_moe.training import Trainer

        pretrained = mm.load_checkpoint(tmp_path / "pre")
        assert mm.load_checkpoint(run).model.cfg == pretrained.cfg  # the model came from the checkpoint
        cfg = mm.load_config("finetune/vqa_debug", ["train.num_workers=0"])
        start = Trainer(mm.Config(model=pretrained.cfg, task=cfg.task, train=cfg.train), tmp_path / "start",
                        progress=False, init=tmp_path / "pre").task.model.state_dict()
        assert all(torch.equal(start[k], v) for k, v in pretrained.state_dict().items())

    # evaluate again from the checkpoint alone: the same numbers
    assert main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["vqa_accuracy"] == results["vqa_accuracy"] and again["eval_shards"] == ["bundled:vqa/val"]
    # --set applies to the checkpoint's own config: another split is scored, and says so
    assert main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "train"), "--no-progress",
                 "--set", "task.eval_shards=[bundled:vqa/train]"]) == 0
    on_train = json.loads((tmp_path / "train" / "results.json").read_text())
    assert on_train["eval_shards"] == ["bundled:vqa/train"] and on_train["questions"] != results["questions"]
    assert main(["evaluate", "--checkpoint", str(run), "--set", "task.eval_shard=[x]"]) == 2
    assert "task.eval_shard" in capsys.readouterr().err
    # the checkpoint holds its head's answer list: a config whose training shards would give
    # another vocabulary (here the held-out split's) still scores with the checkpoint's
    from multimodal_moe.training import Checkpoint

    answers = Checkpoint.open(run).config.task.answers
    assert list(answers) == build_answer_vocab(["bundled:vqa/train"], 1)
    assert build_answer_vocab(["bundled:vqa/val"], 1) != list(answers)
    assert main(["evaluate", "--checkpoint", str(run), "--config", "finetune/vqa_debug", "--no-progress",
                 "--set", "task.train.shards=[bundled:vqa/val]", "--out", str(tmp_path / "other")]) == 0
    other = json.loads((tmp_path / "other" / "results.json").read_text())
    assert other["vqa_accuracy"] == results["vqa_accuracy"]


def test_evaluate_refuses_a_checkpoint_without_the_task_head(tmp_path, capsys):
    assert main(["pretrain", "--config", "beit3/debug", "--run-dir", str(tmp_path), "--no-progress", *FAST,
                 "--set=task.image.batch_size=8", "--set=task.text.batch_size=8",
                 "--set=task.image_text.batch_size=8"]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--config", "finetune/vqa_debug"]) == 2
    assert "fine-tune it first" in capsys.readouterr().err


def test_clip_loss_against_a_loop():
    from eval_tasks.retrieval import clip_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor([2.0])
    terms = []
    for i in range(6):
        logits_i = scale.exp() * img[i] @ txt.t()
        logits_t = scale.exp() * txt[i] @ img.t()
        terms.append((-logits_i.log_softmax(0)[i] - logits_t.log_softmax(0)[i]) / 2)
    assert clip_loss(img, txt, scale).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_chance_recall_matches_random_rankings():
    from eval_tasks.retrieval import chance_recall

    owner = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    g = torch.Generator().manual_seed(0)
    from eval_tasks.retrieval_metric import retrieval_recall

    runs = [retrieval_recall(torch.randn(4, 32, generator=g), torch.randn(10, 32, generator=g), owner, ks=(1, 2))
            for _ in range(3000)]
    expected = chance_recall(owner, 4, ks=(1, 2))
    for key in ("i2t_r1", "i2t_r2", "t2i_r1", "t2i_r2"):
        assert sum(r[key] for r in runs) / len(runs) == pytest.approx(expected[key], abs=2.5)


def test_retrieval_finetune_writes_results(tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--config", "finetune/retrieval_debug", "--run-dir", str(run), "--no-progress",
                 *VQA_FAST]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "retrieval" and (results["images"], results["captions"]) == (266, 849)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"):
        assert 0 <= results[key] <= 100
    assert results["i2t_r1"] <= results["i2t_r5"] <= results["i2t_r10"]
    assert results["baselines"]["chance"]["t2i_r1"] == pytest.approx(100 / 266)
    assert (run / "plots" / "retrieval_recall.png").stat().st_size > 1000


def test_lm_perplexity_and_multiple_choice_against_a_token_loop(tmp_path):
    from eval_tasks.lm_eval import multiple_choice, perplexity

    task = build_task(mm.load_config("lm/debug"))
    model, tok = task.model.eval(), task.tokenizer
    docs = ["the quick brown fox jumps over the lazy dog. " * 5, "def f(x):\n    return x"]
    got = perplexity(model, tok, docs, seq_len=16, batch_size=3)
    nll, count = 0.0, 0
    for doc in docs:  # one token at a time, each window from its start
        ids = [*tok.encode(doc), tok.eos_id]
        for start in range(0, len(ids) - 1, 16):
            window = ids[start:start + 17]
            for t in range(1, len(window)):
                logits = model.logits(model(torch.tensor([window[:t]])).hidden)[0, -1]
                nll -= logits.log_softmax(-1)[window[t]].item()
                count += 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / torch.log(torch.tensor(2.0)).item() /
                                                 sum(len(d.encode()) for d in docs), rel=1e-4)

    items = [{"context": "one two three", "choices": ["four", "banana split", "five six"], "label": 0},
             {"context": "red green", "choices": ["blue", "seven"], "label": 1}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    expected = 0
    for item in items:
        prefix = [tok.bos_id, *tok.encode(item["context"])]
        means = []
        for choice in item["choices"]:
            ids = prefix + tok.encode(choice)
            logp = model.logits(model(torch.tensor([ids[:-1]])).hidden)[0].log_softmax(-1)
            picked = [logp[t - 1, ids[t]].item() for t in range(len(prefix), len(ids))]
            means.append(sum(picked) / len(picked))
        expected += max(range(len(means)), key=means.__getitem__) == item["label"]
    assert multiple_choice(model, tok, path)["accuracy"] == pytest.approx(100 * expected / len(items))
    path.write_text(json.dumps({"context": "x", "choices": ["a"], "label": 3}))
    with pytest.raises(ValueError, match="label 3"):
        multiple_choice(model, tok, path)


@pytest.mark.parametrize("preset, overrides", [("lm/mot_debug", []),
                                               ("lm/openmoe_debug", ["model.moe_ffn.eval_capacity_factor=0.5"])])
def test_lm_scores_ignore_padding_and_fill_mixture_of_tokens_groups(preset, overrides):
    """Before: a MoT model failed on a batch of 9 rows (groups of 2), and padding was mixed into
    real tokens (MoT) or took expert capacity (capacity-limited top-k)."""
    from eval_tasks.lm_eval import _token_logprobs, perplexity

    task = build_task(mm.load_config(preset, overrides))
    model, tok = task.model.eval(), task.tokenizer
    rows = [[tok.bos_id, *tok.encode(text)] for text in ("one two three four five", "red", "the lazy dog")]
    scores = [_token_logprobs(model, rows, pad_id) for pad_id in (tok.pad_id, 7, 1234)]
    for other in scores[1:]:  # what fills the padding changes nothing
        assert all(torch.equal(a, b) for a, b in zip(scores[0], other))
    assert [len(s) for s in scores[0]] == [len(r) - 1 for r in rows]
    got = perplexity(model, tok, ["the quick brown fox jumps over the lazy dog. " * 9], seq_len=8, batch_size=3)
    assert got["tokens"] > 0 and math.isfinite(got["perplexity"])


@pytest.mark.parametrize("preset", ["lm/debug", "lm/mot_debug"])  # MoT: the last batch was not a whole group
def test_evaluate_an_lm_checkpoint(tmp_path, capsys, preset):
    assert main(["pretrain", "--config", preset, "--run-dir", str(tmp_path), "--no-progress", *FAST,
                 "--set=task.text.batch_size=8"]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "lm" and results["documents"] == 46 and results["tokens"] > 1000
    assert 1 < results["perplexity"] < 2e4 and 0 < results["bits_per_byte"] < 20


def test_per_language_perplexity_is_the_perplexity_of_each_language_alone():
    from eval_tasks.lm_eval import perplexity, read_documents_and_languages

    task = build_task(mm.load_config("lm/multilingual_debug"))
    model, tok = task.model.eval(), task.tokenizer
    docs, langs = read_documents_and_languages(["bundled:multilingual/val"])
    documents = [doc[:600] for doc, lang in zip(docs, langs) if lang in ("en", "zh", "ar")] + ["no language"]
    languages = [lang for lang in langs if lang in ("en", "zh", "ar")] + [None]
    got = perplexity(model, tok, documents, seq_len=32, batch_size=5, languages=languages)
    assert list(got["per_language"]) == ["en", "ar", "zh"]  # in the order they first occur; None left out
    for lang, scores in got["per_language"].items():
        alone = perplexity(model, tok, [d for d, other in zip(documents, languages) if other == lang], seq_len=32,
                           batch_size=5)
        assert scores["documents"] == alone["documents"] == 2 and scores["tokens"] == alone["tokens"]
        for key in ("perplexity", "bits_per_byte"):
            assert scores[key] == pytest.approx(alone[key], rel=1e-5), (lang, key)
    unlabelled = perplexity(model, tok, documents, seq_len=32, batch_size=5)
    assert "per_language" not in unlabelled
    assert unlabelled["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
    with pytest.raises(ValueError, match="one per document"):
        perplexity(model, tok, documents, seq_len=32, languages=languages[:-1])


def test_evaluate_scores_a_multilingual_checkpoint_per_language_on_its_own_val_split(tmp_path, capsys):
    assert main(["pretrain", "--config", "lm/mhmoe_multilingual_debug", "--run-dir", str(tmp_path), "--no-progress",
                 *FAST, "--set=task.text.batch_size=8"]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["documents"] == 30 and "expert_usage" in results
    assert list(results["per_language"]) == ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh",
                                             "hi", "sw", "ur"]
    assert all(s["documents"] == 2 and s["tokens"] > 1000 for s in results["per_language"].values())
    assert sum(s["tokens"] for s in results["per_language"].values()) == results["tokens"]


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    assert main(["demo", "--run-dir", str(tmp_path), "--pretrain-steps", "3", "--finetune-steps", "3",
                 "--tasks", "vqa,classification", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["vqa"]["questions"] == 472 and demo["classification_random_init"]["images"] == 319
    assert [r["task"] for r in demo["rows"]] == ["vqa", "classification"]
    vqa = demo["rows"][0]
    assert vqa["pretrained"] == demo["vqa"]["vqa_accuracy"] and vqa["random_init"] == demo["vqa_random_init"][
        "vqa_accuracy"]
    assert lines[2].startswith(f"| VQA accuracy | {vqa['pretrained']:.1f} | {vqa['random_init']:.1f} | majority answer")
    assert lines[3].startswith("| classification top-1 |")
    for stage in ("pretrain", "vqa", "vqa_random_init", "classification", "classification_random_init"):
        assert (tmp_path / stage / "checkpoints" / "latest" / "model.safetensors").is_file()
    assert mm.load_checkpoint(tmp_path / "vqa").model.cfg == mm.load_checkpoint(tmp_path / "pretrain").cfg
    # the random start is the same architecture, not the pretrained weights
    pretrained, scratch = mm.load_checkpoint(tmp_path / "vqa"), mm.load_checkpoint(tmp_path / "vqa_random_init")
    assert pretrained.model.cfg == scratch.model.cfg
    a, b = pretrained.model.state_dict(), scratch.model.state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    assert main(["demo", "--tasks", "vqa,ocr", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "unknown demo tasks ['ocr']" in capsys.readouterr().err
    assert main(["demo", "--tasks", "vqa,nlvr2,vqa", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "demo tasks named twice: ['vqa']" in capsys.readouterr().err


def test_a_finetune_takes_the_architecture_from_its_init_checkpoint_and_the_runtime_fields_from_its_config(
        tmp_path):
    from multimodal_moe.training import Checkpoint, save_checkpoint

    pretrain = mm.load_config("beit3/debug")
    save_checkpoint(tmp_path, 1, task=build_task(pretrain), state={}, cfg=pretrain)
    asked = mm.load_config("finetune/vqa_debug", ["model.drop_path=0.1", "model.grad_checkpointing=true"])
    cfg = Checkpoint.open(tmp_path).finetune_config(asked)
    assert cfg.model == dataclasses.replace(pretrain.model, drop_path=0.1, grad_checkpointing=True)
    assert cfg.model.moe_ffn is None and asked.model.moe_ffn is not None  # dense, as pretrained
    assert cfg.task == asked.task and cfg.train == asked.train
    # and a run starts from it: the weights are the checkpoint's, drop path as asked
    from multimodal_moe.training import Trainer

    trainer = Trainer(cfg, tmp_path / "run", progress=False, init=tmp_path)
    assert trainer.task.model.cfg.drop_path == 0.1
    start = trainer.task.model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in Checkpoint.open(tmp_path).weights().items())
    trainer.close()
    # the trainer adopts it itself: given the config as asked and the path, the same run
    adopting = Trainer(asked, tmp_path / "adopting", progress=False, init=tmp_path)
    assert adopting.cfg.model == cfg.model
    assert all(torch.equal(v, start[k]) for k, v in adopting.task.model.state_dict().items())
    adopting.close()


def test_a_finetune_at_a_larger_image_size_resizes_the_pretrained_vision_positions(tmp_path, capsys):
    """BEiT-3 fine-tunes at 384 / 480 px what it pretrained at 224: the config's image size
    applies, and the position table is resized (bicubic, the CLS row kept); the rest loads as is."""
    from multimodal_moe.models.beit3_weights import resize_vision_positions
    from multimodal_moe.training import Checkpoint, CheckpointError, Trainer, save_checkpoint

    pretrain = mm.load_config("beit3/debug")  # 32 px, 8 px patches: a 4 x 4 grid
    save_checkpoint(tmp_path, 1, task=build_task(pretrain), state={}, cfg=pretrain)
    saved = Checkpoint.open(tmp_path).weights()
    trainer = Trainer(mm.load_config("finetune/vqa_debug", ["model.image_size=48"]), tmp_path / "run",
                      progress=False, init=tmp_path)
    assert trainer.cfg.model.image_size == 48
    err = capsys.readouterr().err
    assert "training at 48 px what" in err and "resized from 4^2 to 6^2 patches" in err
    loaded = trainer.task.model.state_dict()
    table = loaded["vision_embed.pos_embed"]
    assert table.shape == (1, 1 + 6 * 6, 64) and saved["vision_embed.pos_embed"].shape == (1, 17, 64)
    torch.testing.assert_close(table, resize_vision_positions(saved["vision_embed.pos_embed"], 6))
    assert torch.equal(table[:, 0], saved["vision_embed.pos_embed"][:, 0])
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k != "vision_embed.pos_embed")
    trainer.train_step([next(iter(trainer.data))])  # 48 px images through it
    trainer.close()
    with pytest.raises(CheckpointError, match="does not fit the model"):  # elsewhere loading stays strict
        Checkpoint.open(tmp_path).load_model_into(mm.build_model(mm.load_config("beit3/debug",
                                                                                 ["model.image_size=48"])))


@pytest.mark.parametrize("preset", ["finetune/vqa_debug", "finetune/retrieval_debug", "beit3/debug", "lm/debug"])
def test_a_tokenizer_with_more_ids_than_the_embedding_is_a_config_error(preset):
    cfg = mm.load_config(preset, ["model.vocab_size=1000"])
    with pytest.raises(mm.ConfigError, match="has 4096 ids but the model's text embedding only 1000 rows"):
        build_task(cfg)


@pytest.mark.parametrize("preset", ["finetune/vqa_debug", "beit3/debug", "lm/debug"])
def test_a_tokenizer_with_fewer_ids_than_the_embedding_is_named_before_training(preset):
    cfg = mm.load_config(preset, ["model.vocab_size=5000"])
    with pytest.warns(UserWarning, match=r"4096 ids but the model's text embedding 5000 rows: rows 4096\.\.4999 "
                                         r"are never used; set model.vocab_size=4096"):
        build_task(cfg)
