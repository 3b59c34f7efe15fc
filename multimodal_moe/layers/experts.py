"""The experts of a sparse MoE layer: E independent FFNs stored as 3-D weight tensors, run on
rows sorted by expert (a grouped matmul with device offsets) or in blocks (batched matmuls),
in one dtype (autocast's where it is on). :mod:`.moe` routes tokens to them; the dispatch
layouts and when each is taken are described there.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import ACTIVATIONS, Activation

__all__ = ["GroupedExperts", "compute_dtype", "grouped_matmul"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``_grouped_mm`` needs one)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _PerExpertMatmul(torch.autograd.Function):
    """One ``mm`` per expert into a preallocated output, forward and backward (no split/cat
    copies): the CPU fallback for dtypes and strides ``torch._grouped_mm`` does not take."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, counts: list[int]):
        ctx.save_for_backward(x_MK, w_EKN)
        ctx.counts = counts
        out_MN = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[2])
        for e, rows in enumerate(_spans(counts)):
            torch.mm(x_MK[rows], w_EKN[e], out=out_MN[rows])
        return out_MN

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_EKN = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x_MK.new_empty(x_MK.shape)
            for e, rows in enumerate(_spans(ctx.counts)):
                torch.mm(grad_MN[rows], w_EKN[e].t(), out=grad_x[rows])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_EKN)  # experts without rows get zero gradient
            for e, rows in enumerate(_spans(ctx.counts)):
                if rows.stop > rows.start:
                    torch.mm(x_MK[rows].t(), grad_MN[rows], out=grad_w[e])
        return grad_x, grad_w, None


def _spans(counts: list[int]) -> list[slice]:
    ends = list(itertools.accumulate(counts))
    return [slice(end - n, end) for n, end in zip(counts, ends)]


