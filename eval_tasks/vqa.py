"""VQA fine-tuning and evaluation in the VQAv2 protocol, as BEiT-3 does it.

Image as a Foreign Language (BEiT-3, arXiv 2208.10442), section 3.2 and unilm's ``beit3``
VQA handler:

- the image and the question are encoded jointly by the Multiway encoder;
- pooler: the image CLS token -> LayerNorm -> Linear -> tanh; head: Linear(D -> 2D) ->
  LayerNorm -> GELU -> Linear(-> A answers);
- targets: VQAv2 soft scores (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 of the 10 annotators);
  loss ``BCEWithLogits`` summed over answers, averaged over the batch;
- answer vocabulary: the most common answer of each training question, normalised, kept if it
  heads at least ``min_answer_count`` questions (3129 answers at 9 on VQAv2); questions
  without an answer in the vocabulary still train (all-zero targets) and are scored;
- metric: the official VQA accuracy (:mod:`eval_tasks.vqa_metric`), overall, per question type and
  per answer type (yes/no, number, other); a label-free split (VQAv2's test-dev and test) is only
  predicted, for EvalAI: ``vqa_predictions.json`` is its submission format;
- unilm's VQA checkpoints: its ``pooler.norm`` / ``pooler.dense`` and ``head`` are our pooler
  and head, its ``answer2label.txt`` the answer list (read and written here, converted by
  :mod:`eval_tasks.beit3_convert`).

Deviation: answers are normalised with the official evaluation's rules for the vocabulary too
(ViLT and BEiT-3 use a slightly different punctuation list there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.batches import VQABatch
from data_pipelines.paths import data_path
from data_pipelines.processors import VQAProcessor, read_vqa_questions
from data_pipelines.shards import shard_urls
from data_pipelines.skips import SkipCounter, SkipSample
from data_pipelines.tars import tar_samples
from multimodal_moe.configurable import ConfigError, config
from multimodal_moe.models import ModelConfig, ModelOutput
from multimodal_moe.models.beit3_weights import ConversionError, HeadMap, HeadsNotConverted, check_shapes
from multimodal_moe.plots import figure
from multimodal_moe.tasks.base import TaskConfig, TaskOutput
from multimodal_moe.tasks.stream_config import TextStreamConfig, TokenizerConfig

from .finetune import (ImageInput, ImageTextFinetune, ImageTextFinetuneConfig, gather_counts, gather_lists,
                       is_main_rank)
from .vqa_metric import normalize_answer, vqa_baselines, vqa_report

__all__ = ["VQA", "VQAConfig", "answer_vocab", "build_answer_vocab", "read_answers"]

log = logging.getLogger("eval_tasks")

ANSWERS_FILE = "answer2label.txt"  # unilm's name for a VQA head's answer list
UNILM_HEADS = HeadMap(names={
    "pooler.norm.weight": "pooler.0.weight", "pooler.norm.bias": "pooler.0.bias",
    "pooler.dense.weight": "pooler.1.weight", "pooler.dense.bias": "pooler.1.bias",
    **{f"head.{i}.{p}": f"head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}})


def build_answer_vocab(shards: list[str], min_count: int) -> list[str]:
    """The normalised majority answer of each question in ``shards`` (either layout: one image
    with its questions per sample, or one question), kept if it is the majority answer of at least
    ``min_count`` questions; most frequent first, ties alphabetical."""
    counts: Counter[str] = Counter()
    skips = SkipCounter()  # what training skips, the vocabulary skips (and logs) too
    for shard_set in shards:
        for sample in tar_samples(shard_urls(str(data_path(shard_set))), skips):
            try:
                questions = read_vqa_questions(sample)
            except SkipSample as skip:
                skips.add(skip, where=f"{sample.get('__url__')}:{sample.get('__key__')}")
                continue
            for question in questions:
                if answers := [normalize_answer(a) for a in question["answers"]]:
                    counts[Counter(answers).most_common(1)[0][0]] += 1
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


def read_answers(path: str | os.PathLike) -> list[str]:
    """VQA answers in head order from unilm's ``answer2label.txt`` (JSON lines with ``answer``
    and ``label``) or a plain list, one answer per line."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        try:
            pairs = sorted((int(rec["label"]), str(rec["answer"])) for rec in map(json.loads, lines))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: expected JSON lines with 'answer' and 'label' ({e})") from None
        labels = [label for label, _ in pairs]
        if labels != list(range(len(pairs))):
            raise ConversionError(f"{path}: labels must be 0..{len(pairs) - 1}, each once")
        return [answer for _, answer in pairs]
    return [ln.strip() for ln in lines]


