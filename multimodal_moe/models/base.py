"""What every model shares: the config fields of a Transformer stack and the output type."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import torch
from torch import nn

from ..configurable import ConfigError, Registry, config
from ..layers.attention import AttentionBackend, xformers_installed
from ..layers.block import BlockStats
from ..layers.ffn import FFNConfig

__all__ = ["ModelConfig", "ModelOutput"]


@config
class ModelConfig(Registry):
    """Base of the model family; ``kind`` selects the model (``multiway_encoder``,
    ``decoder_lm``), whose config adds its own fields to these:

    Attributes:
        depth: number of layers N.
        dim: model width D.
        heads: attention heads H (D must be divisible by H).
        ffn: FFN used in every layer (any registered FFN kind).
        norm: layernorm | rmsnorm.
        norm_eps: epsilon of every norm.
        sub_ln: Sub-LN in attention and its init scaling sqrt(log 2N) (torchscale default).
        attention_backend: auto | sdpa | xformers (see ``layers.attention``).
        drop_path: stochastic depth, rising linearly from 0 to this rate over the layers.
        grad_checkpointing: recompute each block's activations in the backward pass.
        moe_ffn: the FFN of the MoE layers (any FFN kind); null: every layer uses ``ffn``.
        moe_every: layer i (0-based) is a MoE layer when (i + 1) % moe_every == 0
            (torchscale's ``moe_freq``; 2 = every second layer, ending with the last).
        moe_layers: explicit 0-based MoE layer indices (instead of ``moe_every``).
    """

    depth: int
    dim: int
    heads: int
    ffn: FFNConfig
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    sub_ln: bool = True
    attention_backend: AttentionBackend = "auto"
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    moe_ffn: FFNConfig | None = None
    moe_every: int = 0
    moe_layers: tuple[int, ...] = ()

    # fields a fine-tuning config sets for a backbone whose architecture comes from a checkpoint
    # (mmoe finetune --init): how the model runs, not what its weights are (the encoder adds its
    # image size, to which the loaded vision position table is resized)
    FINETUNE_FIELDS: ClassVar[tuple[str, ...]] = ("drop_path", "grad_checkpointing", "attention_backend")

    def with_finetune_fields_of(self, other: ModelConfig) -> ModelConfig:
        """This architecture with ``other``'s :attr:`FINETUNE_FIELDS` (those it has)."""
        return dataclasses.replace(self, **{name: getattr(other, name) for name in self.FINETUNE_FIELDS
                                            if hasattr(other, name)})

    def check(self) -> None:
        for name in ("depth", "dim", "heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ConfigError("heads", f"dim {self.dim} is not divisible by heads {self.heads}; "
                                       f"choose heads among the divisors of dim")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("drop_path", f"must be in [0, 1), got {self.drop_path}")
        if self.norm_eps <= 0:
            raise ConfigError("norm_eps", f"must be positive, got {self.norm_eps}")
        self._check_moe_placement()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, FFNConfig):
                try:
                    value.check_dim(self.dim)
                except ConfigError as e:
                    raise e.under(f.name) from None
        if self.attention_backend == "xformers" and not xformers_installed():
            raise ConfigError("attention_backend", "'xformers' is not installed (pip install "
                                                   "'multimodal_moe[xformers]', CUDA only); use 'auto' or 'sdpa'")

    def _check_moe_placement(self) -> None:
        if self.moe_every < 0:
            raise ConfigError("moe_every", f"must be >= 0, got {self.moe_every}")
        if self.moe_every and self.moe_layers:
            raise ConfigError("moe_layers", "set either moe_every or moe_layers, not both")
        bad = [i for i in self.moe_layers if not 0 <= i < self.depth]
        if bad:
            raise ConfigError("moe_layers", f"{bad} are not layers of a depth-{self.depth} model (0-based)")
        placed = bool(self.moe_every or self.moe_layers)
        if self.moe_ffn is not None and not placed:
            raise ConfigError("moe_ffn", "is set but no layer uses it; set moe_every or moe_layers")
        if placed and self.moe_ffn is None:
            raise ConfigError("moe_ffn", "is null but moe_every/moe_layers place MoE layers; set moe_ffn")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) uses ``moe_ffn``."""
        if self.moe_every:
            return (layer + 1) % self.moe_every == 0
        return layer in self.moe_layers

    @property
    def init_scale(self) -> float:
        """Sub-LN init factor sqrt(log 2N) for residual-path projections (1 without Sub-LN)."""
        return math.sqrt(math.log(2 * self.depth)) if self.sub_ln else 1.0

    def norm_factory(self) -> Callable[[], nn.Module]:
        norm = nn.LayerNorm if self.norm == "layernorm" else nn.RMSNorm
        return lambda: norm(self.dim, eps=self.norm_eps)

    def drop_path_rates(self) -> list[float]:
        return [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def build(self) -> nn.Module:
        raise NotImplementedError


@dataclass
class ModelOutput:
    """What models return: hidden states, never losses (tasks own those).

    Attributes:
        hidden: (B, T, D) final hidden states; for the encoder ``[vision ; text]``.
        aux_loss: scalar sum of the FFN auxiliary losses over layers (0 for dense).
        moe_stats: per layer, FFN branch name -> that FFN's stats (empty dicts for dense).
        num_vision: how many leading tokens are vision tokens (0 for text-only and LMs).
        token_mask: (B, T) True for real tokens, or None when nothing is padded.
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list[BlockStats] = field(default_factory=list)
    num_vision: int = 0
    token_mask: torch.Tensor | None = None

    @property
    def vision_hidden(self) -> torch.Tensor:
        """(B, 1+P, D): the image CLS token then the patches."""
        return self.hidden[:, : self.num_vision]

    @property
    def text_hidden(self) -> torch.Tensor:
        """(B, L, D)."""
        return self.hidden[:, self.num_vision:]