def _grouped_kernel(dtype: torch.dtype, device: torch.device, widths) -> bool:
    """Whether ``torch._grouped_mm`` has a kernel without a host sync for ``dtype`` on ``device``
    and these row widths (each 16-byte aligned). On CUDA that is bf16 on compute capability 9.x
    (Hopper) and 10.x (Blackwell): other dtypes and GPUs take a fallback that copies the offsets
    to the host. Traced by ``torch.compile`` the op takes only bf16. The eager CPU kernel takes
    fp32, bf16 and fp16."""
    if not hasattr(torch, "_grouped_mm") or not all(w % (16 // dtype.itemsize) == 0 for w in widths):
        return False
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda" and _cuda_major(device.index) not in (9, 10):
        return False
    return dtype == torch.bfloat16


def _cuda_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _grouped_mm_supported(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """Whether :func:`grouped_matmul` of these operands takes ``torch._grouped_mm``."""
    return x_MK.dtype == w_EKN.dtype and _grouped_kernel(x_MK.dtype, x_MK.device, (x_MK.shape[1], w_EKN.shape[2]))


def grouped_matmul(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_MK`` sorted by expert, expert e's rows ending at ``offsets_E[e]`` (int32,
    the last one M) -> (M, N): each row times its expert's matrix. ``torch._grouped_mm`` where
    :func:`_grouped_mm_supported` (no host sync); otherwise one matmul per expert, which reads
    the offsets on the host."""
    if offsets_E.dtype != torch.int32:
        raise TypeError(f"grouped_matmul takes int32 offsets (where each expert's rows end), got {offsets_E.dtype}")
    if _grouped_mm_supported(x_MK, w_EKN):
        return _ContiguousGrad.apply(torch._grouped_mm(x_MK.contiguous(), w_EKN, offs=offsets_E))
    offsets = offsets_E.tolist()  # a host sync off the CPU; TopKMoE avoids this path there
    return _PerExpertMatmul.apply(x_MK, w_EKN, [b - a for a, b in zip([0] + offsets[:-1], offsets)])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's where it is on (``_grouped_mm`` is not on
    autocast's list, so both operands are cast by hand), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedExperts(nn.Module):
    """E independent FFNs stored as 3-D tensors: ``w1_EDF``, ``w2_EFD`` (and ``w3_EDF`` for
    SwiGLU), run in :func:`compute_dtype` (input and weights cast to one dtype). With ``bias``
    each has the biases of :class:`~.ffn.DenseFFN`'s linear layers (``b1_EF``, ``b2_ED``, ``b3_EF``),
    with ``sub_ln`` its Sub-LN (a LayerNorm of the inner activations, ``norm_weight_EF`` /
    ``norm_bias_EF``): then expert e computes exactly what a dense FFN of the same config does,
    which sparse upcycling (:mod:`multimodal_moe.upcycle`) relies on.

    - ``forward(x_MD, offsets_E, scale_M)``: rows sorted by expert (grouped matmul);
    - ``forward_batched(x_BMD, expert_B)``: M rows for every expert, or for the expert of each
      of B blocks (batched matmul).

    ``holds_all_experts`` is False for a subclass holding only some of them (expert
    parallelism), which takes only the sorted rows.
    """

    holds_all_experts = True
    # every per-expert tensor (first dimension E), as expert parallelism shards them
    PER_EXPERT = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED", "norm_weight_EF", "norm_bias_EF")

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: Activation, init_scale: float = 1.0,
                 *, bias: bool = False, sub_ln: bool = False):
        super().__init__()

        def weight(fan_in: int, *shape: int) -> nn.Parameter:
            bound = init_scale / math.sqrt(fan_in)  # nn.Linear's default bound (its bias's too)
            return nn.Parameter(torch.empty(num_experts, *shape).uniform_(-bound, bound))

        swiglu = activation == "swiglu"
        self.w1_EDF = weight(dim, dim, hidden_dim)
        self.w3_EDF = weight(dim, dim, hidden_dim) if swiglu else None
        self.w2_EFD = weight(hidden_dim, hidden_dim, dim)
        self.b1_EF = weight(dim, hidden_dim) if bias else None
        self.b3_EF = weight(dim, hidden_dim) if bias and swiglu else None
        self.b2_ED = weight(hidden_dim, dim) if bias else None
        self.norm_weight_EF = nn.Parameter(torch.ones(num_experts, hidden_dim)) if sub_ln else None
        self.norm_bias_EF = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if sub_ln else None
        self.activation = activation

    def forward(self, x_MD: torch.Tensor, offsets_E: torch.Tensor, scale_M: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Rows sorted by expert, expert e's ending at ``offsets_E[e]`` (int32); rows after the
        last offset belong to no expert and must have ``scale_M`` 0: they output zeros (here they
        are computed with the last expert, so that no slice has a data-dependent size).
        ``scale_M`` multiplies each row's output (the gates), applied to whichever of the hidden
        or the output is narrower."""
        offsets_E = torch.cat([offsets_E[:-1], offsets_E.new_full((1,), x_MD.shape[0])])
        pick = None
        if self.b1_EF is not None or self.norm_weight_EF is not None:  # each row's expert, on the device
            rows_M = torch.arange(x_MD.shape[0], device=x_MD.device, dtype=offsets_E.dtype)
            expert_M = torch.searchsorted(offsets_E, rows_M, right=True).clamp_(max=offsets_E.shape[0] - 1)
            pick = lambda p_EX: p_EX.index_select(0, expert_M)  # noqa: E731
        return self._mlp(x_MD, lambda x, w: grouped_matmul(x, w, offsets_E), scale_M, pick)

    def forward_batched(self, x_BMD: torch.Tensor, expert_B: torch.Tensor | None = None) -> torch.Tensor:
        """M rows for every expert at once: (E, M, D) -> (E, M, D) by batched matmuls; or B
        blocks of M rows, block b for expert ``expert_B[b]`` (its weights gathered per block;
        the matmuls keep the gathered copies for the backward pass)."""
        if expert_B is None:
            return self._mlp(x_BMD, torch.bmm, pick=lambda p_EX: p_EX[:, None])
        return self._mlp(x_BMD, lambda x, w: torch.bmm(x, w.index_select(0, expert_B)),
                         pick=lambda p_EX: p_EX.index_select(0, expert_B)[:, None])

    def grouped_without_sync(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` of ``x`` makes no host sync worth avoiding: a grouped kernel
        takes the dtype, or the input is on the CPU, where the per-expert loop's read of the
        offsets costs nothing."""
        if _grouped_kernel(compute_dtype(x), x.device, self.w1_EDF.shape[1:]):
            return True
        return x.device.type == "cpu" and not torch.compiler.is_compiling()

    def _mlp(self, x, matmul, scale=None, pick=None):
        """``matmul(rows, w_E..)`` applies each row's expert matrix; ``pick(p_EX)`` gives each row
        its expert's vector (biases, Sub-LN affine), broadcastable against the rows."""
        dtype = compute_dtype(x)
        x = x.to(dtype)

        def plus(h, b_EX):
            return h if b_EX is None else h + pick(b_EX.to(dtype))

        w1, w2 = self.w1_EDF.to(dtype), self.w2_EFD.to(dtype)
        h = plus(matmul(x, w1), self.b1_EF)
        h = F.silu(h) * plus(matmul(x, self.w3_EDF.to(dtype)), self.b3_EF) if self.activation == "swiglu" else \
            ACTIVATIONS[self.activation](h)
        if self.norm_weight_EF is not None:  # LayerNorm(F) with each expert's affine in fp32, as DenseFFN's
            normed = F.layer_norm(h, h.shape[-1:], eps=1e-5).float()  # ffn_norm is under autocast
            h = (normed * pick(self.norm_weight_EF.float()) + pick(self.norm_bias_EF.float())).to(dtype)
        hidden_dim, dim = w2.shape[1:]
        if scale is not None and hidden_dim <= dim:  # (s h) W2 + s b2 = s (h W2 + b2)
            s_M1 = scale.to(dtype)[:, None]
            y = matmul(h * s_M1, w2)
            return y if self.b2_ED is None else y + s_M1 * pick(self.b2_ED.to(dtype))
        y = plus(matmul(h, w2), self.b2_ED)
        return y if scale is None else y * scale.to(dtype)[:, None]
