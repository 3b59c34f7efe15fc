"""The pre-LN Transformer block shared by the Multiway encoder and the decoder LM.

    x = x + DropPath(Attention(LN(x)))          # Sub-LN inside the attention
    x = x + DropPath(FFN(LN(x)))                # any FFN kind; Sub-LN inside the FFN

as torchscale's ``EncoderLayer`` with its default ``subln=True`` (Magneto, arXiv 2210.06423).
Which parts are per-modality is a constructor choice: everything (BEiT-3's released
"decoupled" layout), only the FFN and its LayerNorm (the paper/VLMo layout, optionally with a
``vision_language`` FFN), or nothing (the decoder LM). The block never branches on the FFN
kind; it calls the FFN interface of :mod:`multimodal_moe.layers.ffn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionBackend
from .ffn import FFNConfig
from .multiway import Multiway, per_modality, route, segments

__all__ = ["Block", "BlockStats", "run_blocks"]

# Per block: FFN branch name ("shared" for a shared FFN) -> that FFN's stats.
BlockStats = dict[str, dict[str, torch.Tensor]]


class Block(nn.Module):
    """One Transformer layer with optional Multiway routing.

    Args:
        dim: model width D.
        heads: attention heads H.
        ffns: one FFN config (shared FFN) or branch name -> FFN config (Multiway FFN).
        make_norm: builds one LayerNorm/RMSNorm of width D.
        attention_branches: Multiway branches of the attention and its LayerNorm; ``()`` shares
            them.
        sub_ln: Sub-LN inside the attention (the FFN's own config decides for the FFN).
        backend: attention kernel.
        drop_path: stochastic-depth rate of this layer.
        init_scale: Sub-LN init factor for the residual-path projections.
    """

    def __init__(self, *, dim: int, heads: int, ffns: FFNConfig | dict[str, FFNConfig],
                 make_norm: Callable[[], nn.Module], attention_branches: tuple[str, ...] = (),
                 sub_ln: bool = True, backend: AttentionBackend = "auto", drop_path: float = 0.0,
                 init_scale: float = 1.0, norm_eps: float = 1e-5):
        super().__init__()
        self.attn_norm = per_modality(make_norm, attention_branches)
        self.attn = Attention(dim, heads, branches=attention_branches, sub_ln=sub_ln, backend=backend,
                              init_scale=init_scale, norm_eps=norm_eps)
        if isinstance(ffns, FFNConfig):
            self.ffn_norm = make_norm()
            self.ffn = ffns.build(dim, init_scale=init_scale)
        else:
            self.ffn_norm = Multiway({name: make_norm() for name in ffns})
            self.ffn = Multiway({name: cfg.build(dim, init_scale=init_scale) for name, cfg in ffns.items()})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_BTD: torch.Tensor, *, num_vision: int = 0, token_mask_BT: torch.Tensor | None = None,
                causal: bool = False, allowed_TT: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, BlockStats]:
        """Returns the new hidden states, this layer's FFN aux loss and its FFN stats.

        Args:
            x_BTD: ``[vision ; text]`` tokens (or text only).
            num_vision: how many leading tokens are vision tokens.
            token_mask_BT: True for real tokens, False for padding (None: no padding).
            causal: causal attention (decoder LM).
            allowed_TT: bool (T, T), True where a query may attend a key (captioning's mask).
            rope: RoPE (cos, sin) tables for T positions.
        """
        padding_BT = None if token_mask_BT is None else ~token_mask_BT
        h_BTD = route(self.attn_norm, x_BTD, num_vision)
        x_BTD = x_BTD + self.drop_path(self.attn(h_BTD, num_vision=num_vision, key_padding_mask_BT=padding_BT,
                                                 causal=causal, allowed_TT=allowed_TT, rope=rope))
        parts, aux_loss, stats = [], x_BTD.new_zeros(()), {}
        for name, span in segments(self.ffn, num_vision, x_BTD.shape[1]):
            norm = self.ffn_norm if name is None else self.ffn_norm[name]
            ffn = self.ffn if name is None else self.ffn[name]
            out = ffn(norm(x_BTD[:, span]), token_mask_BT=None if token_mask_BT is None else token_mask_BT[:, span])
            parts.append(out.hidden)
            aux_loss = aux_loss + out.aux_loss
            if out.stats:
                stats[name or "shared"] = out.stats
        ffn_BTD = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return x_BTD + self.drop_path(ffn_BTD), aux_loss, stats

    def observe(self, stats: BlockStats) -> None:
        """Hand each FFN that learns from its routing between optimizer steps (``observe``:
        loss-free balancing's loads) the stats of a forward pass of this block that was run."""
        for name, ffn_stats in stats.items():
            ffn = self.ffn if name == "shared" else self.ffn[name]
            if hasattr(ffn, "observe"):
                ffn.observe(ffn_stats)


def run_blocks(blocks: Sequence[Block], x_BTD: torch.Tensor, *, grad_checkpointing: bool = False, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor, list[BlockStats]]:
    """Run ``blocks`` in order; returns hidden states, the summed aux loss and per-layer stats.

    With ``grad_checkpointing`` (and grad enabled) each block's activations are recomputed in
    the backward pass instead of stored.
    """
    aux_loss, layer_stats = x_BTD.new_zeros(()), []
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x_BTD, aux, stats = checkpoint(block, x_BTD, use_reentrant=False, **kwargs)
        else:
            x_BTD, aux, stats = block(x_BTD, **kwargs)
        block.observe(stats)  # here, not in the forward, which checkpointing reruns
        aux_loss = aux_loss + aux
        layer_stats.append(stats)
    return x_BTD, aux_loss, layer_stats
