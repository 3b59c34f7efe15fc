"""Multi-head self-attention with Multiway projections, Sub-LN, RoPE and two kernels.

- Kernels: ``F.scaled_dot_product_attention`` (SDPA) everywhere; xformers'
  ``memory_efficient_attention`` only when it is installed and the tensors are on CUDA
  (xformers has no CPU kernels). ``attention_backend``: ``auto`` picks xformers when it can
  run and SDPA otherwise; ``sdpa`` always SDPA; ``xformers`` insists and fails clearly where
  it cannot run.
- Masks: key padding (True marks padding, torchscale's convention), causal, or any boolean
  (T, T) mask of allowed query-key pairs (the captioning mask of unilm's BEiT-3, which
  torchscale takes as an additive ``attn_mask``), each alone or with key padding.
- Sub-LN (Magneto, arXiv 2210.06423): a LayerNorm on the attention output before the output
  projection (torchscale's ``inner_attn_ln``). Init as torchscale: q/k/v Xavier-uniform with
  gain 1/sqrt(2), out Xavier-uniform with zero bias, then v and out scaled by ``init_scale``.
- RoPE (RoFormer, arXiv 2104.09864) in the rotate-half form, for the decoder LM.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .multiway import per_modality, route

__all__ = ["Attention", "AttentionBackend", "RotaryEmbedding", "attend", "xformers_installed"]

AttentionBackend = Literal["auto", "sdpa", "xformers"]


@functools.cache
def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def attend(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, *,
           key_padding_mask_BT: torch.Tensor | None = None, causal: bool = False,
           allowed_TT: torch.Tensor | None = None, backend: AttentionBackend = "auto",
           dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + mask) v`` -> (B, H, T, d).

    Args:
        key_padding_mask_BT: True where the key is padding; those keys get zero weight.
        causal: query t attends to keys <= t only.
        allowed_TT: bool, True where query t may attend key s (not with ``causal``); every
            row must allow at least one key that is not padding.
        backend: see the module docstring.
    """
    if allowed_TT is not None:
        T = q_BHTd.shape[-2]
        if causal or allowed_TT.shape != (T, T) or allowed_TT.dtype != torch.bool:
            raise ValueError(f"allowed_TT must be a bool ({T}, {T}) mask and excludes causal=True; got "
                             f"{allowed_TT.dtype} {tuple(allowed_TT.shape)}, causal={causal}")
    on_cuda = q_BHTd.is_cuda
    if backend == "xformers" and not (xformers_installed() and on_cuda):
        where = "xformers is not installed" if not xformers_installed() else f"the tensors are on {q_BHTd.device.type}"
        raise RuntimeError(f"attention_backend='xformers' cannot run: {where}; xformers attention needs CUDA "
                           "tensors and `pip install 'multimodal_moe[xformers]'`. Use attention_backend=auto or sdpa.")
    if backend != "sdpa" and on_cuda and xformers_installed():
        return _xformers_attention(q_BHTd, k_BHTd, v_BHTd, key_padding_mask_BT, causal, dropout_p, allowed_TT)
    if allowed_TT is not None:
        allowed = allowed_TT if key_padding_mask_BT is None else allowed_TT & ~key_padding_mask_BT[:, None, None, :]
        return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, attn_mask=allowed, dropout_p=dropout_p)
    if key_padding_mask_BT is None:
        return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, dropout_p=dropout_p, is_causal=causal)
    allowed_B11T = ~key_padding_mask_BT[:, None, None, :]
    if causal:
        # A left-padded query sees no key at all; some kernels (and torch < 2.5-era SDPA) turn
        # it to NaN, which then leaks through 0 * NaN. Let every query see itself.
        T = q_BHTd.shape[-2]
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTd.device).tril()
        allowed_B11T = (allowed_B11T & causal_TT) | torch.eye(T, dtype=torch.bool, device=q_BHTd.device)
    return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, attn_mask=allowed_B11T, dropout_p=dropout_p)


