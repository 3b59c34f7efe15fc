"""Evaluating a checkpoint: its weights, a task config, ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

from multimodal_moe.config import Config
from multimodal_moe.configurable import to_dict
from multimodal_moe.training import Checkpoint

from .expert_usage import record_expert_usage
from .finetune import is_main_rank
from .lm_eval import multiple_choice, perplexity, read_documents_and_languages

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: Checkpoint, cfg: Config, out_dir: Path, *, progress: bool = False,
                        text_shards: list[str] | None = None, choices: str | None = None,
                        predict: bool = False) -> dict:
    """Evaluate ``cfg``'s task with the weights of ``checkpoint``; writes ``results.json``. A
    language model is scored by perplexity on ``text_shards`` (default: its task's
    ``eval_shards``), per language too where the documents name theirs, and, given a JSONL of
    ``choices``, by zero-shot multiple choice. A model with routed experts also gets
    ``expert_usage`` over the held-out data (:mod:`.expert_usage`) and ``plots/expert_usage.png``.
    ``predict``: for a task that answers label-free splits (``predicts_label_free``: VQA and
    captioning), a split without labels (VQAv2's test-dev, COCO's test2014) is predicted for the
    evaluation server instead of refused (see :meth:`eval_tasks.vqa.VQA.evaluate`)."""
    if predict and not type(cfg.task).predicts_label_free:
        raise ValueError(f"--predict writes the answers of a split without them, for an evaluation server; the "
                         f"{cfg.task.kind} task scores labelled data only: drop --predict")
    task = checkpoint.load_task(cfg)
    shards = text_shards if cfg.task.kind == "lm" and text_shards else cfg.task.eval_shards
    results = {"task": cfg.task.kind, "checkpoint": str(checkpoint.path), "eval_shards": to_dict(shards)}
    with record_expert_usage(task.model) as usage:  # over the held-out corpus: the text, the eval split
        if cfg.task.kind == "lm":
            documents, languages = read_documents_and_languages(text_shards or cfg.task.eval_shards)
            results.update(perplexity(task.model, task.tokenizer, documents, seq_len=cfg.task.text.max_len,
                                      languages=languages))
        else:
            results.update(task.evaluate(out_dir, progress=progress,  # only tasks predicts_label_free take it
                                         **({"predict": True} if predict else {})))
    if report := usage.report():
        results["expert_usage"] = report
    if cfg.task.kind == "lm" and choices is not None:
        results["multiple_choice"] = multiple_choice(task.model, task.tokenizer, choices)
    if is_main_rank():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        if report:
            usage.plot(report, out_dir / "plots" / "expert_usage.png")
    return results
