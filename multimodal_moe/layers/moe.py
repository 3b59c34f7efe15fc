"""Sparse Mixture-of-Experts FFNs with token-choice top-k routing.

- ``topk_moe`` — GShard (arXiv 2006.16668) / Switch (arXiv 2101.03961) / OpenMoE
  (arXiv 2402.01739) style: router logits -> softmax over E experts -> top-k, gates optionally
  renormalised over the chosen k. Or the X-MoE gate (On the Representation Collapse of Sparse
  Mixture of Experts, arXiv 2204.09179): the token is projected to a low dimension and scored
  by cosine similarity against L2-normalised expert embeddings, divided by a learnable
  temperature. torchscale normalises only the expert embeddings and never applies its
  temperature; we follow the paper.
- ``mh_moe`` — Multi-Head Mixture-of-Experts (arXiv 2404.15045): a d->d head projection, each
  token split into h sub-tokens of width d/h that are routed like tokens to their own experts
  (d/h -> F -> d/h), then a d->d merge projection. Default is the official code's layout (merge
  the raw expert outputs); ``sub_token_residual`` adds each sub-token's input before the merge
  as in the paper's eqs. (5) and (7). With h=1 there is no head or merge projection and the
  layer is exactly ``topk_moe``.

Dispatch is sort-based: assignments are ordered by expert (stable, first choices before second
choices, so capacity keeps first choices), tokens gathered, the experts run as one grouped
matmul (``torch._grouped_mm`` where the dtype and strides allow, one matmul per expert into a
preallocated output otherwise)
and the outputs scattered back weighted by their gates. No one-hot dispatch tensor is built.

Dropless by default; with ``capacity_factor`` each expert takes at most
C = ceil(capacity_factor * K * N / E) assignments (N routed tokens), later ones are dropped
(the block's residual passes those tokens on). Padding tokens are never routed nor counted.

Auxiliary loss (already weighted, summed into ``FFNOutput.aux_loss``):
- balance: E * sum_e f_e * P_e, f_e the share of the N*K assignments made to expert e
  (before dropping), P_e the mean router probability of e. It is 1 at perfect balance for any
  K (the Megatron / megablocks normalisation; HF and ColossalAI's give K) and E when every
  token goes to one expert with probability 1 (K=1).
- router z-loss (ST-MoE, arXiv 2202.08906): mean over tokens of logsumexp(logits)^2.
Defaults are OpenMoE's coefficients, 0.01 and 1e-4.

Statistics (``FFNOutput.stats``, detached, no host sync): ``tokens_per_expert`` (E,),
``dropped_fraction``, ``router_entropy`` (mean, nats), ``activation_ratio`` (share of experts
whose share of the assignments exceeds ``activation_threshold / E``, i.e. a fraction of the
uniform share), ``routed_tokens``.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import ConfigError, config
from .ffn import ACTIVATIONS, Activation, DenseFFNConfig, FFNConfig, FFNOutput

__all__ = ["GroupedExperts", "MultiHeadMoE", "MultiHeadMoEConfig", "Router", "TopKMoE", "TopKMoEConfig",
           "grouped_matmul"]


@FFNConfig.register("topk_moe")
@config
class TopKMoEConfig(FFNConfig):
    """Token-choice top-k MoE; see the module docstring.

    Attributes:
        hidden_dim: width F of each expert.
        num_experts: E.
        top_k: K, experts per token (1..E).
        activation: expert activation; swiglu gives gated experts.
        router: softmax (a linear router) | xmoe (low-dimensional cosine router).
        renormalize: divide the K chosen gates by their sum.
        xmoe_dim: X-MoE routing dimension (16 in the paper and torchscale).
        xmoe_temperature: initial X-MoE temperature.
        learn_temperature: X-MoE temperature is a parameter.
        capacity_factor: null = dropless; else expert capacity ceil(cf * K * N / E).
        eval_capacity_factor: train (same as capacity_factor) | dropless | a number.
        balance_loss_weight / z_loss_weight: coefficients of the two aux losses.
        router_jitter: multiplicative uniform noise 1 +- eps on the router input in training.
        shared_expert_dim: width of a dense expert every token also goes through (null: none).
        activation_threshold: expert counts as active above this fraction of its uniform share.
    """

    hidden_dim: int
    num_experts: int = 8
    top_k: int = 2
    activation: Activation = "gelu"
    router: Literal["softmax", "xmoe"] = "softmax"
    renormalize: bool = False
    xmoe_dim: int = 16
    xmoe_temperature: float = 0.07
    learn_temperature: bool = True
    capacity_factor: float | None = None
    eval_capacity_factor: float | Literal["train", "dropless"] = "train"
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 1e-4
    router_jitter: float = 0.0
    shared_expert_dim: int | None = None
    activation_threshold: float = 0.1

    def check(self) -> None:
        for name in ("hidden_dim", "num_experts", "xmoe_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be between 1 and num_experts {self.num_experts}, got {self.top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, float) and value <= 0:
                raise ConfigError(name, f"must be positive (or null for dropless), got {value}")
        if self.xmoe_temperature <= 0:
            raise ConfigError("xmoe_temperature", f"must be positive, got {self.xmoe_temperature}")
        for name in ("balance_loss_weight", "z_loss_weight", "activation_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.router_jitter < 1:
            raise ConfigError("router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        if self.shared_expert_dim is not None and self.shared_expert_dim <= 0:
            raise ConfigError("shared_expert_dim", f"must be positive or null, got {self.shared_expert_dim}")

    def capacity(self, training: bool) -> float | None:
        """The capacity factor in force, or None for dropless."""
        if training or self.eval_capacity_factor == "train":
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else self.eval_capacity_factor

    def build(self, dim: int, *, init_scale: float = 1.0) -> TopKMoE:
        return TopKMoE(dim, self, init_scale=init_scale)


@FFNConfig.register("mh_moe")
@config
class MultiHeadMoEConfig(TopKMoEConfig):
    """Multi-Head MoE: :class:`TopKMoEConfig` over sub-tokens, plus

    Attributes:
        heads: h, sub-tokens per token (the model width must be divisible by h).
        sub_token_residual: add each sub-token's input to its expert output before the merge
            (the paper's equations; the official code does not).
    """

    heads: int = 4
    sub_token_residual: bool = False

    def check(self) -> None:
        TopKMoEConfig.check(self)
        if self.heads <= 0:
            raise ConfigError("heads", f"must be positive, got {self.heads}")
        if self.shared_expert_dim is not None:
            raise ConfigError("shared_expert_dim", "is not supported by mh_moe; use topk_moe for a shared expert")

    def check_dim(self, dim: int) -> None:
        if dim % self.heads:
            raise ConfigError("heads", f"model width {dim} is not divisible by heads {self.heads}")

    def build(self, dim: int, *, init_scale: float = 1.0) -> MultiHeadMoE:
        self.check_dim(dim)
        return MultiHeadMoE(dim, self, init_scale=init_scale)


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
    copies): the fallback for dtypes and strides ``torch._grouped_mm`` does not take."""

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


def _grouped_mm_supported(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x_MK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    aligned = 16 // x_MK.element_size()
    return x_MK.shape[1] % aligned == 0 and w_EKN.shape[2] % aligned == 0


def grouped_matmul(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_MK`` sorted by expert, ``counts_E`` rows per expert -> (M, N): each row
    times its expert's matrix: ``torch._grouped_mm`` where dtype and strides allow (no host
    sync), one matmul per expert otherwise."""
    if _grouped_mm_supported(x_MK, w_EKN):
        return grouped_mm_kernel(x_MK, w_EKN, counts_E)
    return _PerExpertMatmul.apply(x_MK, w_EKN, counts_E.tolist())


def grouped_mm_kernel(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The ``torch._grouped_mm`` path of :func:`grouped_matmul` (CPU needs torch >= 2.9)."""
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x_MK.contiguous(), w_EKN, offs=offsets_E))


