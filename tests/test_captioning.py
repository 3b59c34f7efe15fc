"""The captioning task: unilm's captioning attention mask against a hand-built oracle and torchscale,
beam search against exhaustive enumeration, the COCO metrics on hand-computed cases, and the unilm
``mlm_head`` conversion both ways."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import multimodal_moe as mm
from eval_tasks.beit3_convert import from_beit3, to_beit3
from eval_tasks.caption_metric import METRICS
from eval_tasks.captioning import beam_search, greedy_search, smoothed_cross_entropy
from multimodal_moe.cli import main
from multimodal_moe.layers.attention import attend
from multimodal_moe.layers.multiway import route
from multimodal_moe.models.multiway_encoder import captioning_mask
from multimodal_moe.training import Checkpoint, build_task

from .test_convert import SIZES, inputs, random_, torchscale_beit3, unilm_checkpoint


def test_captioning_mask_is_unilms_uni_mask():
    V, L = 3, 4
    expected = torch.zeros(V + L, V + L, dtype=torch.bool)
    for q in range(V + L):
        for k in range(V + L):
            expected[q, k] = k < V or (q >= V and k <= q)  # image keys for all; text keys up to the query
    assert torch.equal(captioning_mask(V, L), expected)


def _slow_attention(q, k, v, allowed_BTT):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed_BTT[:, None], float("-inf")), dim=-1) @ v


def test_attend_with_an_arbitrary_mask_and_padding_matches_the_slow_oracle():
    g = torch.Generator().manual_seed(0)
    B, H, T, d, V = 3, 2, 7, 8, 3
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -2:] = True
    padding[2, V + 1:] = True
    allowed = captioning_mask(V, T - V)
    got = attend(q, k, v, key_padding_mask_BT=padding, allowed_TT=allowed, backend="sdpa")
    assert (got - _slow_attention(q, k, v, allowed & ~padding[:, None, :])).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="excludes causal"):
        attend(q, k, v, allowed_TT=allowed, causal=True)


@pytest.mark.parametrize("layout", ["decoupled", "paper"])
def test_text_causal_encoder_matches_an_explicit_mask_oracle(layout):
    """The encoder with ``text_causal`` equals running its blocks with the mask built by hand, and a
    caption token's state does not depend on later caption tokens."""
    cfg = mm.load_config("beit3/debug").model
    overrides = {"layout": layout, **({"vl_ffn_layers": 1} if layout == "paper" else {})}
    model = dataclasses.replace(cfg, **overrides).build().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, 100, (2, 6), generator=g)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with torch.no_grad():
        got = model(images=images, text_ids=ids, text_padding_mask=padding, text_causal=True).hidden
        changed = ids.clone()
        changed[:, 4:] = 7
        later = model(images=images, text_ids=changed, text_padding_mask=padding, text_causal=True).hidden
        P = model.cfg.num_patches + 1
        assert (got[:, :P + 4] - later[:, :P + 4]).abs().max() <= 1e-6  # image and the first 4 tokens
        full = model(images=images, text_ids=ids, text_padding_mask=padding).hidden
        assert (got[:, :P] - full[:, :P]).abs().max() > 1e-4  # the image no longer sees the text
        # the oracle: the same blocks given the hand-built mask
        x = torch.cat([model.vision_embed(images, None),
                       model.text_embed(ids).masked_fill(padding[..., None], 0.0)], dim=1)
        hand = torch.tensor([[k < P or (P <= k <= q) for k in range(P + 6)] for q in range(P + 6)])
        token_mask = torch.cat([torch.ones(2, P, dtype=torch.bool), ~padding], dim=1)
        for block in model.layers:
            x, _, _ = block(x, num_vision=P, token_mask_BT=token_mask, allowed_TT=hand)
        x = route(model.final_norm, x, P)
    assert (got - x).abs().max() <= 1e-5


