"""Causal decoder language model with the same blocks and FFN interface as the encoder.

The backbone of the LM experiments of the MoE papers: MH-MoE (arXiv 2404.15045; a 12-layer,
768-wide GPT with RoPE), Mixture of Tokens (arXiv 2310.15961; GPT Medium/Base) and OpenMoE
(arXiv 2402.01739). Pre-LN blocks with Sub-LN (torchscale's decoder default), LayerNorm or
RMSNorm, RoPE or learned absolute positions, and an output projection tied to the token
embedding or separate. ``forward`` returns hidden states; :meth:`DecoderLM.logits` applies the
output projection, which the ``lm`` objective calls.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..configurable import ConfigError, config
from ..layers.attention import RotaryEmbedding
from ..layers.block import Block, run_blocks
from .base import ModelConfig, ModelOutput

__all__ = ["DecoderLM", "DecoderLMConfig"]


@ModelConfig.register("decoder_lm")
@config
class DecoderLMConfig(ModelConfig):
    """Causal LM. Fields beyond :class:`ModelConfig`:

    Attributes:
        vocab_size: token embedding rows V (match your tokenizer).
        max_seq_len: longest sequence (RoPE table or position-table rows).
        positions: rope | learned.
        rope_theta: RoPE base.
        tie_embeddings: the output projection shares the token embedding's weight.
    """

    vocab_size: int
    max_seq_len: int = 1024
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def check(self) -> None:
        ModelConfig.check(self)
        for name in ("vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.positions == "rope" and (self.dim // self.heads) % 2:
            raise ConfigError("positions", f"rope needs an even head dim, got dim/heads = {self.dim // self.heads}")
        for name in ("ffn", "moe_ffn"):
            if getattr(getattr(self, name), "routing", None) == "expert_choice":
                raise ConfigError(f"{name}.routing", "expert choice lets each expert pick among all the batch's "
                                                     "tokens, so a token's experts depend on the tokens after it: a "
                                                     "causal LM would see the future (MoMa's auxiliary routers, arXiv "
                                                     "2407.21770, are the fix, not built here); use token_choice")

    def build(self) -> DecoderLM:
        return DecoderLM(self)


class DecoderLM(nn.Module):
    """Decoder-only causal LM; build it from a :class:`DecoderLMConfig`."""

    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.tok_embed.weight, std=cfg.dim ** -0.5)
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, cfg.max_seq_len, cfg.dim), std=0.02))
            self.rope = None
        else:
            self.pos_embed = None
            self.rope = RotaryEmbedding(cfg.dim // cfg.heads, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(
            Block(dim=cfg.dim, heads=cfg.heads, ffns=cfg.moe_ffn if cfg.is_moe_layer(i) else cfg.ffn,
                  make_norm=cfg.norm_factory(), sub_ln=cfg.sub_ln, backend=cfg.attention_backend, drop_path=rate,
                  init_scale=cfg.init_scale, norm_eps=cfg.norm_eps)
            for i, rate in enumerate(cfg.drop_path_rates()))
        self.final_norm = cfg.norm_factory()()
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.dim ** -0.5)

    def forward(self, ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None = None) -> ModelOutput:
        """Hidden states after the final norm.

        Args:
            ids_BT: (B, T) token ids.
            padding_mask_BT: (B, T) bool, True marks padding (never attended to).
        """
        T = ids_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence has {T} tokens but max_seq_len is {self.cfg.max_seq_len}")
        if padding_mask_BT is not None and (padding_mask_BT.shape != ids_BT.shape
                                            or padding_mask_BT.dtype != torch.bool):
            raise ValueError(f"padding_mask_BT must be a bool tensor of shape {tuple(ids_BT.shape)}, "
                             f"got {padding_mask_BT.dtype} {tuple(padding_mask_BT.shape)}")
        x_BTD = self.tok_embed(ids_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed[:, :T]
        token_mask_BT = None if padding_mask_BT is None else ~padding_mask_BT
        x_BTD, aux_loss, stats = run_blocks(
            self.layers, x_BTD, grad_checkpointing=self.cfg.grad_checkpointing, token_mask_BT=token_mask_BT,
            causal=True, rope=None if self.rope is None else self.rope(T))
        return ModelOutput(self.final_norm(x_BTD), aux_loss, stats, token_mask=token_mask_BT)

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        return self.lm_head(hidden_BTD)