def _xformers_attention(q_BHTd, k_BHTd, v_BHTd, key_padding_mask_BT, causal, dropout_p, allowed_TT=None):
    import xformers.ops as xops

    B, H, T, _ = q_BHTd.shape
    bias = None
    if allowed_TT is not None:  # an arbitrary mask: a dense -inf bias, 8-aligned as below
        bias = q_BHTd.new_zeros(B, H, T, (T + 7) // 8 * 8)[..., :T]
        bias.masked_fill_(~allowed_TT, float("-inf"))
        if key_padding_mask_BT is not None:
            bias.masked_fill_(key_padding_mask_BT[:, None, None, :], float("-inf"))
    elif key_padding_mask_BT is not None:
        # xformers wants a bias whose last dim is stored 8-aligned: allocate wider, slice.
        storage = q_BHTd.new_zeros(B, H, T, (T + 7) // 8 * 8)
        bias = storage[..., :T]
        bias.masked_fill_(key_padding_mask_BT[:, None, None, :], float("-inf"))
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q_BHTd.device).triu(1)
            bias.masked_fill_(future, float("-inf"))
            bias.diagonal(dim1=-2, dim2=-1).zero_()  # as in the SDPA path
    elif causal:
        bias = xops.LowerTriangularMask()
    out_BTHd = xops.memory_efficient_attention(
        q_BHTd.transpose(1, 2), k_BHTd.transpose(1, 2), v_BHTd.transpose(1, 2), attn_bias=bias, p=dropout_p)
    return out_BTHd.transpose(1, 2)


class RotaryEmbedding(nn.Module):
    """Rotary position tables: ``forward(T) -> (cos_Td, sin_Td)`` for head dim d."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_Td2 = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles_Td = torch.cat([angles_Td2, angles_Td2], dim=-1)
        self.register_buffer("cos_Td", angles_Td.cos(), persistent=False)
        self.register_buffer("sin_Td", angles_Td.sin(), persistent=False)

    def forward(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_Td[:num_tokens], self.sin_Td[:num_tokens]


def apply_rotary(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    first, second = x_BHTd.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x_BHTd * cos_Td + rotated * sin_Td).to(x_BHTd.dtype)


class Attention(nn.Module):
    """Self-attention whose projections (and Sub-LN) may be per-modality.

    Args:
        dim: model width D.
        heads: number of heads H; D must be divisible by H.
        branches: Multiway branch names for q/k/v/out and the Sub-LN (``("vision", "text")``
            for BEiT-3's decoupled layout), or ``()`` for shared projections.
        sub_ln: LayerNorm before the output projection.
        backend: attention kernel, see :func:`attend`.
        init_scale: Sub-LN init factor for the v and out projections.
        norm_eps: epsilon of the Sub-LN.
    """

    def __init__(self, dim: int, heads: int, *, branches: tuple[str, ...] = (), sub_ln: bool = True,
                 backend: AttentionBackend = "auto", init_scale: float = 1.0, norm_eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.backend = backend

        def linear(gain: float, scale: float) -> nn.Module:
            def make() -> nn.Linear:
                layer = nn.Linear(dim, dim)
                nn.init.xavier_uniform_(layer.weight, gain=gain)
                with torch.no_grad():
                    layer.weight.mul_(scale)
                    layer.bias.mul_(scale)
                return layer
            return per_modality(make, branches)

        self.q_proj = linear(1 / math.sqrt(2), 1.0)
        self.k_proj = linear(1 / math.sqrt(2), 1.0)
        self.v_proj = linear(1 / math.sqrt(2), init_scale)
        self.inner_norm = per_modality(lambda: nn.LayerNorm(dim, eps=norm_eps), branches) if sub_ln else None
        self.out_proj = linear(1.0, init_scale)
        for out in self.out_proj.modules():
            if isinstance(out, nn.Linear):
                nn.init.zeros_(out.bias)

    def forward(self, x_BTD: torch.Tensor, *, num_vision: int = 0, key_padding_mask_BT: torch.Tensor | None = None,
                causal: bool = False, allowed_TT: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape

        def heads(proj: nn.Module) -> torch.Tensor:
            return route(proj, x_BTD, num_vision).view(B, T, self.heads, D // self.heads).transpose(1, 2)

        q_BHTd, k_BHTd, v_BHTd = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        if rope is not None:
            q_BHTd, k_BHTd = apply_rotary(q_BHTd, *rope), apply_rotary(k_BHTd, *rope)
        o_BHTd = attend(q_BHTd, k_BHTd, v_BHTd, key_padding_mask_BT=key_padding_mask_BT, causal=causal,
                        allowed_TT=allowed_TT, backend=self.backend)
        o_BTD = o_BHTd.transpose(1, 2).reshape(B, T, D)
        if self.inner_norm is not None:
            o_BTD = route(self.inner_norm, o_BTD, num_vision)
        return route(self.out_proj, o_BTD, num_vision)
