"""Causal language modeling on packed text, for the decoder LM.

Next-token cross-entropy over every position of rows packed from documents joined by EOS
(``data_pipelines.text.TokenPacker``), plus the model's MoE auxiliary losses and, optionally,
the output-logit z-loss of ST-MoE (arXiv 2202.08906) that OpenMoE (arXiv 2402.01739) adds to its
router losses: ``z_loss_weight * mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.batches import LMBatch
from data_pipelines.processors import LMProcessor
from data_pipelines.streams import derive_seed

from ..configurable import ConfigError, config
from ..models import DecoderLMConfig, ModelConfig
from .base import Task, TaskConfig, TaskOutput, check_group_sizes
from .stream_config import SingleStream, TextStreamConfig, TokenizerConfig

__all__ = ["LanguageModeling", "LanguageModelingConfig"]


@TaskConfig.register("lm")
@config
class LanguageModelingConfig(TaskConfig):
    """Causal LM pretraining.

    Attributes:
        text: the text stream; ``max_len`` is the packed sequence length T (the default,
            128, is the debug LM's ``max_seq_len``).
        tokenizer: the sentencepiece model.
        eval_shards: the held-out text ``mmoe evaluate`` scores by default (per language as well
            when its samples name their language).
        z_loss_weight: coefficient of the output-logit z-loss (OpenMoE: 1e-4 on its router
            logits; 0 disables it).
    """

    text: TextStreamConfig = TextStreamConfig(shards=("bundled:text/train",), batch_size=16, max_len=128)
    tokenizer: TokenizerConfig = TokenizerConfig()
    eval_shards: tuple[str, ...] = ("bundled:text/val",)
    z_loss_weight: float = 0.0

    def check(self) -> None:
        if self.z_loss_weight < 0:
            raise ConfigError("z_loss_weight", f"must be >= 0, got {self.z_loss_weight}")

    def check_model(self, model: ModelConfig) -> None:
        if not isinstance(model, DecoderLMConfig):
            raise ConfigError("kind", f"language modeling trains a decoder_lm, not a {model.kind}; "
                                      f"use task kind 'mmm' for the Multiway encoder")
        check_group_sizes(model, {"text": self.text.batch_size})
        if self.text.max_len > model.max_seq_len:
            raise ConfigError("text.max_len", f"{self.text.max_len} exceeds the model's max_seq_len "
                                              f"{model.max_seq_len}")

    def build(self, model: nn.Module) -> LanguageModeling:
        return LanguageModeling(self, model)


class LanguageModeling(Task):
    """The ``lm`` task: next-token prediction with the decoder's own output projection."""

    def __init__(self, cfg: LanguageModelingConfig, model: nn.Module):
        super().__init__(cfg, model)
        self.tokenizer = cfg.tokenizer.load(model.cfg.vocab_size)

    def forward(self, batch: LMBatch) -> TaskOutput:
        inputs_BT, targets_BT = batch.ids_BT[:, :-1], batch.ids_BT[:, 1:]
        out = self.model(inputs_BT)
        logits_BTV = self.model.logits(out.hidden).float()
        lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        loss = lm_loss + out.aux_loss
        parts = {"lm_loss": lm_loss.detach(), "aux_loss": out.aux_loss.detach(),
                 "lm_acc": (logits_BTV.argmax(-1) == targets_BT).float().mean()}
        if self.cfg.z_loss_weight:
            z_loss = torch.logsumexp(logits_BTV, dim=-1).pow(2).mean()
            loss = loss + self.cfg.z_loss_weight * z_loss
            parts["z_loss"] = z_loss.detach()
        return TaskOutput(loss, parts, samples=inputs_BT.shape[0], tokens=inputs_BT.numel(), moe_stats=[out.moe_stats])

    def train_data(self, *, seed: int, num_workers: int, pin_memory: bool = False) -> SingleStream:
        processor = LMProcessor(self.tokenizer, self.cfg.text.max_len)
        return SingleStream("text", self.cfg.text.loader(processor, seed=derive_seed(seed, 0), num_workers=num_workers,
                                                         pin_memory=pin_memory))
