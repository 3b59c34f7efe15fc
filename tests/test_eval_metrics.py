"""The VQA accuracy against hand-computed cases, recall@k against a brute-force ranking."""

from __future__ import annotations

import pytest
import torch

from eval_tasks.retrieval_metric import retrieval_recall
from eval_tasks.vqa_metric import normalize_answer, process_punctuation, vqa_accuracy, vqa_report


@pytest.mark.parametrize("raw, clean", [
    ("Two", "2"), ("none", "0"), ("a dog.", "dog"), ("The Cat", "cat"), ("dont", "don't"), ("isnt it", "isn't it"),
    ("yes!", "yes"), ("1,000", "1000"), ("hello, world", "hello world"), ("red-white", "red white"),
    ("3.5", "3.5"), ("left\tside\n", "left side"), ("(ten)", "10"), ("an apple?", "apple"),
])
def test_normalisation(raw, clean):
    assert normalize_answer(raw) == clean


def test_period_quirk_removes_at_most_32():
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(matches, expected):
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_answers_are_punctuation_processed_only_when_they_differ():
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0  # identical answers are compared raw (official behaviour)
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0


def test_report_overall_and_per_type():
    report = vqa_report(["cat", "2", "no"], [["cat"] * 10, ["2"] * 2 + ["3"] * 8, ["yes"] * 10],
                        ["what animal", "how many", "is this"])
    assert report["vqa_accuracy"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert report["per_question_type"] == pytest.approx({"how many": 60.0, "is this": 0.0, "what animal": 100.0})
    with pytest.raises(ValueError, match="2 predictions for 3 questions"):
        vqa_report(["a", "b"], [["a"]] * 3)


def brute_force(images, texts, owner, ks=(1, 5, 10)):
    scores = images @ texts.t()
    out = {}
    for k in ks:
        hits = [any(owner[j] == i for j in scores[i].argsort(descending=True)[:k].tolist())
                for i in range(len(images))]
        out[f"i2t_r{k}"] = 100 * sum(hits) / len(hits)
    for k in ks:
        hits = [owner[n].item() in scores[:, n].argsort(descending=True)[:k].tolist() for n in range(len(texts))]
        out[f"t2i_r{k}"] = 100 * sum(hits) / len(hits)
    out["r_mean"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_recall_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(23, 16, generator=g), dim=1)
    owner = torch.arange(23).repeat_interleave(5)[torch.randperm(115, generator=g)][:100]
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(100, 16, generator=g), dim=1)
    got = retrieval_recall(images, texts, owner, chunk=chunk)
    assert got == pytest.approx(brute_force(images, texts, owner))
    assert 0 < got["i2t_r1"] < got["i2t_r10"] <= 100


def test_recall_rejects_bad_owners():
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 3]))


def test_baselines():
    from eval_tasks.vqa_metric import vqa_baselines

    answers = [["yes"] * 10, ["no"] * 10, ["yes"] * 7 + ["no"] * 3]
    out = vqa_baselines(answers, ["yes", "no", "cat"])
    assert out["majority_answer"] == "yes"
    assert out["majority_vqa_accuracy"] == pytest.approx(100 * (1 + 0 + 1) / 3)
    assert out["chance_vqa_accuracy"] == pytest.approx(100 * (1 / 3 + 1 / 3 + (1 + 0.9) / 3) / 3)