def answer_vocab(cfg: VQAConfig) -> list[str]:
    """The answers a VQA head of ``cfg`` predicts, in order: ``cfg.answers`` or the vocabulary of
    its training shards."""
    answers = list(cfg.answers) or build_answer_vocab(list(cfg.train.shards), cfg.min_answer_count)
    if not answers:
        raise ValueError(f"no answer of {list(cfg.train.shards)} heads {cfg.min_answer_count} questions; "
                         f"lower task.min_answer_count (or, if they hold no answers, a test split, train on a "
                         f"labelled one)")
    return answers


@TaskConfig.register("vqa")
@config
class VQAConfig(ImageTextFinetuneConfig):
    """VQA fine-tuning; see the module docstring. Fields beyond :class:`ImageTextFinetuneConfig`
    (``train.max_len``: the longest question):

    Attributes:
        answers: the answer vocabulary in the head's order (e.g. of a converted unilm
            checkpoint); empty: built from ``train.shards``.
        min_answer_count: questions an answer must head to enter the vocabulary.
        head_lr_scale: learning-rate multiplier of the pooler and head (BEiT-3: 20).
    """

    train: TextStreamConfig = TextStreamConfig(shards=("bundled:vqa/train",), batch_size=32, max_len=32)
    eval_shards: tuple[str, ...] = ("bundled:vqa/val",)
    answers: tuple[str, ...] = ()
    min_answer_count: int = 1
    head_lr_scale: float = 20.0
    unilm_heads: ClassVar[HeadMap] = UNILM_HEADS
    predicts_label_free: ClassVar[bool] = True  # VQAv2's test-dev, for EvalAI

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
        base = results["baselines"]
        return "VQA accuracy", results["vqa_accuracy"], {"majority answer": base["majority_vqa_accuracy"],
                                                         "chance": base["chance_vqa_accuracy"]}

    def check(self) -> None:
        ImageTextFinetuneConfig.check(self)
        if self.min_answer_count < 1:
            raise ConfigError("min_answer_count", f"must be >= 1, got {self.min_answer_count}")
        if self.head_lr_scale <= 0:
            raise ConfigError("head_lr_scale", f"must be positive, got {self.head_lr_scale}")
        if len(set(self.answers)) != len(self.answers):
            raise ConfigError("answers", "lists an answer more than once")

    def with_heads_of(self, saved: TaskConfig | None) -> VQAConfig:
        """The checkpoint's answer vocabulary (its head's order) unless this config lists one."""
        if not self.answers and isinstance(saved, VQAConfig) and saved.answers:
            return dataclasses.replace(self, answers=saved.answers)
        return self

    def heads_depend_on(self) -> dict[str, Any]:
        return {"answers": tuple(self.answers)}

    def build(self, model: nn.Module) -> VQA:
        return VQA(self, model)

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> VQAConfig:
        """A config whose answers are ``answers`` (unilm's ``answer2label.txt``), one per output."""
        A = heads["head.3.weight"].shape[0]
        if answers is None:
            raise HeadsNotConverted(f"its {A} outputs need their answers (pass --answers {ANSWERS_FILE})")
        answer_list = read_answers(answers)
        if len(answer_list) != A:
            raise ConversionError(f"the VQA head has {A} answers, the answer list {len(answer_list)}")
        with torch.device("meta"):  # shapes only
            pooler, head = _pooler_and_head(dim, A)
        expected = nn.ModuleDict({"pooler": pooler, "head": head}).state_dict()
        check_shapes(heads, {k: tuple(v.shape) for k, v in expected.items()}, f"the {cls.kind} head",
                     UNILM_HEADS.their_name)
        return cls(answers=tuple(answer_list), tokenizer=tokenizer)

    def write_unilm_files(self, dst: Path, model: ModelConfig) -> list[str]:
        """The head's answers in label order, as unilm's ``answer2label.txt``; a note if the
        encoder has the final LayerNorm that unilm's VQA model lacks."""
        notes = []
        if model.normalize_output:
            notes.append("unilm's VQA model has no final LayerNorm, this one does (beit3.encoder.layer_norm.*): "
                         "build unilm's model with normalize_output=True to use it")
        path = Path(f"{dst}.{ANSWERS_FILE}")
        path.write_text("".join(json.dumps({"answer": a, "label": i}) + "\n"
                                for i, a in enumerate(answer_vocab(self))), encoding="utf-8")
        return [*notes, f"VQA answers in head order: {path}"]