class GroupedExperts(nn.Module):
    """E independent FFNs stored as 3-D tensors: ``w1_EDF``, ``w2_EFD`` (and ``w3_EDF`` for
    SwiGLU), no biases. ``forward(x_MD, counts_E)`` takes rows sorted by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: Activation, init_scale: float = 1.0):
        super().__init__()

        def weight(fan_in: int, *shape: int) -> nn.Parameter:
            bound = init_scale / math.sqrt(fan_in)  # nn.Linear's default bound
            return nn.Parameter(torch.empty(num_experts, *shape).uniform_(-bound, bound))

        self.w1_EDF = weight(dim, dim, hidden_dim)
        self.w3_EDF = weight(dim, dim, hidden_dim) if activation == "swiglu" else None
        self.w2_EFD = weight(hidden_dim, hidden_dim, dim)
        self.activation = activation

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, scale_M: torch.Tensor | None = None) -> torch.Tensor:
        """Rows sorted by expert, ``counts_E`` per expert; ``scale_M`` multiplies each row's
        output (the gates), applied to whichever of the hidden or the output is narrower."""
        return self._mlp(x_MD, lambda x, w: grouped_matmul(x, w, counts_E), scale_M)

    def forward_batched(self, x_EMD: torch.Tensor) -> torch.Tensor:
        """M rows for every expert at once: (E, M, D) -> (E, M, D) by batched matmuls."""
        return self._mlp(x_EMD, torch.matmul)

    def _mlp(self, x, matmul, scale=None):
        h = matmul(x, self.w1_EDF)
        h = F.silu(h) * matmul(x, self.w3_EDF) if self.activation == "swiglu" else ACTIVATIONS[self.activation](h)
        hidden_dim, dim = self.w2_EFD.shape[1:]
        if scale is not None and hidden_dim <= dim:  # (s h) W2 = s (h W2)
            return matmul(h * scale[:, None], self.w2_EFD)
        y = matmul(h, self.w2_EFD)
        return y if scale is None else y * scale[:, None]


class Router(nn.Module):
    """Router logits (N, E), in fp32 or wider: a linear layer, or the X-MoE cosine gate."""

    def __init__(self, dim: int, cfg: TopKMoEConfig):
        super().__init__()
        E = cfg.num_experts
        if cfg.router == "softmax":
            self.weight_ED = nn.Parameter(torch.empty(E, dim).normal_(std=dim ** -0.5))
            self.proj = self.expert_embed_Er = None
        else:
            self.weight_ED = None
            self.proj = nn.Linear(dim, cfg.xmoe_dim, bias=False)
            self.expert_embed_Er = nn.Parameter(nn.init.orthogonal_(torch.empty(E, cfg.xmoe_dim), gain=0.32))
            log_t = torch.tensor([math.log(cfg.xmoe_temperature)])  # 1-D: FSDP2 shards no scalars
            if cfg.learn_temperature:
                self.log_temperature = nn.Parameter(log_t)
            else:
                self.register_buffer("log_temperature", log_t)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x_ND.dtype, torch.float32)  # at least fp32, as torchscale's gates
        if self.weight_ED is not None:
            return x_ND.to(dtype) @ self.weight_ED.to(dtype).t()
        embed_Er = F.normalize(self.expert_embed_Er.to(dtype), dim=-1)
        cos_NE = F.normalize(self.proj(x_ND).to(dtype), dim=-1) @ embed_Er.t()
        return cos_NE / self.log_temperature.exp()


def _real_tokens(x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) rows of the real tokens and their flat indices (None: all tokens, no copy)."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    if token_mask_BT is None:
        return x_ND, None
    index_N = token_mask_BT.reshape(-1).nonzero().squeeze(1)
    return x_ND[index_N], index_N


def _scatter_back(y_ND: torch.Tensor, index_N: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if index_N is None:
        return y_ND.reshape(shape)
    return y_ND.new_zeros(shape[0] * shape[1], shape[2]).index_copy(0, index_N, y_ND).reshape(shape)


class TopKMoE(nn.Module):
    """Token-choice top-k MoE. ``forward(x_BTD, *, token_mask_BT=None) -> FFNOutput``.

    Args:
        dim: model width D.
        cfg: its :class:`TopKMoEConfig`.
        init_scale: factor on the initial expert (and shared expert) weights.
    """

    def __init__(self, dim: int, cfg: TopKMoEConfig, *, init_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_dim, cfg.activation, init_scale)
        self.shared_expert = None
        if cfg.shared_expert_dim is not None:
            shared = DenseFFNConfig(hidden_dim=cfg.shared_expert_dim, activation=cfg.activation, sub_ln=False,
                                    bias=False)
            self.shared_expert = shared.build(dim, init_scale=init_scale)

    def forward(self, x_BTD: torch.Tensor, *, token_mask_BT: torch.Tensor | None = None) -> FFNOutput:
        x_ND, index_N = _real_tokens(x_BTD, token_mask_BT)
        y_ND, aux_loss, stats = self.route(x_ND)
        out_BTD = _scatter_back(y_ND, index_N, x_BTD.shape)
        if self.shared_expert is not None:
            out_BTD = out_BTD + self.shared_expert(x_BTD).hidden
        return FFNOutput(out_BTD, aux_loss, stats)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Route N real tokens (or sub-tokens) through the experts: (output, aux loss, stats)."""
        cfg, (N, D), E, K = self.cfg, x_ND.shape, self.cfg.num_experts, self.cfg.top_k
        router_in_ND = x_ND
        if self.training and cfg.router_jitter > 0:
            router_in_ND = x_ND * torch.empty_like(x_ND).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits_NE = self.router(router_in_ND)
        probs_NE = logits_NE.softmax(dim=-1)
        gates_NK, expert_NK = probs_NE.topk(K, dim=-1)
        if cfg.renormalize:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)

        # Assignments in k-major order (all first choices, then all second choices, ...), so
        # a stable sort by expert gives first choices priority for capacity.
        expert_M = expert_NK.t().reshape(-1)  # assignment m is token m % N's (m // N)-th choice
        gate_M = gates_NK.t().reshape(-1)
        order_M = expert_M.argsort(stable=True)
        counts_E = torch.bincount(expert_M, minlength=E)
        kept_E = counts_E
        factor = cfg.capacity(self.training)
        if factor is not None:
            capacity = math.ceil(factor * K * N / E)
            starts_E = counts_E.cumsum(0) - counts_E
            rank_M = torch.arange(N * K, device=x_ND.device) - starts_E[expert_M[order_M]]
            order_M = order_M[rank_M < capacity]
            kept_E = counts_E.clamp(max=capacity)

        rows = order_M % N
        y_MD = self.experts(x_ND.index_select(0, rows), kept_E, gate_M[order_M].to(x_ND.dtype))
        y_ND = x_ND.new_zeros(N, D).index_add(0, rows, y_MD)

        share_E = counts_E.float() / max(N * K, 1)
        balance = E * (share_E * probs_NE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        aux_loss = cfg.balance_loss_weight * balance + cfg.z_loss_weight * z_loss
        with torch.no_grad():
            stats = {
                "tokens_per_expert": counts_E.float(),
                "dropped_fraction": 1 - kept_E.sum().float() / max(N * K, 1),
                "router_entropy": -(probs_NE * probs_NE.clamp_min(1e-12).log()).sum(-1).mean(),
                "activation_ratio": (share_E > cfg.activation_threshold / E).float().mean(),
                "routed_tokens": torch.tensor(float(N), device=x_ND.device),
                "balance_loss": balance.detach(),
                "z_loss": z_loss.detach(),
            }
        return y_ND, aux_loss, stats


class MultiHeadMoE(TopKMoE):
    """Multi-Head MoE: heads projection, h sub-tokens per token routed through top-k experts
    of width d/h, merge projection. ``forward(x_BTD, *, token_mask_BT=None) -> FFNOutput``."""

    def __init__(self, dim: int, cfg: MultiHeadMoEConfig, *, init_scale: float = 1.0):
        super().__init__(dim // cfg.heads, cfg, init_scale=init_scale)
        self.heads = cfg.heads
        self.head_proj = self.merge_proj = None
        if cfg.heads > 1:
            # Official init: Xavier-uniform, gain 1/sqrt(2) for the heads projection, 1 for merge.
            self.head_proj = nn.Linear(dim, dim)
            nn.init.xavier_uniform_(self.head_proj.weight, gain=2 ** -0.5)
            self.merge_proj = nn.Linear(dim, dim)
            nn.init.xavier_uniform_(self.merge_proj.weight)
            nn.init.zeros_(self.merge_proj.bias)

    def forward(self, x_BTD: torch.Tensor, *, token_mask_BT: torch.Tensor | None = None) -> FFNOutput:
        x_ND, index_N = _real_tokens(x_BTD, token_mask_BT)
        N, D = x_ND.shape
        if self.head_proj is not None:
            x_ND = self.head_proj(x_ND)
        sub_Sd = x_ND.reshape(N * self.heads, D // self.heads)  # S = N*h sub-tokens, a view
        y_Sd, aux_loss, stats = self.route(sub_Sd)
        if self.cfg.sub_token_residual:
            y_Sd = y_Sd + sub_Sd
        y_ND = y_Sd.reshape(N, D)
        if self.merge_proj is not None:
            y_ND = self.merge_proj(y_ND)
        return FFNOutput(_scatter_back(y_ND, index_N, x_BTD.shape), aux_loss, stats)
