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

Routing (router logits, softmax, top-k, gates) and the auxiliary losses run in fp32 also
under autocast; the expert matmuls run in autocast's dtype with both operands cast to it.

Dispatch is sort-based and never waits for the host: assignments are ordered by expert
(stable, first choices before second choices, so capacity keeps first choices), tokens
gathered, and the experts run in one of two layouts, each with static shapes only:

- grouped (dropless): the sorted rows through one ``torch._grouped_mm`` per expert weight,
  with the expert boundaries as device offsets. It is taken where a grouped kernel exists for
  the dtype — bf16 on CUDA (and under ``torch.compile``), fp32/bf16/fp16 on the CPU — or on the
  CPU for other dtypes and strides, as one matmul per expert: the one place dispatch reads
  device values on the host (the offsets), free on a CPU.
- padded: each expert's assignments in blocks of slots of a static buffer, batched matmuls
  with each block's expert weights. Capacity-limited layers use it as GShard's (E, C) layout
  (one block of C = the capacity per expert). Dropless layers use it where no grouped kernel
  exists without a host sync — fp32 on CUDA, fp32 under ``torch.compile`` — with blocks of
  ceil(N*K/E) slots: an expert with c assignments takes ceil(c / block) of them, 2E blocks
  bound them all, so it costs at most twice the grouped layout's expert FLOPs (and gathers each
  block's weights, twice the expert weights).

Padding tokens go to a sentinel expert sorted last, with gate 0: never routed nor counted,
but never sliced away either (that would need the host to know how many there are). No one-hot
dispatch tensor is built.