def _pooler_and_head(D: int, answers: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The pooler (LayerNorm -> Linear -> tanh, over the image CLS token) and the classifier
    (Linear(D -> 2D) -> LayerNorm -> GELU -> Linear(-> answers)), default-initialised."""
    return (nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.Tanh()),
            nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, answers)))


class VQA(ImageTextFinetune):
    """The ``vqa`` task: pooler and answer classifier over the joint encoding."""

    def __init__(self, cfg: VQAConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.answers = answer_vocab(cfg)
        D = model.cfg.dim
        self.pooler, self.head = _pooler_and_head(D, len(self.answers))
        for m in [*self.pooler, *self.head]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def resolved_config(self) -> VQAConfig:
        return dataclasses.replace(self.cfg, answers=tuple(self.answers))

    def lr_scales(self) -> dict[str, float]:
        return {n: self.cfg.head_lr_scale for n, _ in self.named_parameters() if n.startswith(("pooler.", "head."))}

    def logits(self, batch: VQABatch) -> tuple[torch.Tensor, ModelOutput]:
        """Answer scores (B, A) in fp32, and the encoder's output (for its MoE losses and stats)."""
        return self.answer_logits(batch.images_B3HW, batch.text_ids_BL, batch.padding_mask_BL)

    def answer_logits(self, images_B3HW: torch.Tensor, ids_BL: torch.Tensor, padding_BL: torch.Tensor
                      ) -> tuple[torch.Tensor, ModelOutput]:
        """:meth:`logits` of tensors: images and their questions' token ids and padding."""
        out = self.model(images=images_B3HW, text_ids=ids_BL, text_padding_mask=padding_BL)
        return self.head(self.pooler(out.hidden[:, 0])).float(), out

    query: ClassVar[str] = "question"

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], questions: Sequence[str], *, top_k: int = 1
                ) -> list[list[tuple[str, float]]]:
        """Each question's ``top_k`` answers with their probabilities (the sigmoid of the
        logits, as trained with BCE), best first. ``images``: one per question, or one for all."""
        if len(images) == 1:
            images = list(images) * len(questions)
        if len(images) != len(questions) or not questions or top_k < 1:
            raise ValueError(f"give one image per question, or one image for all, and top_k >= 1; got "
                             f"{len(images)} images, {len(questions)} questions, top_k {top_k}")
        logits_BA, _ = self.answer_logits(self.pixels(images), *self.token_ids(questions))
        scores, indices = logits_BA.sigmoid().topk(min(top_k, len(self.answers)), dim=1)
        return [[(self.answers[i], round(p, 4)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(indices.tolist(), scores.tolist())]

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        return [{"question": q, "answers": [{"answer": a, "score": p} for a, p in best]}
                for q, best in zip(texts, self.predict(images, texts, top_k=top_k))]

    def forward(self, batch: VQABatch) -> TaskOutput:
        logits_BA, out = self.logits(batch)
        targets_BA = batch.targets_BA
        loss = F.binary_cross_entropy_with_logits(logits_BA, targets_BA, reduction="sum") / len(batch)
        score = targets_BA.gather(1, logits_BA.argmax(1, keepdim=True)).mean()  # VQAScore of the argmax
        tokens = out.hidden.shape[0] * out.hidden.shape[1] if out.token_mask is None else out.token_mask.sum()
        return TaskOutput(loss + out.aux_loss, {"vqa_loss": loss.detach(), "vqa_score": score,
                                                "aux_loss": out.aux_loss.detach()},
                          samples=len(batch), tokens=tokens, moe_stats=[out.moe_stats])

    def processor(self, train: bool) -> VQAProcessor:
        return VQAProcessor(self.tokenizer, self.transform(train), self.cfg.train.max_len,
                            answer_vocab={a: i for i, a in enumerate(self.answers)}, normalize_answer=normalize_answer,
                            view_per_question=train)

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False,
                 predict: bool = False) -> dict[str, Any]:
        """VQA accuracy on ``eval_shards``, overall, per question type and per answer type (every
        rank scores its share; all get the whole report); to ``out_dir`` (rank 0) every question's
        answer, ``vqa_predictions.json`` in EvalAI's submission format (``[{"question_id": int,
        "answer": str}]``, by question id; string ids stay strings), and the accuracy per question
        type, ``plots/vqa_accuracy_per_type.png``. A label-free split (no answers: VQAv2's test-dev
        and test) has no accuracy; it is only predicted, and only with ``predict=True``
        (``mmoe evaluate --predict``): an evaluation that asked for an accuracy never ends without one."""
        if not predict and _label_free(_first_questions(self.cfg.eval_shards)):
            raise ValueError(_LABEL_FREE.format(shards=list(self.cfg.eval_shards)))
        self.eval()
        device = next(self.parameters()).device
        predictions, answers, qtypes, atypes, ids, skipped = [], [], [], [], [], Counter()
        for batch in self.eval_batches(num_workers, skipped, progress):
            logits_BA, _ = self.logits(batch.to(device))
            predictions += [self.answers[i] for i in logits_BA.argmax(1).tolist()]
            answers += batch.answers
            qtypes += batch.question_types
            atypes += batch.answer_types
            ids += batch.question_ids
        self.train()
        predictions, answers, qtypes, atypes, ids = gather_lists(predictions, answers, qtypes, atypes, ids)
        unlabelled = sum(not a for a in answers)
        if 0 < unlabelled < len(answers):
            raise ValueError(f"{unlabelled} of the {len(answers)} questions of {list(self.cfg.eval_shards)} have no "
                             f"answers: a split is either labelled or label-free (a test split), not both")
        if unlabelled and not predict:
            raise ValueError(_LABEL_FREE.format(shards=list(self.cfg.eval_shards)))
        if unlabelled:
            report = {"questions": len(answers), "label_free": True, "predictions": "vqa_predictions.json"}
        else:
            report = vqa_report(predictions, answers, qtypes, atypes)
            report["baselines"] = vqa_baselines(answers, self.answers)
        report["skipped_samples"] = gather_counts(skipped)
        if predict and report["skipped_samples"]:
            log.warning("%s samples of %s were skipped (%s): their questions have no answer in the predictions",
                        sum(report["skipped_samples"].values()), list(self.cfg.eval_shards), report["skipped_samples"])
        if out_dir is not None and is_main_rank():
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            submission = sorted(zip(ids, predictions), key=lambda qa: (isinstance(qa[0], str), qa[0]))
            (out_dir / "vqa_predictions.json").write_text(json.dumps(
                [{"question_id": q, "answer": a} for q, a in submission]))
            if not unlabelled:
                _plot_per_type(report["per_question_type"], out_dir / "plots" / "vqa_accuracy_per_type.png")
        return report


_LABEL_FREE = ("{shards} holds questions without answers (a test split such as VQAv2's test-dev): there is no "
               "accuracy to compute; pass --predict (evaluate(predict=True)) to write the answers for the evaluation "
               "server, vqa_predictions.json")


def _first_questions(shards: Sequence[str]) -> list[dict]:
    """The questions of the first readable sample of ``shards`` (none: [])."""
    for sample in tar_samples(shard_urls([str(data_path(s)) for s in shards]), SkipCounter(log_interval=float("inf"))):
        try:
            return read_vqa_questions(sample)
        except SkipSample:
            continue
    return []


def _label_free(questions: list[dict]) -> bool:
    return bool(questions) and not any(q["answers"] for q in questions)


def _plot_per_type(per_type: dict[str, float], path: Path) -> None:
    names = list(per_type)
    with figure(path, figsize=(6, 0.4 * len(per_type) + 1.2)) as (_, ax):
        ax.barh(names, [per_type[n] for n in names], color="tab:blue")
        ax.set_xlim(0, 100)
        ax.set_xlabel("VQA accuracy (%)")
        ax.invert_yaxis()