def test_text_causal_matches_torchscale_given_unilms_attn_mask(tmp_path):
    overrides = SIZES[0]
    theirs = torchscale_beit3(**overrides)
    torch.save(theirs.state_dict(), tmp_path / "beit3.pt")
    from_beit3(tmp_path / "beit3.pt", tmp_path / "ours", heads=overrides["encoder_attention_heads"])
    ours = mm.load_checkpoint(tmp_path / "ours").eval()
    images, ids, padding, _ = inputs(overrides)
    P = ours.cfg.num_patches + 1
    uni_mask = (~captioning_mask(P, ids.shape[1])).long()  # unilm: 1 marks what is hidden
    with torch.no_grad():
        expected = theirs(textual_tokens=ids, visual_tokens=images, text_padding_position=padding,
                          attn_mask=uni_mask)["encoder_out"]
        got = ours(images=images, text_ids=ids, text_padding_mask=padding, text_causal=True).hidden
    assert (got - expected).abs().max() <= 1e-5


# -- decoding ----------------------------------------------------------------------------------------

PAD, EOS, A, B = 0, 1, 2, 3  # a 4-token vocabulary; bos is PAD's id (it is only ever the first input)


def tiny_scorer(seed: int):
    """Fixed next-token log-probabilities for each prefix (pad never), drawn from ``seed``."""
    table = {}

    def next_logprobs(prefix_NL):
        rows = []
        for prefix in map(tuple, prefix_NL.tolist()):
            if prefix not in table:
                g = torch.Generator().manual_seed(hash((seed, prefix)) % 2 ** 31)
                logits = torch.randn(4, generator=g) * 2
                logits[PAD] = float("-inf")
                table[prefix] = F.log_softmax(logits, -1)
            rows.append(table[prefix])
        return torch.stack(rows)

    return next_logprobs


def exhaustive_best(next_logprobs, max_new: int, length_penalty: float) -> list[int]:
    """Every sequence of words then eos (at most ``max_new`` tokens), or ``max_new`` words."""
    best, best_score = None, float("-inf")
    for n in range(max_new + 1):
        for words in itertools.product([A, B], repeat=n):
            seq = list(words) + ([EOS] if n < max_new else [])
            if not seq:
                continue
            logp = sum(next_logprobs(torch.tensor([[PAD, *seq[:i]]]))[0, t].item() for i, t in enumerate(seq))
            score = logp / len(seq) ** length_penalty
            if score > best_score:
                best, best_score = list(words), score
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_beam_search_with_enough_beams_finds_the_best_sequence(seed, length_penalty):
    scorer = tiny_scorer(seed)
    got = beam_search(scorer, 1, bos=PAD, eos=EOS, pad=PAD, max_new=3, num_beams=16, length_penalty=length_penalty)
    assert got == [exhaustive_best(scorer, 3, length_penalty)]


@pytest.mark.parametrize("seed", range(6))
def test_one_beam_is_greedy(seed):
    scorers = [tiny_scorer(seed), tiny_scorer(seed + 100)]

    def batched(prefix_NL):  # two rows with different scorers: rows are independent
        return torch.cat([scorers[i](prefix_NL[i:i + 1]) for i in range(len(prefix_NL))])

    greedy = greedy_search(batched, 2, bos=PAD, eos=EOS, max_new=5)
    assert beam_search(batched, 2, bos=PAD, eos=EOS, pad=PAD, max_new=5, num_beams=1) == greedy


def test_smoothed_cross_entropy_is_unilms_kl_plus_its_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets, eps = torch.randn(5, 7, generator=g), torch.tensor([0, 3, 6, 2, 2]), 0.1
    one_hot = F.one_hot(targets, 7).float()
    smoothed = one_hot * (1 - eps) + (1 - one_hot) * eps / 6
    kl = F.kl_div(F.log_softmax(logits, 1), smoothed, reduction="none").sum(1).mean()
    entropy = -(smoothed * smoothed.log()).sum(1).mean()
    assert torch.allclose(smoothed_cross_entropy(logits, targets, eps), kl + entropy, atol=1e-6)