Dropless by default; with ``capacity_factor`` each expert takes at most
C = ceil(capacity_factor * K * N / E) assignments (N routed tokens), later ones are dropped
(the block's residual passes those tokens on).

Auxiliary loss (already weighted, summed into ``FFNOutput.aux_loss``):
- balance: E * sum_e f_e * P_e, f_e the share of the N*K assignments made to expert e
  (before dropping), P_e the mean router probability of e. It is 1 at perfect balance for any
  K (the Megatron / megablocks normalisation; HF and ColossalAI's give K) and E when every
  token goes to one expert with probability 1 (K=1). With ``balance_scope: global`` (the
  global-batch balance loss, arXiv 2501.11873) f is counted over the micro-batches of all
  data-parallel ranks together, so that a rank whose tokens are all of one domain is not pushed
  to spread them; DDP's gradient mean then gives one process's loss on the whole batch. The
  micro-batches of one update are still balanced one at a time (their counts are not known
  before the first backward).
- router z-loss (ST-MoE, arXiv 2202.08906): mean over tokens of logsumexp(logits)^2.
Defaults are OpenMoE's coefficients, 0.01 and 1e-4.

Expert choice (``routing: expert_choice``; Zhou et al., Mixture-of-Experts with Expert Choice
Routing, arXiv 2202.09368): the same router probabilities, but each expert takes the C tokens
with the highest probability for it, C = ceil(capacity_factor * K * N / E), so K is the mean
number of experts per token (some tokens get none, some more than K). Every expert is full by
construction: there is no balance loss (``balance_loss_weight`` must be 0), and the experts run
in the (E, C) layout of batched matmuls with no sort and no host sync. A token's experts depend on
every other token of the batch, the later ones of its sequence included, so a causal decoder
would see the future through them: the LM refuses it (MoMa's auxiliary routers, arXiv 2407.21770,
are the known fix). Padding tokens score below every real one and get gate 0 where a short batch
still reaches them.

Auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437):
``score: sigmoid`` gives each expert its own affinity s_e = sigmoid(logit_e) (the gates; with
``renormalize`` divided by their sum over the chosen K, as DeepSeek-V3 does), and with
``bias_update_rate`` gamma > 0 the top-k choice ranks s_e + b_e, where b is a per-expert bias that
never enters the gates nor any gradient. During training each layer counts its assignments per
expert over the whole update (every micro-batch; not again when activation checkpointing recomputes
a forward: :meth:`TopKMoE.observe`), and after each optimizer step :func:`update_expert_biases`
averages the counts over the ranks (one all-reduce for all layers) and moves b_e by gamma *
sign(mean load - load_e): overloaded experts become less attractive. The bias is a buffer, so
checkpoints hold it and a resumed run continues it exactly (torchtitan also centres b; the paper
does not, nor do we). The sequence-wise loss (``sequence_balance_loss_weight``, DeepSeek-V3's
complementary one) is the balance loss above computed within each sequence (f and P over its real
tokens, P from the scores normalised over E) and averaged over the sequences. The balance loss and
the statistics read the sigmoid scores normalised over E as the router's probabilities; the router
z-loss is the logits' whatever the score (for a sigmoid it only keeps them small).

Statistics (``FFNOutput.stats``, detached, no host sync): ``tokens_per_expert`` (E,),
``dropped_fraction``, ``router_entropy`` (mean, nats), ``activation_ratio`` (share of experts
whose share of the assignments exceeds ``activation_threshold / E``, i.e. a fraction of the
uniform share), ``routed_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..configurable import ConfigError, config
from .experts import GroupedExperts
from .ffn import Activation, DenseFFNConfig, FFNConfig, FFNOutput

__all__ = ["MultiHeadMoE", "MultiHeadMoEConfig", "Router", "TopKMoE", "TopKMoEConfig", "discard_expert_loads",
           "update_expert_biases"]



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
        renormalize: divide the K chosen gates by their sum (refused with top_k 1, where it
            would make every gate 1 and cut the router off from the task loss).
        xmoe_dim: X-MoE routing dimension (16 in the paper and torchscale).
        xmoe_temperature: initial X-MoE temperature.
        learn_temperature: X-MoE temperature is a parameter.
        capacity_factor: null = dropless; else expert capacity ceil(cf * K * N / E).
        eval_capacity_factor: train (same as capacity_factor) | dropless | a number.
        balance_loss_weight / z_loss_weight: coefficients of the two aux losses.
        router_jitter: multiplicative uniform noise 1 +- eps on the router input in training.
        shared_expert_dim: width of a dense expert every token also goes through (null: none).
        activation_threshold: expert counts as active above this fraction of its uniform share.
        routing: token_choice (each token its top K experts) | expert_choice (each expert its top
            C tokens; see the module docstring: needs a capacity_factor and no balance loss).
        score: softmax (over the E logits) | sigmoid (each logit alone, DeepSeek-V3): the
            router's affinity of a token for each expert, and its gate.
        bias_update_rate: gamma of auxiliary-loss-free balancing (0: off; DeepSeek-V3: 0.001):
            a per-expert bias added to the scores for the top-k choice only, moved by
            -gamma * sign(load - mean load) after every optimizer step (see the module docstring).
        sequence_balance_loss_weight: DeepSeek-V3's sequence-wise balance loss (0: off; it uses
            1e-4 beside loss-free balancing): the balance loss within each sequence, averaged.
        balance_scope: micro_batch (the balance loss of each rank's micro-batch) | global (its
            f counted over the micro-batch of every data-parallel rank, arXiv 2501.11873, as
            Qwen3-MoE trains: an all-reduce per layer and forward in training).
        bias / sub_ln: the experts (and the shared expert) with the biases and the Sub-LN of a
            :class:`~.ffn.DenseFFN` (torchscale's experts have both): what sparse upcycling of
            a dense FFN that has them needs. Off by default (the MoE papers' experts).
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
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    score: Literal["softmax", "sigmoid"] = "softmax"
    bias_update_rate: float = 0.0
    sequence_balance_loss_weight: float = 0.0
    bias: bool = False
    sub_ln: bool = False
    balance_scope: Literal["micro_batch", "global"] = "micro_batch"

    def check(self) -> None:
        for name in ("hidden_dim", "num_experts", "xmoe_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be between 1 and num_experts {self.num_experts}, got {self.top_k}")
        if self.top_k == 1 and self.renormalize:
            raise ConfigError("renormalize", "with top_k: 1 a renormalised gate is 1 for every token, so the task loss "
                                             "never trains the router (only the balance loss does); X-MoE, Switch "
                                             "and the official MH-MoE code weight the expert by the router's "
                                             "probability: set renormalize: false")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, float) and value <= 0:
                raise ConfigError(name, f"must be positive (or null for dropless), got {value}")
        if self.xmoe_temperature <= 0:
            raise ConfigError("xmoe_temperature", f"must be positive, got {self.xmoe_temperature}")
        for name in ("balance_loss_weight", "z_loss_weight", "activation_threshold", "bias_update_rate",
                     "sequence_balance_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.router_jitter < 1:
            raise ConfigError("router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        if self.shared_expert_dim is not None and self.shared_expert_dim <= 0:
            raise ConfigError("shared_expert_dim", f"must be positive or null, got {self.shared_expert_dim}")
        if self.routing == "expert_choice":
            if self.capacity_factor is None or self.eval_capacity_factor == "dropless":
                raise ConfigError("capacity_factor", "expert choice gives each expert a fixed capacity C = "
                                                     "ceil(capacity_factor * top_k * N / E): set a capacity_factor "
                                                     "(and an eval_capacity_factor other than dropless)")
            for name in ("balance_loss_weight", "sequence_balance_loss_weight", "bias_update_rate"):
                if getattr(self, name):
                    raise ConfigError(name, f"expert choice fills every expert to its capacity, so there is no load "
                                            f"to balance: set {name}: 0")
            if self.score != "softmax":
                raise ConfigError("score", "expert choice ranks the tokens by their softmax probability for each "
                                           "expert; the sigmoid score is for token choice")

    @property
    def experts_per_token(self) -> float:
        """How many experts process a token, on average: K, or for expert choice the
        capacity_factor * K that its capacity C = capacity_factor * K * N / E gives."""
        return self.top_k * (self.capacity_factor if self.routing == "expert_choice" else 1)

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


class Router(nn.Module):
    """Router logits (N, E) in fp32 (or wider), also under autocast: a linear layer, or the
    X-MoE cosine gate."""

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
        with torch.autocast(x_ND.device.type, enabled=False):
            x_ND = x_ND.to(dtype)
            if self.weight_ED is not None:
                return x_ND @ self.weight_ED.to(dtype).t()
            embed_Er = F.normalize(self.expert_embed_Er.to(dtype), dim=-1)
            cos_NE = F.normalize(F.linear(x_ND, self.proj.weight.to(dtype)), dim=-1) @ embed_Er.t()
            return cos_NE / self.log_temperature.to(dtype).exp()


def _masked_mean(x_N: torch.Tensor, real_N: torch.Tensor | None, count: torch.Tensor | int) -> torch.Tensor:
    """Mean over the real rows (in the forward pass padding rows may hold anything, NaN
    included; their gradient is zero only where they are finite)."""
    if real_N is None:
        return x_N.mean(dim=0)
    return torch.where(real_N.view(-1, *[1] * (x_N.dim() - 1)), x_N, 0).sum(dim=0) / count.clamp_min(1)


class TopKMoE(nn.Module):
    """Token-choice top-k MoE. ``forward(x_BTD, *, token_mask_BT=None) -> FFNOutput``.

    Args:
        dim: model width D.
        cfg: its :class:`TopKMoEConfig`.
        init_scale: factor on the initial expert (and shared expert) weights.

    Attributes:
        dispatch: auto | grouped | padded, the expert layout (see the module docstring); auto
            picks per call. Benchmarks set it; models leave it on auto.
    """

    dispatch: Literal["auto", "grouped", "padded"] = "auto"

    def __init__(self, dim: int, cfg: TopKMoEConfig, *, init_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_dim, cfg.activation, init_scale,
                                      bias=cfg.bias, sub_ln=cfg.sub_ln)
        # loss-free balancing: the bias of the top-k choice (a buffer: checkpointed, never trained)
        # and the update's assignments per expert so far (not a buffer: DDP would broadcast it)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts) if cfg.bias_update_rate > 0 else None)
        self.load_E: torch.Tensor | None = None
        self.shared_expert = None
        if cfg.shared_expert_dim is not None:
            shared = DenseFFNConfig(hidden_dim=cfg.shared_expert_dim, activation=cfg.activation, sub_ln=cfg.sub_ln,
                                    bias=cfg.bias)
            self.shared_expert = shared.build(dim, init_scale=init_scale)

    def forward(self, x_BTD: torch.Tensor, *, token_mask_BT: torch.Tensor | None = None) -> FFNOutput:
        real_N = None if token_mask_BT is None else token_mask_BT.reshape(-1)
        y_ND, aux_loss, stats = self.route(x_BTD.reshape(-1, x_BTD.shape[-1]), real_N, sequences=x_BTD.shape[0])
        out_BTD = y_ND.reshape(x_BTD.shape)
        if self.shared_expert is not None:
            out_BTD = out_BTD + self.shared_expert(x_BTD).hidden
        return FFNOutput(out_BTD, aux_loss, stats)

    def route(self, x_ND: torch.Tensor, real_N: torch.Tensor | None = None, *, sequences: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Route N tokens (or sub-tokens) through the experts: (output, aux loss, stats). Rows
        where ``real_N`` is False are padding: not routed (zero output), not counted. The rows
        are ``sequences`` sequences of N / sequences rows each (for the sequence-wise loss)."""
        cfg, (N, D), E, K = self.cfg, x_ND.shape, self.cfg.num_experts, self.cfg.top_k
        router_in_ND = x_ND
        if self.training and cfg.router_jitter > 0:
            router_in_ND = x_ND * torch.empty_like(x_ND).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits_NE = self.router(router_in_ND)
        if cfg.score == "softmax":
            scores_NE = probs_NE = logits_NE.softmax(dim=-1)
        else:  # each expert's own affinity; the losses and statistics read them normalised over E
            scores_NE = logits_NE.sigmoid()
            probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        if cfg.routing == "expert_choice":
            return self._expert_choice(x_ND, logits_NE, probs_NE, real_N)
        if self.expert_bias is None:
            gates_NK, expert_NK = scores_NE.topk(K, dim=-1)
        else:  # the bias steers the choice only: the gates are the scores
            expert_NK = (scores_NE.detach() + self.expert_bias.float()).topk(K, dim=-1).indices
            gates_NK = scores_NE.gather(1, expert_NK)
        if cfg.renormalize:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
        real = N if real_N is None else real_N.sum()  # a device tensor with padding: no host sync
        if real_N is not None:
            expert_NK = expert_NK.masked_fill(~real_N[:, None], E)  # padding goes to a sentinel expert E

        # Assignments in k-major order (all first choices, then all second choices, ...), so
        # a stable sort by expert gives first choices priority for capacity.
        expert_M = expert_NK.t().reshape(-1)  # assignment m is token m % N's (m // N)-th choice
        order_M = expert_M.argsort(stable=True)
        sorted_expert_M, rows_M = expert_M[order_M], order_M % N
        counts_E = torch.zeros(E + 1, dtype=torch.long, device=x_ND.device).scatter_add_(
            0, expert_M, torch.ones_like(expert_M))[:E]  # not bincount: its output size needs a host sync
        starts_E = torch.cat([counts_E.new_zeros(1), counts_E.cumsum(0)])  # the sentinel E starts last
        rank_M = torch.arange(len(order_M), device=x_ND.device) - starts_E[sorted_expert_M]  # place in its expert
        keep_M = sorted_expert_M < E
        kept_E = counts_E
        factor = cfg.capacity(self.training)
        if factor is not None:
            capacity = math.ceil(factor * K * N / E) if real_N is None else \
                torch.ceil(factor * K * real.double() / E)  # exactly as computed on the host, in float64
            keep_M = keep_M & (rank_M < capacity)
            kept_E = counts_E.clamp(max=capacity) if isinstance(capacity, int) else \
                torch.minimum(counts_E, capacity.to(counts_E.dtype))
        gate_M = torch.where(keep_M, gates_NK.t().reshape(-1)[order_M], 0)  # sorted; dropped and padding 0
        layout = self.dispatch
        if layout == "auto":
            layout = "grouped" if not self.experts.holds_all_experts or (
                factor is None and self.experts.grouped_without_sync(x_ND)) else "padded"
        if layout == "padded" and not self.experts.holds_all_experts:
            raise ValueError("the padded layout needs every expert on this rank; expert parallelism takes the grouped "
                             "layout")
        if layout == "grouped":
            if factor is not None:  # dropped assignments after all kept ones, as padding is
                order = torch.where(keep_M, sorted_expert_M, E).argsort(stable=True)
                rows_M, gate_M = rows_M[order], gate_M[order]
            y_ND = self._grouped(x_ND, rows_M, gate_M, kept_E)
        elif factor is not None:  # GShard's (E, C): expert e owns block e of C slots
            slots = min(N, math.ceil(factor * K * N / E))
            y_ND = self._blocked(x_ND, rows_M, sorted_expert_M, rank_M, keep_M, gate_M, None, E, slots)
        else:  # dropless: blocks of ~M/E slots, E per expert at most, 2E in all
            block = max(1, math.ceil(len(rows_M) / E))
            blocks_E = (counts_E + block - 1) // block
            y_ND = self._blocked(x_ND, rows_M, sorted_expert_M, rank_M, keep_M, gate_M,
                                 blocks_E.cumsum(0) - blocks_E, 2 * E, block)

        assignments = (max(N, 1) if real_N is None else real.clamp_min(1)) * K
        share_E = counts_E.float() / assignments
        if cfg.balance_scope == "global" and self.training and dist.is_initialized() and dist.get_world_size() > 1:
            balance = self._global_balance(probs_NE, real_N, counts_E, real)
        else:
            balance = E * (share_E * _masked_mean(probs_NE, real_N, real)).sum()
        z_loss = _masked_mean(torch.logsumexp(logits_NE, dim=-1).pow(2), real_N, real)
        aux_loss = cfg.balance_loss_weight * balance + cfg.z_loss_weight * z_loss
        if cfg.sequence_balance_loss_weight:
            aux_loss = aux_loss + cfg.sequence_balance_loss_weight * self._sequence_balance(
                probs_NE, expert_NK, real_N, sequences)
        stats = self._stats(probs_NE, real_N, real, counts_E.float(), share_E, 1 - kept_E.sum().float() / assignments,
                            balance, z_loss)
        return y_ND, aux_loss, stats

    def _global_balance(self, probs_NE, real_N, counts_E, real) -> torch.Tensor:
        """The balance loss of the batch of every rank (arXiv 2501.11873): f from the counts
        summed over the ranks (one all-reduce of E + 1 numbers, no host sync), P this rank's sum
        of probabilities over the global tokens per rank, so that the ranks' mean (DDP's gradient
        mean) is E * sum_e f_e * P_e of the whole batch, exactly as one process computes it."""
        E, K = probs_NE.shape[1], self.cfg.top_k
        local = torch.as_tensor(real, device=probs_NE.device).float()
        totals = torch.cat([counts_E.detach().float(), local[None]])
        dist.all_reduce(totals)
        tokens = totals[E].clamp_min(1)
        # this rank's mean probability, as a share of the mean over every rank's tokens
        local_share_E = _masked_mean(probs_NE, real_N, real) * (local * dist.get_world_size() / tokens)
        return E * (totals[:E] / (K * tokens) * local_share_E).sum()

    def _sequence_balance(self, probs_NE, expert_NK, real_N, sequences: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss: E * sum_e f_e * P_e within each sequence (f_e
        the share of its real tokens' K choices made to e, P_e their mean probability of e), the
        mean over the sequences that hold a real token."""
        (N, E), K = probs_NE.shape, self.cfg.top_k
        # padding chose the sentinel expert E, whose column is dropped
        chosen_NE = torch.zeros(N, E + 1, device=probs_NE.device).scatter_(1, expert_NK, 1.0)[:, :E]
        if real_N is not None:
            probs_NE = torch.where(real_N[:, None], probs_NE, 0)
        tokens_S = probs_NE.new_full((sequences,), N // sequences) if real_N is None else \
            real_N.view(sequences, -1).sum(1).float()
        share_SE = chosen_NE.view(sequences, -1, E).sum(1) / (K * tokens_S.clamp_min(1))[:, None]
        mean_SE = probs_NE.view(sequences, -1, E).sum(1) / tokens_S.clamp_min(1)[:, None]
        return E * (share_SE * mean_SE).sum() / (tokens_S > 0).sum().clamp_min(1)

    def observe(self, stats: dict[str, torch.Tensor]) -> None:
        """Count a training forward's assignments per expert (``stats["tokens_per_expert"]``) for
        loss-free balancing; a no-op for a layer without it or in evaluation. ``run_blocks`` calls
        it after each block's forward, outside activation checkpointing, so a forward that is
        recomputed in the backward pass is counted once; a layer used alone is counted by its caller."""
        if self.expert_bias is None or not self.training:
            return
        load_E = stats["tokens_per_expert"].detach().float()
        if self.load_E is None:  # made once, then added to in place (torch.compile sees one tensor)
            self.load_E = torch.zeros_like(load_E)
        self.load_E.add_(load_E)

    def take_load(self) -> torch.Tensor:
        """The assignments per expert counted since the last call (zeros if none), and a fresh
        count."""
        if self.load_E is None:
            return self.expert_bias.new_zeros(self.cfg.num_experts)
        load_E = self.load_E.clone()
        self.load_E.zero_()
        return load_E

    def _stats(self, probs_NE, real_N, real, tokens_per_expert_E, share_E, dropped_fraction, balance, z_loss
               ) -> dict[str, torch.Tensor]:
        """The routing statistics of both routings (detached, on the device)."""
        N, E = probs_NE.shape
        with torch.no_grad():
            entropy_N = -(probs_NE * probs_NE.clamp_min(1e-12).log()).sum(-1)
            return {
                "tokens_per_expert": tokens_per_expert_E,
                "dropped_fraction": dropped_fraction,
                "router_entropy": _masked_mean(entropy_N, real_N, real),
                "activation_ratio": (share_E > self.cfg.activation_threshold / E).float().mean(),
                "routed_tokens": real.float() if real_N is not None else probs_NE.new_full((), N),
                "balance_loss": balance.detach(),
                "z_loss": z_loss.detach(),
            }

    def _expert_choice(self, x_ND, logits_NE, probs_NE, real_N) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Each expert's top-C tokens by router probability through the (E, C) layout; see the
        module docstring. C uses N, padding included, so that it is a static shape."""
        cfg, (N, D), E, K = self.cfg, x_ND.shape, self.cfg.num_experts, self.cfg.top_k
        if not self.experts.holds_all_experts:
            raise ValueError("expert choice runs every expert's C tokens as one batched matmul, which needs every "
                             "expert on this rank: it does not take expert parallelism")
        C = min(N, math.ceil(cfg.capacity(self.training) * K * N / E))
        scores_NE = probs_NE if real_N is None else torch.where(real_N[:, None], probs_NE, -1.0)
        gates_EC, rows_EC = scores_NE.t().topk(C, dim=1)  # ties: torch.topk's order
        # padding that a batch shorter than C reaches: zero in, zero out, gate 0
        chosen_EC = torch.ones_like(rows_EC, dtype=torch.bool) if real_N is None else real_N[rows_EC]
        x_ECD = torch.where(chosen_EC[..., None], x_ND.index_select(0, rows_EC.reshape(-1)).view(E, C, D), 0)
        y_ECD = self.experts.forward_batched(x_ECD)
        y_MD = torch.where(chosen_EC[..., None], y_ECD * gates_EC.to(y_ECD.dtype)[..., None], 0).reshape(E * C, D)
        y_ND = y_MD.new_zeros(N, D).index_add_(0, rows_EC.reshape(-1), y_MD)
        real = N if real_N is None else real_N.sum()
        z_loss = _masked_mean(torch.logsumexp(logits_NE, dim=-1).pow(2), real_N, real)
        with torch.no_grad():
            counts_E = chosen_EC.sum(1).float()
            picked_N = torch.zeros(N, device=x_ND.device).index_add_(0, rows_EC.reshape(-1),
                                                                      chosen_EC.reshape(-1).float())
            unpicked = (picked_N == 0) if real_N is None else (picked_N == 0) & real_N
            dropped = unpicked.sum().float() / (real.float().clamp_min(1) if real_N is not None else N)  # none took
        stats = self._stats(probs_NE, real_N, real, counts_E, counts_E / counts_E.sum().clamp_min(1), dropped,
                            torch.zeros((), device=x_ND.device), z_loss)
        return y_ND, cfg.z_loss_weight * z_loss, stats

    def _grouped(self, x_ND, rows_M, gate_M, kept_E) -> torch.Tensor:
        """The assignments sorted by expert, kept ones first, through one grouped matmul per
        expert weight. Dropped and padding assignments (gate 0) come after the last offset: they
        stay in the rows, so nothing is sliced to a data-dependent size (no host sync), and
        output zeros."""
        offsets_E = kept_E.cumsum(0).to(torch.int32)
        y_MD = self.experts(x_ND.index_select(0, rows_M), offsets_E, gate_M)
        return y_MD.new_zeros(x_ND.shape[0], y_MD.shape[1]).index_add_(0, rows_M, y_MD)

    def _blocked(self, x_ND, rows_M, sorted_expert_M, rank_M, keep_M, gate_M, first_block_E, blocks: int,
                 block: int) -> torch.Tensor:
        """The padded layout: each expert's kept assignments in consecutive blocks of ``block``
        slots, its first at ``first_block_E`` (None: expert e owns block e alone), ``blocks``
        blocks in all (a static bound), through batched matmuls with each block's expert
        weights. Dropped and padding assignments go to a trash slot; unused slots hold zeros and
        are computed and discarded. Every shape is static: no host sync."""
        N, D = x_ND.shape
        E = self.cfg.num_experts
        expert_B = None  # block b is expert b's
        if first_block_E is None:
            first_block_E = torch.arange(E, device=x_ND.device)
        else:  # block b belongs to the last expert whose first block is at or before b
            expert_B = torch.searchsorted(first_block_E, torch.arange(blocks, device=x_ND.device), right=True) - 1
        trash = blocks * block
        slot_M = torch.where(keep_M, first_block_E[sorted_expert_M.clamp(max=E - 1)] * block + rank_M, trash)
        x_SD = x_ND.new_zeros(trash + 1, D).index_copy_(0, slot_M, x_ND.index_select(0, rows_M))
        y_BCD = self.experts.forward_batched(x_SD[:-1].view(blocks, block, D), expert_B)
        y_MD = y_BCD.reshape(trash, D).index_select(0, torch.where(keep_M, slot_M, 0))
        y_MD = torch.where(keep_M[:, None], y_MD * gate_M.to(y_MD.dtype)[:, None], 0)
        return y_MD.new_zeros(N, D).index_add_(0, rows_M, y_MD)


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
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        N, D = x_ND.shape
        if self.head_proj is not None:
            x_ND = self.head_proj(x_ND)
        sub_Sd = x_ND.reshape(N * self.heads, D // self.heads)  # S = N*h sub-tokens, a view
        real_N = None if token_mask_BT is None else token_mask_BT.reshape(-1)
        real_S = None if real_N is None else real_N[:, None].expand(N, self.heads).reshape(-1)
        y_Sd, aux_loss, stats = self.route(sub_Sd, real_S, sequences=x_BTD.shape[0])
        if self.cfg.sub_token_residual:
            y_Sd = y_Sd + sub_Sd
        y_ND = y_Sd.reshape(N, D)
        if self.merge_proj is not None:
            y_ND = self.merge_proj(y_ND)
        if real_N is not None:
            y_ND = torch.where(real_N[:, None], y_ND, 0)  # padding outputs zeros, as in top-k
        return FFNOutput(y_ND.reshape(x_BTD.shape), aux_loss, stats)


def _bias_balanced(module: nn.Module) -> list[TopKMoE]:
    return [m for m in module.modules() if isinstance(m, TopKMoE) and m.expert_bias is not None]


@torch.no_grad()
def update_expert_biases(module: nn.Module, mean_across_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Loss-free balancing's step, after an optimizer step: each bias-balanced layer of ``module``
    moves its bias by ``bias_update_rate * sign(mean load - load)``, the load being its
    assignments per expert over the update on every rank (``mean_across_ranks``, one collective
    for all layers; every rank calls it, with zeros for a layer that saw no tokens)."""
    layers = _bias_balanced(module)
    if not layers:
        return
    load_L = mean_across_ranks(torch.cat([m.take_load() for m in layers]))
    for m, load_E in zip(layers, load_L.split([m.cfg.num_experts for m in layers])):
        m.expert_bias.add_(torch.sign(load_E.mean() - load_E), alpha=m.cfg.bias_update_rate)


def discard_expert_loads(module: nn.Module) -> None:
    """Forget the loads counted for an update that is not applied (a skipped non-finite step)."""
    for m in _bias_balanced(module):
        m.take_load()
