"""The feed-forward interface shared by every FFN variant, and the dense FFN.

Every FFN — dense, top-k MoE, Multi-Head MoE, Mixture of Tokens — is built from a config
registered in :class:`FFNConfig` and is called the same way::

    out = ffn(x_BTD, token_mask_BT=mask)   # mask: True for real tokens, False for padding
    out.hidden      # (B, T, D)
    out.aux_loss    # scalar, already weighted (0 for dense)
    out.stats       # {name: tensor}; empty for dense

so a Transformer block is handed an FFN config and never branches on the variant. An FFN that
learns from its routing between optimizer steps (loss-free balancing) also has
``observe(stats)``, which :func:`~.block.run_blocks` calls with the stats of each forward of a
block it runs (not again when activation checkpointing recomputes one).

The dense FFN follows torchscale's ``FeedForwardNetwork`` with Sub-LN ("Magneto",
Foundation Transformers, arXiv 2210.06423): ``fc2(LN(act(fc1(x))))``; the inner LayerNorm is
optional (``sub_ln``). SwiGLU (GLU Variants Improve Transformer, arXiv 2002.05202) is
``fc2(LN(silu(fc1(x)) * fc3(x)))`` with ``hidden_dim`` the width of each of fc1 and fc3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import ConfigError, Registry, config

__all__ = ["DenseFFN", "DenseFFNConfig", "FFNConfig", "FFNOutput"]


@dataclass
class FFNOutput:
    """What every FFN returns.

    Attributes:
        hidden: (B, T, D) output; padded positions hold unspecified values.
        aux_loss: scalar auxiliary loss, already multiplied by its coefficients.
        stats: detached per-layer statistics (token counts per expert, dropped tokens, ...).
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class FFNConfig(Registry):
    """Base of the FFN family; ``kind`` selects the implementation."""

    def check_dim(self, dim: int) -> None:
        """Raise :class:`ConfigError` if this FFN cannot be built for model width ``dim``."""

    def build(self, dim: int, *, init_scale: float = 1.0) -> nn.Module:
        """The FFN for model width ``dim``.

        Args:
            dim: model width D (input and output size).
            init_scale: factor applied to the initial weights of the layers on the residual
                path (Sub-LN's sqrt(log 2N)); 1 leaves the default init.
        """
        raise NotImplementedError


Activation = Literal["gelu", "relu", "silu", "swiglu"]


@FFNConfig.register("dense")
@config
class DenseFFNConfig(FFNConfig):
    """A position-wise two-layer MLP (or SwiGLU).

    Attributes:
        hidden_dim: inner width F (per branch for SwiGLU).
        activation: gelu | relu | silu, or swiglu for the gated variant.
        sub_ln: LayerNorm on the inner activations before the output projection (Magneto).
        bias: biases on the linear layers.
        dropout: dropout on the inner activations.
    """

    hidden_dim: int
    activation: Activation = "gelu"
    sub_ln: bool = True
    bias: bool = True
    dropout: float = 0.0

    def check(self) -> None:
        if self.hidden_dim <= 0:
            raise ConfigError("hidden_dim", f"must be positive, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")

    def build(self, dim: int, *, init_scale: float = 1.0) -> DenseFFN:
        return DenseFFN(dim, self, init_scale=init_scale)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": F.silu}


class DenseFFN(nn.Module):
    """Dense FFN. ``forward(x_BTD, *, token_mask_BT=None) -> FFNOutput``.

    Args:
        dim: model width D.
        cfg: its :class:`DenseFFNConfig`.
        init_scale: multiplies the initial fc1/fc2 (and fc3) weights and biases, as
            torchscale's Sub-LN init does for every FFN linear.
    """

    def __init__(self, dim: int, cfg: DenseFFNConfig, *, init_scale: float = 1.0):
        super().__init__()
        hidden = cfg.hidden_dim
        self.fc1 = nn.Linear(dim, hidden, bias=cfg.bias)
        self.fc3 = nn.Linear(dim, hidden, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-5) if cfg.sub_ln else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=cfg.bias)
        self.activation = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            for linear in (self.fc1, self.fc2, self.fc3):
                if linear is not None:
                    for p in linear.parameters():
                        p.mul_(init_scale)

    def forward(self, x_BTD: torch.Tensor, *, token_mask_BT: torch.Tensor | None = None) -> FFNOutput:
        # Position-wise: padding cannot leak, so the mask is not needed here.
        h_BTF = self.activation(self.fc1(x_BTD))
        if self.fc3 is not None:
            h_BTF = h_BTF * self.fc3(x_BTD)
        h_BTF = self.dropout(self.ffn_norm(h_BTF))
        return FFNOutput(self.fc2(h_BTF), x_BTD.new_zeros(()))