# -- metrics -----------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


@needs_java
def test_caption_scores_on_hand_computed_cases():
    from eval_tasks.caption_metric import _METEOR, caption_scores, caption_scores_of_sets

    refs = {"a": ["a red round face smiling"] * 2, "b": ["the flag of the country germany"] * 2}
    wrong = {"a": "flag", "b": "a face"}
    scores = caption_scores_of_sets(refs, {"perfect": {i: r[0] for i, r in refs.items()}, "wrong": wrong})
    perfect = scores["perfect"]
    assert perfect["BLEU_4"] == pytest.approx(100, abs=1e-3) and perfect["ROUGE_L"] == pytest.approx(100)
    # CIDEr-D: the two images share no n-gram, so each has idf log(2) and cosine 1 at every n: 10 (x100)
    assert perfect["CIDEr"] == pytest.approx(1000, abs=1e-2)
    assert perfect["METEOR"] > 90
    assert scores["wrong"]["BLEU_4"] < 1 and scores["wrong"]["CIDEr"] < perfect["CIDEr"]
    assert scores["wrong"]["METEOR"] < perfect["METEOR"]
    # a set scores alone as beside another, by a new METEOR process when the process's one has ended
    _METEOR[0].meteor_p.kill()
    _METEOR[0].meteor_p.wait()
    assert caption_scores(refs, wrong) == scores["wrong"]
    with pytest.raises(ValueError, match=r"\(wrong\).*differ on \['b'\]"):
        caption_scores_of_sets(refs, {"wrong": {"a": "flag"}})


@needs_java
def test_a_failed_meteor_score_ends_its_process_and_the_next_score_starts_another(monkeypatch):
    import subprocess
    import threading

    import pycocoevalcap.meteor.meteor as meteor_module

    from eval_tasks import caption_metric

    class HalfWayMeteor:  # fails mid-score holding its lock, as pycocoevalcap's does when Java dies
        def __init__(self):
            self.meteor_p = subprocess.Popen(["sleep", "60"])
            self.lock = threading.Lock()
            made.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()
            raise ValueError("could not convert string to float: ''")

    made = []
    monkeypatch.setattr(caption_metric, "_METEOR", [])
    monkeypatch.setattr(meteor_module, "Meteor", HalfWayMeteor)
    refs = {"a": ["a red face"]}
    for _ in range(2):
        with pytest.raises(ValueError, match="could not convert"):
            caption_metric.caption_scores(refs, {"a": "a face"})
        assert caption_metric._METEOR == [] and made[-1].meteor_p.poll() is not None
        assert not made[-1].lock.locked()
    assert len(made) == 2  # the second score started its own process


def test_coco_ids_of_digits_are_integers_and_other_ids_strings():
    from eval_tasks.captioning import _coco_id

    assert [_coco_id(i) for i in ("391895", "0", "007", "emoji-1f603", "\u00b2")] == [391895, 0, "007", "emoji-1f603",
                                                                                     "\u00b2"]


# -- the task ------------------------------------------------------------------------------------------

def debug_task():
    cfg = mm.load_config("configs/finetune/captioning_debug.yaml")
    return cfg, build_task(cfg)


