"""NLVR2 visual reasoning fine-tuning and evaluation, as BEiT-3 does it.

Image as a Foreign Language (BEiT-3, arXiv 2208.10442), section 3.2, and unilm's ``beit3``
``BEiT3ForVisualReasoning`` / ``NLVR2Handler``, on NLVR2 (Suhr et al., arXiv 1811.00491): two
images and a statement, true or false.

- each image is encoded jointly with the statement by the Multiway encoder: the batch's left and
  right images go through it as 2B rows, the statement twice;
- per pair, the image CLS (token 0) and the statement's first token (at the multiway split
  position, after the vision tokens) are concatenated (2D), then the left and right pairs' (4D);
- head: unilm's ``TwoLayerMLP``, LayerNorm(4D) -> Linear(4D -> 2D) -> LayerNorm(2D) -> GELU ->
  Linear(2D -> 2), its linear layers initialised at 0.001 x trunc-normal(0.02) as unilm's are;
- loss: cross-entropy over {False, True}; metric: accuracy (x 100), with the majority-class and
  chance baselines, and per statement template where the data names one (the bundled set);
- unilm's NLVR2 checkpoints: its ``head.norm1/dense1/norm2/dense2`` are ours, converted by
  :mod:`eval_tasks.beit3_convert`.

Deviation: NLVR2's consistency (every pair of a sentence right) is not computed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.nlvr2 import NLVR2Batch, NLVR2Processor
from multimodal_moe.configurable import config
from multimodal_moe.models import ModelConfig, ModelOutput
from multimodal_moe.models.beit3_weights import HeadMap, check_shapes
from multimodal_moe.plots import figure
from multimodal_moe.tasks.base import TaskConfig, TaskOutput
from multimodal_moe.tasks.stream_config import TextStreamConfig, TokenizerConfig

from .finetune import (ImageInput, ImageTextFinetune, ImageTextFinetuneConfig, gather_counts, gather_lists,
                       is_main_rank)

__all__ = ["NLVR2", "NLVR2Config", "TwoLayerMLP", "nlvr2_accuracy", "nlvr2_baselines"]

UNILM_HEADS = HeadMap(names={f"head.{layer}.{p}": f"head.{layer}.{p}"
                             for layer in ("norm1", "dense1", "norm2", "dense2") for p in ("weight", "bias")})
PREDICTIONS_FILE = "nlvr2_predictions.json"


class TwoLayerMLP(nn.Module):
    """unilm's NLVR2 head over the 4D pair features: LayerNorm -> Linear(4D -> 2D) -> LayerNorm ->
    GELU -> Linear(2D -> 2); ``D``: the encoder width. Linear layers: trunc-normal(0.02) x 0.001,
    zero biases (unilm's ``init_scale``), so training starts from near-equal logits."""

    def __init__(self, D: int, classes: int = 2):
        super().__init__()
        self.norm1, self.dense1 = nn.LayerNorm(4 * D), nn.Linear(4 * D, 2 * D)
        self.norm2, self.dense2 = nn.LayerNorm(2 * D), nn.Linear(2 * D, classes)
        for dense in (self.dense1, self.dense2):
            nn.init.trunc_normal_(dense.weight, std=0.02)
            nn.init.zeros_(dense.bias)
            with torch.no_grad():
                dense.weight.mul_(0.001)

    def forward(self, x_B4D: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x_B4D)))))


def nlvr2_accuracy(predictions: Sequence[bool], labels: Sequence[bool], templates: Sequence[str] = ()) -> dict:
    """Accuracy (x 100) over parallel lists, and per template (``per_template``) when any is named."""
    if len(predictions) != len(labels) or (templates and len(templates) != len(labels)):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels and {len(templates)} templates")
    right = [p == y for p, y in zip(predictions, labels)]
    out = {"accuracy": 100 * sum(right) / max(len(right), 1), "statements": len(right)}
    if any(templates):
        per_template: dict[str, list[bool]] = {}
        for template, r in zip(templates, right):
            per_template.setdefault(template, []).append(r)
        out["per_template"] = {t: 100 * sum(v) / len(v) for t, v in sorted(per_template.items())}
    return out