def test_training_step_has_gradients_and_decoding_greedy_is_one_beam(tmp_path):
    cfg, task = debug_task()
    data = iter(task.train_data(seed=0, num_workers=0))
    batch = next(data)
    batch = batch[1] if isinstance(batch, tuple) else batch
    out = task(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert task.mlm_head.weight.grad is not None and task.mlm_head.weight.grad.abs().sum() > 0
    task.eval()
    images = batch.images_B3HW[:3]
    assert task.caption_pixels(images, num_beams=1) == _beam_one(task, images)
    assert len(task.caption_pixels(images)) == 3


def _beam_one(task, images):
    tok = task.tokenizer
    ids = beam_search(task._next_logprobs(images), len(images), bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                      max_new=task.cfg.train.max_len - 1, num_beams=1)
    return [tok.decode(row) for row in ids]


def test_unilm_captioning_head_converts_in_and_out(tmp_path):
    overrides = SIZES[0]
    dim, vocab = overrides["encoder_embed_dim"], overrides["vocab_size"]
    backbone = torchscale_beit3(**overrides)
    mlm_head = random_(nn.Linear(dim, vocab))
    unilm_checkpoint(tmp_path / "cap.pth", backbone, {"mlm_head": mlm_head})
    report = from_beit3(tmp_path / "cap.pth", tmp_path / "ours", heads=4, tokenizer="bundled:tokenizer.model",
                        tokenizer_layout="auto")
    assert report.task == "captioning" and not report.not_converted
    task = Checkpoint.open(tmp_path / "ours").load_task().eval()
    images, ids, padding, _ = inputs(overrides)
    P = task.model.cfg.num_patches + 1
    with torch.no_grad():  # unilm's BEiT3ForCaptioning: the captioning mask, the head over the text positions
        uni_mask = (~captioning_mask(P, ids.shape[1])).long()
        expected = mlm_head(backbone(textual_tokens=ids, visual_tokens=images, text_padding_position=padding,
                                     attn_mask=uni_mask)["encoder_out"][:, P:])
        out = task.model(images=images, text_ids=ids, text_padding_mask=padding, text_causal=True)
        got = task.mlm_head(out.hidden[:, P:])
    assert (got - expected).abs().max() <= 1e-5

    to_beit3(tmp_path / "ours", tmp_path / "again.pth", fmt="unilm")
    again = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    assert torch.equal(again["mlm_head.weight"], mlm_head.weight) and torch.equal(again["mlm_head.bias"],
                                                                                  mlm_head.bias)
    # beside a mim_head the mlm_head is a pretraining checkpoint's: reported, not converted
    mim_head = random_(nn.Linear(dim, 8))
    unilm_checkpoint(tmp_path / "pretrain.pth", backbone, {"mlm_head": mlm_head, "mim_head": mim_head})
    report = from_beit3(tmp_path / "pretrain.pth", tmp_path / "pre", heads=4)
    assert report.task is None
    assert report.not_converted == {"mlm (pretraining)": ["mlm_head.bias", "mlm_head.weight"],
                                    "mim (pretraining)": ["mim_head.bias", "mim_head.weight"]}


# -- runs, files and label-free splits -------------------------------------------------------------------

FAST = ["--set=train.steps=3", "--set=train.warmup_steps=1", "--set=train.log_every=1", "--set=train.num_workers=0",
        "--set=train.checkpoint_every=3", "--set=task.train.batch_size=8", "--set=task.train.shuffle_buffer=20"]
# COCO's captions_val2014.json and image_info_test2014.json, in their layouts (fewer fields and images)
COCO_VAL = {"info": {"year": 2014}, "licenses": [], "images": [
    {"license": 3, "file_name": "COCO_val2014_000000391895.jpg", "height": 6, "width": 8, "id": 391895},
    {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "height": 6, "width": 8, "id": 522418}],
    "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a moped. "},
                    {"image_id": 522418, "id": 681330, "caption": "A woman cutting a large white sheet cake."},
                    {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road."}]}
COCO_TEST = {"info": {"year": 2014}, "licenses": [], "categories": [], "images": [
    {"license": 1, "file_name": "COCO_test2014_000000000001.jpg", "height": 6, "width": 8, "id": 1},
    {"license": 2, "file_name": "COCO_test2014_000000000014.jpg", "height": 6, "width": 8, "id": 14}]}


def _coco_shards(tmp_path, data: dict, folder: str):
    import numpy as np
    from PIL import Image

    (tmp_path / folder).mkdir(parents=True)
    for i, image in enumerate(data["images"]):
        pixels = np.random.default_rng(i).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / folder / image["file_name"], format="JPEG")
    (tmp_path / f"{folder}.json").write_text(json.dumps(data))
    assert main(["data", "write-shards", "retrieval", str(tmp_path / f"{folder}.json"), "--image-root",
                 str(tmp_path / folder), "--out", str(tmp_path / f"{folder}_shards")]) == 0
    return tmp_path / f"{folder}_shards"


@needs_java
def test_finetune_evaluates_from_a_fresh_process_and_predicts_label_free_coco_images(tmp_path, capsys):
    run = tmp_path / "ft"
    # greedy and short: the end-of-run evaluation decodes the 266 held-out images
    assert main(["finetune", "--config", "finetune/captioning_debug", "--run-dir", str(run), "--no-progress", *FAST,
                 "--set=task.num_beams=1", "--set=task.train.max_len=8"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "captioning" and (results["images"], results["references"]) == (266, 849)
    assert set(results["baselines"]) == {"nearest_train_image", "most_frequent_caption"}
    assert results["baselines"]["nearest_train_image"]["CIDEr"] > results["baselines"]["most_frequent_caption"]["CIDEr"]
    metric, value, baselines = mm.load_config("finetune/captioning_debug").task.headline(results)
    assert (metric, value) == ("captioning CIDEr", results["CIDEr"]) and len(baselines) == 2
    predictions = json.loads((run / "caption_predictions.json").read_text())
    assert len(predictions) == 266 and all(set(p) == {"image_id", "caption"} for p in predictions)
    assert predictions[0]["image_id"].startswith("emoji-")

    # COCO's caption file: labelled, scored, the same from a fresh process
    val = _coco_shards(tmp_path, COCO_VAL, "val2014")
    assert "val2014.json (COCO caption file): 2 images, 3 captions" in capsys.readouterr().err
    on_val = ["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{val}]", "--no-progress"]
    assert main([*on_val, "--out", str(tmp_path / "val")]) == 0
    scored = json.loads((tmp_path / "val" / "results.json").read_text())
    assert (scored["images"], scored["references"]) == (2, 3) and "CIDEr" in scored
    code = subprocess.run([sys.executable, "-m", "multimodal_moe.cli", *on_val, "--out", str(tmp_path / "again")],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert {k: again[k] for k in METRICS} == {k: scored[k] for k in METRICS}
    assert "PTBTokenizer tokenized" not in code.stderr  # the scorer's Java chatter is filtered out
    # the label-free test split: refused without --predict, captioned with it, ids as COCO's integers
    test = _coco_shards(tmp_path, COCO_TEST, "test2014")
    assert "test2014.json (COCO caption file): 2 images, no captions (label-free)" in capsys.readouterr().err
    args = ["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{test}]", "--out", str(tmp_path / "t"),
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds images without captions" in err and "pass --predict" in err
    assert main([*args, "--predict"]) == 0
    submission = json.loads((tmp_path / "t" / "caption_predictions.json").read_text())
    assert sorted(p["image_id"] for p in submission) == [1, 14] and all(isinstance(p["caption"], str)
                                                                         for p in submission)
    assert json.loads((tmp_path / "t" / "results.json").read_text())["label_free"] is True
    # a COCO file naming an image twice is refused before anything is written
    twice = {**COCO_TEST, "images": COCO_TEST["images"] + COCO_TEST["images"][:1]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    assert main(["data", "write-shards", "retrieval", str(tmp_path / "twice.json"), "--image-root",
                 str(tmp_path / "test2014"), "--out", str(tmp_path / "twice")]) == 2
    assert "images[2] repeats image id 1" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    # a split of both kinds is neither
    assert main(["evaluate", "--checkpoint", str(run), "--set", f"task.eval_shards=[{val},{test}]", "--predict",
                 "--out", str(tmp_path / "mixed"), "--no-progress"]) == 2
    assert "2 of the 4 images" in capsys.readouterr().err