def nlvr2_baselines(labels: Sequence[bool]) -> dict:
    """Reference accuracies (x 100): always the most common label of these statements
    (``majority``), and a fair coin (``chance``, 50)."""
    true = sum(map(bool, labels))
    majority = true >= len(labels) - true
    return {"majority_label": majority, "majority_accuracy": 100 * max(true, len(labels) - true) / max(len(labels), 1),
            "chance_accuracy": 50.0}


@TaskConfig.register("nlvr2")
@config
class NLVR2Config(ImageTextFinetuneConfig):
    """NLVR2 fine-tuning; see the module docstring. The fields are those of
    :class:`ImageTextFinetuneConfig` (``train.max_len``: the longest statement)."""

    train: TextStreamConfig = TextStreamConfig(shards=("bundled:nlvr2/train",), batch_size=32, max_len=32)
    eval_shards: tuple[str, ...] = ("bundled:nlvr2/val",)
    unilm_heads: ClassVar[HeadMap] = UNILM_HEADS

    @staticmethod
    def headline(results: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
        base = results["baselines"]
        return "NLVR2 accuracy", results["accuracy"], {"majority label": base["majority_accuracy"],
                                                       "chance": base["chance_accuracy"]}

    def build(self, model: nn.Module) -> NLVR2:
        return NLVR2(self, model)

    @classmethod
    def from_unilm_heads(cls, heads: dict[str, torch.Tensor], *, dim: int, tokenizer: TokenizerConfig,
                         answers: Path | None = None) -> NLVR2Config:
        """The default config: the head's shapes follow from the encoder width alone."""
        with torch.device("meta"):  # shapes only
            expected = {f"head.{k}": tuple(v.shape) for k, v in TwoLayerMLP(dim).state_dict().items()}
        check_shapes(heads, expected, f"the {cls.kind} head", UNILM_HEADS.their_name)
        return cls(tokenizer=tokenizer)

    def write_unilm_files(self, dst: Path, model: ModelConfig) -> list[str]:
        """No files; a note if the encoder lacks the final LayerNorm that unilm's NLVR2 model has."""
        if model.normalize_output:
            return []
        return ["unilm's NLVR2 model has a final LayerNorm, this one has none: build unilm's model with "
                "normalize_output=False to use it"]


class NLVR2(ImageTextFinetune):
    """The ``nlvr2`` task: :class:`TwoLayerMLP` over both images' joint encodings with the statement."""

    query: ClassVar[str] = "statement"
    images_read: ClassVar[int] = 2  # the left and the right image

    def __init__(self, cfg: NLVR2Config, model: nn.Module):
        super().__init__(cfg, model)
        self.head = TwoLayerMLP(model.cfg.dim)

    def logits(self, batch: NLVR2Batch) -> tuple[torch.Tensor, ModelOutput]:
        """Scores (B, 2) of False and True in fp32, and the encoder's output (2B rows)."""
        return self.pair_logits(batch.left_images_B3HW, batch.right_images_B3HW, batch.text_ids_BL,
                                batch.padding_mask_BL)

    def pair_logits(self, left_B3HW: torch.Tensor, right_B3HW: torch.Tensor, ids_BL: torch.Tensor,
                    padding_BL: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """:meth:`logits` of tensors: the left and right images and their statements' token ids and padding."""
        B = ids_BL.shape[0]
        out = self.model(images=torch.cat([left_B3HW, right_B3HW]), text_ids=ids_BL.repeat(2, 1),
                         text_padding_mask=padding_BL.repeat(2, 1))
        hidden_NTD = out.hidden  # N = 2B rows: the left pairs, then the right ones
        pair_N2D = torch.cat([hidden_NTD[:, 0], hidden_NTD[:, out.num_vision]], dim=-1)  # image CLS ; text BOS
        left_B2D, right_B2D = pair_N2D.split(B)
        return self.head(torch.cat([left_B2D, right_B2D], dim=-1)).float(), out

    @torch.no_grad()
    def predict(self, left_images: Sequence[ImageInput], right_images: Sequence[ImageInput],
                statements: Sequence[str]) -> list[float]:
        """The probability that each statement is true of its pair of images (paths, encoded bytes
        or PIL images). One pair per statement, or one pair for all."""
        if len(left_images) == len(right_images) == 1:
            left_images, right_images = list(left_images) * len(statements), list(right_images) * len(statements)
        if not statements or not len(left_images) == len(right_images) == len(statements):
            raise ValueError(f"give one left and one right image per statement, or one pair for all; got "
                             f"{len(left_images)} left, {len(right_images)} right images and {len(statements)} "
                             f"statements")
        logits_B2, _ = self.pair_logits(self.pixels(left_images), self.pixels(right_images),
                                        *self.token_ids(statements))
        return [round(p, 4) for p in logits_B2.softmax(-1)[:, 1].tolist()]

    def describe(self, images: Sequence[ImageInput], texts: Sequence[str], top_k: int) -> list[dict[str, Any]]:
        left, right = images
        return [{"statement": s, "prediction": p >= 0.5, "p_true": p}
                for s, p in zip(texts, self.predict([left], [right], texts))]

    def forward(self, batch: NLVR2Batch) -> TaskOutput:
        logits_B2, out = self.logits(batch)
        loss = F.cross_entropy(logits_B2, batch.labels_B)
        accuracy = (logits_B2.argmax(1) == batch.labels_B).float().mean()
        tokens = out.hidden.shape[0] * out.hidden.shape[1] if out.token_mask is None else out.token_mask.sum()
        return TaskOutput(loss + out.aux_loss, {"nlvr2_loss": loss.detach(), "nlvr2_accuracy": accuracy,
                                                "aux_loss": out.aux_loss.detach()},
                          samples=len(batch), tokens=tokens, moe_stats=[out.moe_stats])

    def processor(self, train: bool) -> NLVR2Processor:
        return NLVR2Processor(self.tokenizer, self.transform(train), self.cfg.train.max_len)

    @torch.no_grad()
    def evaluate(self, out_dir: Path | None = None, *, num_workers: int = 0, progress: bool = False
                 ) -> dict[str, Any]:
        """Accuracy on ``eval_shards`` (every rank scores its share; all get the whole report),
        with its baselines and per template; to ``out_dir`` (rank 0) every statement's prediction
        and probability of True, ``nlvr2_predictions.json`` (by identifier), and with templates
        ``plots/nlvr2_accuracy_per_template.png``."""
        self.eval()
        device = next(self.parameters()).device
        p_true, labels, identifiers, templates, skipped = [], [], [], [], Counter()
        for batch in self.eval_batches(num_workers, skipped, progress):
            logits_B2, _ = self.logits(batch.to(device))
            p_true += logits_B2.softmax(-1)[:, 1].tolist()
            labels += batch.labels_B.bool().tolist()
            identifiers += batch.identifiers
            templates += batch.templates
        self.train()
        p_true, labels, identifiers, templates = gather_lists(p_true, labels, identifiers, templates)
        predictions = [p > 0.5 for p in p_true]
        report = nlvr2_accuracy(predictions, labels, templates)
        report.update(baselines=nlvr2_baselines(labels), skipped_samples=gather_counts(skipped))
        if out_dir is not None and is_main_rank():
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = sorted(zip(identifiers, predictions, p_true, labels))
            (out_dir / PREDICTIONS_FILE).write_text(json.dumps(
                [{"identifier": i, "prediction": p, "p_true": round(q, 4), "label": y} for i, p, q, y in rows]))
            if "per_template" in report:
                _plot_per_template(report["per_template"], report["baselines"]["majority_accuracy"],
                                   out_dir / "plots" / "nlvr2_accuracy_per_template.png")
        return report


def _plot_per_template(per_template: dict[str, float], majority: float, path: Path) -> None:
    names = list(per_template)
    with figure(path, figsize=(7, 0.4 * len(names) + 1.2)) as (_, ax):
        ax.barh(names, [per_template[n] for n in names], color="tab:blue")
        ax.axvline(majority, color="gray", linestyle="--", label="majority class")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
