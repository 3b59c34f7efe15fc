"""Top-k MoE and Multi-Head MoE against slow obvious oracles on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimodal_moe.bench import moe_variants
from multimodal_moe.configurable import ConfigError
from multimodal_moe.layers.experts import _grouped_kernel, _grouped_mm_supported
from multimodal_moe.layers.moe import MultiHeadMoEConfig, TopKMoEConfig

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def expert_oracle(moe, e, x_D):
    """Expert e as a dense FFN: x W1 (+ b1), the activation (SwiGLU's gate), Sub-LN, W2 (+ b2)."""
    ex = moe.experts

    def linear(x, w, b):
        return x @ w[e] + (0 if b is None else b[e])

    h = linear(x_D, ex.w1_EDF, ex.b1_EF)
    h = F.silu(h) * linear(x_D, ex.w3_EDF, ex.b3_EF) if ex.activation == "swiglu" else ACT[ex.activation](h)
    if ex.norm_weight_EF is not None:
        h = F.layer_norm(h, h.shape[-1:], ex.norm_weight_EF[e], ex.norm_bias_EF[e], eps=1e-5)
    return linear(h, ex.w2_EFD, ex.b2_ED)


def distinct_norms(moe):
    """Give every expert its own Sub-LN affine (they start as ones and zeros): a wrong expert's
    shows."""
    if moe.experts.norm_weight_EF is not None:
        with torch.no_grad():
            moe.experts.norm_weight_EF.add_(torch.randn_like(moe.experts.norm_weight_EF) * 0.5)
            moe.experts.norm_bias_EF.add_(torch.randn_like(moe.experts.norm_bias_EF) * 0.5)


def oracle_choices(moe, x_ND):
    """(gates, experts), each (N, K): per token a Python sort of the experts by score (softmax or
    sigmoid) plus the balancing bias, the gates being the unbiased scores of the K first."""
    logits = moe.router(x_ND)
    scores = logits.softmax(-1) if moe.cfg.score == "softmax" else logits.sigmoid()
    bias = [0.0] * moe.cfg.num_experts if moe.expert_bias is None else moe.expert_bias.tolist()
    experts = torch.tensor([sorted(range(moe.cfg.num_experts), key=lambda e: -(row[e].item() + bias[e]))[:moe.cfg.top_k]
                            for row in scores], dtype=torch.long).view(-1, moe.cfg.top_k)
    gates = scores.gather(1, experts)
    return (gates / gates.sum(-1, keepdim=True) if moe.cfg.renormalize else gates), experts


def route_oracle(moe, x_ND):
    """Loop over choices and tokens, filling experts in k-major order up to capacity."""
    cfg, (N, D) = moe.cfg, x_ND.shape
    gates, experts = oracle_choices(moe, x_ND)
    factor = cfg.capacity(moe.training)
    capacity = math.inf if factor is None else math.ceil(factor * cfg.top_k * N / cfg.num_experts)
    filled = [0] * cfg.num_experts
    out = [x_ND.new_zeros(D) for _ in range(N)]
    dropped = 0
    for k in range(cfg.top_k):
        for n in range(N):
            e = int(experts[n, k])
            if filled[e] >= capacity:
                dropped += 1
                continue
            filled[e] += 1
            out[n] = out[n] + gates[n, k].to(x_ND.dtype) * expert_oracle(moe, e, x_ND[n])
    return torch.stack(out), dropped


def topk_oracle(moe, x_BTD, mask_BT=None):
    B, T, D = x_BTD.shape
    flat, keep = x_BTD.reshape(-1, D), (torch.ones(B * T, dtype=torch.bool) if mask_BT is None else mask_BT.reshape(-1))
    y, dropped = route_oracle(moe, flat[keep])
    out = flat.new_zeros(B * T, D)
    out[keep] = y
    out = out.reshape(B, T, D)
    if moe.shared_expert is not None:
        out = out + moe.shared_expert(x_BTD).hidden
    return out, dropped


def einsum_oracle(moe, x_ND):
    """GShard's one-hot dispatch/combine einsums (dropless: capacity N per expert)."""
    cfg, N = moe.cfg, x_ND.shape[0]
    gates, experts = oracle_choices(moe, x_ND)
    dispatch_NEC = torch.zeros(N, cfg.num_experts, N * cfg.top_k, dtype=x_ND.dtype)
    combine_NEC = torch.zeros_like(dispatch_NEC)
    slot = [0] * cfg.num_experts
    for k in range(cfg.top_k):
        for n in range(N):
            e = int(experts[n, k])
            dispatch_NEC[n, e, slot[e]] = 1
            combine_NEC[n, e, slot[e]] = gates[n, k]
            slot[e] += 1
    x_ECD = torch.einsum("nec,nd->ecd", dispatch_NEC, x_ND)
    y_ECD = torch.stack([expert_oracle(moe, e, x_ECD[e]) for e in range(cfg.num_experts)])
    return torch.einsum("nec,ecd->nd", combine_NEC, y_ECD)


def make(dim=16, seed=0, **kw):
    cfg_cls = MultiHeadMoEConfig if "heads" in kw or "sub_token_residual" in kw else TopKMoEConfig
    cfg = cfg_cls(**{"hidden_dim": 32, "num_experts": 4, "top_k": 2, **kw})
    torch.manual_seed(seed)
    return cfg.build(dim)


def grads(module, x, out):
    module.zero_grad(set_to_none=True)
    x.grad = None
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * weight).sum().backward()
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}}


def assert_same_with_grads(module, x, fast_fn, oracle_fn):
    fast = fast_fn()
    g_fast = grads(module, x, fast)
    oracle = oracle_fn()
    g_oracle = grads(module, x, oracle)
    torch.testing.assert_close(fast, oracle, rtol=1e-5, atol=1e-5)
    assert g_fast.keys() == g_oracle.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_oracle[name], rtol=1e-5, atol=1e-5, msg=name)


CASES = {
    "top1": dict(top_k=1),
    "top2": dict(),
    "top2_renorm_swiglu": dict(renormalize=True, activation="swiglu"),
    "k_equals_E": dict(top_k=4),
    "zero_token_experts": dict(num_experts=16, top_k=1),
    "capacity_overflow": dict(capacity_factor=0.5),
    "xmoe": dict(router="xmoe", top_k=1),
    "shared_expert": dict(shared_expert_dim=24, activation="silu"),
    "unaligned_dims_split_path": dict(hidden_dim=10),
    "sigmoid": dict(score="sigmoid"),
    "sigmoid_renorm_biased": dict(score="sigmoid", renormalize=True, bias_update_rate=1e-3),
    "softmax_biased_capacity": dict(bias_update_rate=1e-3, capacity_factor=0.5),
    "expert_biases_sub_ln": dict(bias=True, sub_ln=True),
    "expert_biases_sub_ln_swiglu_capacity": dict(bias=True, sub_ln=True, activation="swiglu", capacity_factor=0.5),
    "expert_biases_sub_ln_shared_wide": dict(bias=True, sub_ln=True, hidden_dim=40, shared_expert_dim=24),
}


@pytest.mark.parametrize("layout", ["grouped", "padded"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_topk_matches_loop_oracle(case, padded, layout):
    moe = make(**CASES[case])
    moe.dispatch = layout  # both expert layouts give the same tokens the same experts and gates
    if moe.expert_bias is not None:  # a bias that changes choices (the scores of 4 experts are close)
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    distinct_norms(moe)
    x = torch.randn(3, 5, 16, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[0, 3:] = False
        mask[2, 1:] = False
    out = moe(x, token_mask_BT=mask)
    _, dropped = topk_oracle(moe, x, mask)
    n_real = 15 if mask is None else int(mask.sum())
    assert out.stats["routed_tokens"] == n_real
    assert out.stats["tokens_per_expert"].sum() == n_real * moe.cfg.top_k
    torch.testing.assert_close(out.stats["dropped_fraction"], torch.tensor(dropped / (n_real * moe.cfg.top_k)))
    if case == "capacity_overflow":
        assert dropped > 0
    if case == "zero_token_experts":
        assert (out.stats["tokens_per_expert"] == 0).any()
    assert_same_with_grads(moe, x, lambda: moe(x, token_mask_BT=mask).hidden, lambda: topk_oracle(moe, x, mask)[0])


def test_grouped_mm_path_is_the_one_tested():
    x = torch.randn(4, 16)
    assert _grouped_mm_supported(x, make().experts.w1_EDF)
    assert not _grouped_mm_supported(torch.randn(4, 10), make().experts.w2_EFD[:, :10])
    assert not _grouped_mm_supported(x.double(), make().experts.w1_EDF.double())


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_topk_matches_one_hot_einsum(top_k):
    moe = make(top_k=top_k, renormalize=top_k > 1)
    x = torch.randn(1, 12, 16, requires_grad=True)
    assert_same_with_grads(moe, x, lambda: moe(x).hidden, lambda: einsum_oracle(moe, x[0])[None])


def test_capacity_semantics_in_eval():
    x = torch.randn(2, 8, 16)
    same = make(capacity_factor=0.5).eval()
    assert same(x).stats["dropped_fraction"] > 0
    dropless = make(capacity_factor=0.5, eval_capacity_factor="dropless").eval()
    assert dropless(x).stats["dropped_fraction"] == 0
    assert dropless.train()(x).stats["dropped_fraction"] > 0
    torch.testing.assert_close(dropless.eval()(x).hidden, topk_oracle(dropless, x)[0])


def directed_router(moe, targets):
    """Inputs and router weights that send token n to expert targets[n] with probability ~1."""
    E, D = moe.cfg.num_experts, 16
    with torch.no_grad():
        moe.router.weight_ED.copy_(torch.eye(E, D) * 100)
    return torch.eye(E, D)[targets][None]


def test_balance_loss_at_perfect_balance_and_collapse():
    moe = make(top_k=1, z_loss_weight=0.0)
    balanced = moe(directed_router(moe, torch.arange(8) % 4))
    torch.testing.assert_close(balanced.stats["balance_loss"], torch.tensor(1.0))
    assert balanced.stats["activation_ratio"] == 1.0
    collapsed = moe(directed_router(moe, torch.zeros(8, dtype=torch.long)))
    torch.testing.assert_close(collapsed.stats["balance_loss"], torch.tensor(4.0))
    torch.testing.assert_close(collapsed.aux_loss, torch.tensor(0.04))
    assert collapsed.stats["activation_ratio"] == 0.25
    torch.testing.assert_close(collapsed.stats["router_entropy"], torch.tensor(0.0), atol=1e-6, rtol=0)


def test_aux_losses_equal_their_formulas():
    moe = make(top_k=2)
    x = torch.randn(2, 6, 16)
    out = moe(x)
    logits = moe.router(x.reshape(-1, 16))
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]).float() / (12 * 2)
    balance = 4 * (share * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(out.aux_loss, 0.01 * balance + 1e-4 * z)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(out.stats["router_entropy"], entropy)


def test_padding_is_never_routed_and_never_leaks():
    moe = make()
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    out = moe(x, token_mask_BT=mask)
    changed = x.clone()
    changed[1, 2:] = 100 * torch.randn(4, 16)
    again = moe(changed, token_mask_BT=mask)
    torch.testing.assert_close(again.hidden, out.hidden)
    torch.testing.assert_close(again.aux_loss, out.aux_loss)
    assert (out.hidden[~mask] == 0).all()


def test_router_jitter_only_in_training():
    moe = make(router_jitter=0.5).eval()
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(moe(x).hidden, topk_oracle(moe, x)[0])
    moe.train()
    torch.manual_seed(0)
    a = moe(x).aux_loss
    torch.manual_seed(1)
    assert moe(x).aux_loss != a


def mh_oracle(moe, x_BTD, mask=None):
    B, T, D = x_BTD.shape
    h = moe.heads
    flat = x_BTD.reshape(-1, D)
    keep = torch.ones(B * T, dtype=torch.bool) if mask is None else mask.reshape(-1)
    tokens = flat[keep]
    if moe.head_proj is not None:
        tokens = moe.head_proj(tokens)
    subs = tokens.reshape(-1, D // h)
    y, _ = route_oracle(moe, subs)
    if moe.cfg.sub_token_residual:
        y = y + subs
    y = y.reshape(-1, D)
    if moe.merge_proj is not None:
        y = moe.merge_proj(y)
    out = flat.new_zeros(B * T, D)
    out[keep] = y
    return out.reshape(B, T, D)


@pytest.mark.parametrize("kw", [dict(heads=4), dict(heads=2, top_k=1, capacity_factor=0.5),
                                dict(heads=4, sub_token_residual=True, router="xmoe"), dict(heads=2, hidden_dim=10),
                                dict(heads=2, bias=True, sub_ln=True)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", ["grouped", "padded"])
def test_mh_moe_matches_oracle(kw, padded, layout):
    moe = make(dim=32, **kw)
    moe.dispatch = layout
    distinct_norms(moe)
    x = torch.randn(2, 5, 32, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 2:] = False
    out = moe(x, token_mask_BT=mask)
    n_real = 10 if mask is None else int(mask.sum())
    assert out.stats["routed_tokens"] == n_real * kw["heads"]
    assert moe.router(torch.randn(3, 32 // kw["heads"])).shape == (3, 4)
    assert_same_with_grads(moe, x, lambda: moe(x, token_mask_BT=mask).hidden, lambda: mh_oracle(moe, x, mask))


def test_mh_moe_with_one_head_is_topk_moe():
    mh = make(heads=1, seed=3)
    plain = make(seed=3)
    assert mh.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, mh.state_dict()[key]), key
    x = torch.randn(2, 5, 16)
    a, b = mh(x), plain(x)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(router="xmoe", renormalize=True, activation="swiglu", shared_expert_dim=4),
                                dict(heads=2), dict(heads=2, sub_token_residual=True)])
def test_float64_gradcheck(kw):
    moe = make(dim=8, hidden_dim=6, **kw).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    # routing is piecewise constant in x: check the gradient through the chosen experts
    assert torch.autograd.gradcheck(lambda x: moe(x).hidden, (x,), eps=1e-6, atol=1e-5)
    params = [p for p in moe.parameters()]
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(
        moe, dict(zip([n for n, _ in moe.named_parameters()], ps)), (x.detach(),)).hidden, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("field, value, words", [
    ("top_k", 5, "between 1 and num_experts 4"),
    ("top_k", 0, "between 1"),
    ("capacity_factor", 0.0, "positive"),
    ("eval_capacity_factor", -1.0, "positive"),
    ("router_jitter", 1.0, "[0, 1)"),
    ("num_experts", 0, "positive"),
])
def test_moe_config_validation(field, value, words):
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(**{"hidden_dim": 8, "num_experts": 4, field: value})
    assert info.value.key == field and words in info.value.message


def test_mh_moe_config_validation():
    with pytest.raises(ConfigError) as info:
        MultiHeadMoEConfig(hidden_dim=8, shared_expert_dim=4)
    assert info.value.key == "shared_expert_dim"
    with pytest.raises(ConfigError) as info:
        MultiHeadMoEConfig(hidden_dim=8, heads=3).build(16)
    assert info.value.key == "heads" and "16" in info.value.message


def test_the_layout_follows_the_dtype_and_the_device(monkeypatch):
    """Dropless layers take the grouped layout where a grouped kernel exists without a host
    sync, capacity-limited ones the (E, C) layout (the simulated-CUDA tier checks CUDA)."""
    x = torch.randn(2, 6, 16)
    dropless, capped = make(), make(capacity_factor=1.0)
    calls = []
    for moe in (dropless, capped):
        moe._grouped = lambda *a, f=moe._grouped: calls.append("grouped") or f(*a)
        moe._blocked = lambda *a, f=moe._blocked: calls.append("padded") or f(*a)
    dropless(x), capped(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dropless(x)
    assert calls == ["grouped", "padded", "grouped"]
    assert dropless.experts.grouped_without_sync(x.bfloat16())
    cuda = torch.device("cuda")
    for major, fast in ((9, True), (10, True), (8, False)):  # bf16 grouped kernels: Hopper and Blackwell
        monkeypatch.setattr("multimodal_moe.layers.experts._cuda_major", lambda index, major=major: major)
        assert _grouped_kernel(torch.bfloat16, cuda, (16, 32)) == fast
        assert not _grouped_kernel(torch.float32, cuda, (16, 32))
        assert not _grouped_kernel(torch.bfloat16, cuda, (16, 12))  # rows not 16-byte aligned


@pytest.mark.parametrize("router", ["softmax", "xmoe"])
def test_experts_run_in_the_autocast_dtype_and_routing_in_fp32(router):
    moe = make(top_k=2, router=router)
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
        logits = moe.router(x.reshape(-1, 16))
    assert out.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(logits, moe.router(x.reshape(-1, 16)), rtol=0, atol=0)  # fp32, as without autocast
    torch.testing.assert_close(out.hidden.float(), moe(x).hidden, atol=3e-2, rtol=3e-2)


# -- expert choice ----------------------------------------------------------------------------------------

EC = dict(routing="expert_choice", capacity_factor=1.0, balance_loss_weight=0.0)


def expert_choice_oracle(moe, x_BTD, mask_BT=None):
    """Each expert in turn sorts the real tokens by its router probability (a Python sort) and
    takes the first C = ceil(cf * K * N / E), N counting padding; the output is the
    probability-weighted sum of the experts that took a token."""
    cfg, (B, T, D) = moe.cfg, x_BTD.shape
    x_ND = x_BTD.reshape(-1, D)
    N = x_ND.shape[0]
    real = range(N) if mask_BT is None else [n for n in range(N) if mask_BT.reshape(-1)[n]]
    probs = moe.router(x_ND).softmax(-1)
    C = min(N, math.ceil(cfg.capacity(moe.training) * cfg.top_k * N / cfg.num_experts))
    out = [x_ND.new_zeros(D) for _ in range(N)]
    taken = [0] * cfg.num_experts
    for e in range(cfg.num_experts):
        for n in sorted(real, key=lambda n: -probs[n, e].item())[:C]:
            out[n] = out[n] + probs[n, e] * expert_oracle(moe, e, x_ND[n])
            taken[e] += 1
    return torch.stack(out).reshape(B, T, D), taken


@pytest.mark.parametrize("kw", [dict(), dict(activation="swiglu", top_k=1), dict(capacity_factor=2.0),
                                dict(router="xmoe", num_experts=8), dict(bias=True, sub_ln=True)],
                         ids=["top2", "swiglu-k1", "cf2", "xmoe-8e", "biases-sub-ln"])
@pytest.mark.parametrize("padded", [False, True])
def test_expert_choice_matches_a_loop_oracle(kw, padded):
    moe = make(**{**EC, **kw})
    distinct_norms(moe)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = None
    if padded:  # the second sequence half padding, of large values: never chosen over a real token
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[1, 3:] = False
        with torch.no_grad():
            x[1, 3:] = 100.0
    assert_same_with_grads(moe, x, lambda: moe(x, token_mask_BT=mask).hidden,
                           lambda: expert_choice_oracle(moe, x, mask)[0])
    out = moe(x, token_mask_BT=mask)
    _, taken = expert_choice_oracle(moe, x, mask)
    assert out.stats["tokens_per_expert"].tolist() == taken and out.stats["balance_loss"] == 0
    if padded:  # padding outputs zeros, and NaN there stays there
        assert (out.hidden[1, 3:] == 0).all()
        with torch.no_grad():
            x[1, 3:] = float("nan")
        nan_out = moe(x, token_mask_BT=mask).hidden
        assert torch.isfinite(nan_out[mask]).all() and (nan_out[~mask] == 0).all()


def test_expert_choice_fills_every_expert_and_may_leave_tokens_out():
    moe = make(**EC, num_experts=4, top_k=1)
    with torch.no_grad():  # a router that prefers expert 0 for every token: still C tokens each
        moe.router.weight_ED.zero_()
        moe.router.weight_ED[0] = 1.0
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2)).abs()
    out = moe(x)
    assert out.stats["tokens_per_expert"].tolist() == [2.0] * 4  # C = 8 / 4
    picked = {n for e in range(4) for n in moe.router(x[0]).softmax(-1)[:, e].topk(2).indices.tolist()}
    assert out.stats["dropped_fraction"] == pytest.approx(1 - len(picked) / 8)
    assert out.aux_loss.item() == pytest.approx(moe.cfg.z_loss_weight * out.stats["z_loss"].item())


def test_expert_choice_config_and_its_refusals():
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, routing="expert_choice", balance_loss_weight=0.0)
    assert info.value.key == "capacity_factor" and "fixed capacity" in info.value.message
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, routing="expert_choice", capacity_factor=1.0, eval_capacity_factor="dropless",
                      balance_loss_weight=0.0)
    assert info.value.key == "capacity_factor"
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, routing="expert_choice", capacity_factor=1.0)
    assert info.value.key == "balance_loss_weight" and "no load to balance" in info.value.message
    import multimodal_moe as mm

    with pytest.raises(ConfigError) as info:  # a causal LM would see the future
        mm.load_config("lm/xmoe_debug", ["model.moe_ffn.routing=expert_choice", "model.moe_ffn.balance_loss_weight=0"])
    assert info.value.key.endswith("moe_ffn.routing") and "see the future" in info.value.message
    moe = make(**EC)
    moe.experts.holds_all_experts = False  # as expert parallelism's experts are
    with pytest.raises(ValueError, match="does not take expert parallelism"):
        moe(torch.randn(1, 4, 16))


# -- auxiliary-loss-free balancing (sigmoid scores, a bias on the choice) --

def test_the_balancing_bias_steers_the_choice_and_never_the_gates():
    moe = make(score="sigmoid", bias_update_rate=1e-3, top_k=1)
    x = torch.randn(2, 6, 16, requires_grad=True)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # outweighs any score difference
    out = moe(x)
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, 12, 0]
    gate = moe.router(x.reshape(-1, 16))[:, 2].sigmoid()[:, None]
    torch.testing.assert_close(out.hidden.reshape(-1, 16), gate * expert_oracle(moe, 2, x.reshape(-1, 16)))
    out.hidden.sum().backward()
    assert moe.router.weight_ED.grad.abs().sum() > 0 and "expert_bias" in dict(moe.named_buffers())
    assert "expert_bias" in moe.state_dict() and "expert_bias" not in make().state_dict()


def test_bias_update_counts_every_micro_batch_of_the_update_and_nothing_else():
    from multimodal_moe.layers.moe import discard_expert_loads, update_expert_biases

    moe = make(score="sigmoid", renormalize=True, bias_update_rate=0.01)
    x1, x2 = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    mask2 = torch.ones(3, 4, dtype=torch.bool)
    mask2[1, 2:] = False  # padding is not load
    for x, mask in ((x1, None), (x2, mask2)):  # what a block does after each forward it runs
        moe.observe(moe(x, token_mask_BT=mask).stats)
    moe.eval()
    moe.observe(moe(x1).stats)  # evaluation is not load
    moe.train()
    chosen = torch.cat([oracle_choices(moe, x1.reshape(-1, 16))[1], oracle_choices(moe, x2[mask2])[1]])
    load = torch.stack([(chosen == e).sum() for e in range(4)]).float()
    seen = []
    update_expert_biases(moe, lambda t: seen.append(t.clone()) or t)
    torch.testing.assert_close(seen[0], load)  # one collective for every layer's counts
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert moe.load_E.sum() == 0  # the next update counts afresh
    update_expert_biases(moe, lambda t: t)  # an update that saw no tokens: zeros, no move
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(load.mean() - load))
    moe.observe(moe(x1).stats)
    discard_expert_loads(moe)  # a skipped (non-finite) step
    assert moe.load_E.sum() == 0
    fresh = make(score="sigmoid", bias_update_rate=0.01)
    update_expert_biases(fresh, lambda t: t)  # a layer that never ran sends zeros: no move
    assert fresh.expert_bias.abs().sum() == 0 and fresh.load_E is None
    plain = make()
    plain.observe(plain(x1).stats)  # a layer without the bias counts nothing
    assert plain.load_E is None


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_counts_the_load_once(compiled):
    """The block counts each forward it runs, eagerly and compiled (fullgraph: the count is no
    graph break), not the recomputation in the backward pass; two passes count twice."""
    from torch import nn

    from multimodal_moe.layers.block import Block, run_blocks

    torch.manual_seed(0)
    cfg = TopKMoEConfig(hidden_dim=32, num_experts=4, top_k=2, score="sigmoid", bias_update_rate=1e-3)
    block = Block(dim=16, heads=2, ffns=cfg, make_norm=lambda: nn.LayerNorm(16))
    x = torch.randn(2, 5, 16, requires_grad=True)

    def blocks(x):
        return run_blocks([block], x, grad_checkpointing=True)

    run = torch.compile(blocks, backend="aot_eager", fullgraph=True) if compiled else blocks
    torch._dynamo.reset()
    y, _, stats = run(x)
    y.sum().backward()  # reruns the block's forward
    assert block.ffn.load_E.sum() == 2 * 5 * 2
    torch.testing.assert_close(block.ffn.load_E, stats[0]["shared"]["tokens_per_expert"])
    y, _, _ = run(x)
    y.sum().backward()
    torch.testing.assert_close(block.ffn.load_E, 2 * stats[0]["shared"]["tokens_per_expert"])


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_sequence_balance_loss_matches_a_loop_over_sequences(score):
    moe = make(score=score, renormalize=True, sequence_balance_loss_weight=1.0, balance_loss_weight=0.0,
               z_loss_weight=0.0, bias_update_rate=1e-3)
    x = torch.randn(3, 5, 16, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, :] = False  # a sequence of padding alone counts for nothing
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.0]))
    out = moe(x, token_mask_BT=mask)
    E, K, losses = 4, 2, []
    for b in range(3):
        rows = x[b][mask[b]]
        if not len(rows):
            continue
        logits = moe.router(rows)
        probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
        chosen = oracle_choices(moe, rows)[1]
        f = torch.stack([(chosen == e).sum() for e in range(E)]).float() * E / (K * len(rows))
        losses.append((f * probs.mean(0)).sum())
    torch.testing.assert_close(out.aux_loss, torch.stack(losses).mean())
    out.aux_loss.backward()
    assert moe.router.weight_ED.grad.abs().sum() > 0


def test_loss_free_balancing_config_refusals():
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, bias_update_rate=-1e-3)
    assert info.value.key == "bias_update_rate"
    for key, value in [("bias_update_rate", 1e-3), ("sequence_balance_loss_weight", 1e-4)]:
        with pytest.raises(ConfigError) as info:
            TopKMoEConfig(hidden_dim=8, **EC, **{key: value})
        assert info.value.key == key and "no load to balance" in info.value.message
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, **EC, score="sigmoid")
    assert info.value.key == "score" and "token choice" in info.value.message
    with pytest.raises(ConfigError) as info:
        TopKMoEConfig(hidden_dim=8, top_k=1, score="sigmoid", renormalize=True)
    assert info.value.key == "renormalize"


# -- torch.compile --

COMPILED = {**{n: cfg for n, cfg in moe_variants(64).items() if n != "dense"},
            "top2_of_8_biases_sub_ln": TopKMoEConfig(hidden_dim=32, num_experts=8, top_k=2, bias=True, sub_ln=True)}


@pytest.mark.parametrize("name", COMPILED)
def test_every_ffn_kind_compiles_without_a_graph_break_and_equals_eager(name):
    """fullgraph=True fails on any graph break (dispatch, routing, each row's expert);
    AOTAutograd's graphs run eagerly (backend aot_eager), so the comparison needs no compiler.
    In fp32 on the CPU the compiled layer takes the padded expert layout, eager the grouped one."""
    torch.manual_seed(0)
    moe = COMPILED[name].build(32)
    distinct_norms(moe)
    x = torch.randn(32, 4, 32, requires_grad=True)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    assert_same_with_grads(moe, x, lambda: compiled(x).hidden, lambda: moe(x).hidden)
    torch.testing.assert_close(compiled(x).aux_loss, moe(x).aux_loss, rtol=1e-5, atol=1e-6)


def test_the_global_balance_scope_in_one_process_is_the_micro_batch_balance_loss():
    """Without other ranks (and in evaluation) there is nothing to count over: the same loss, no
    collective; tests/test_distributed.py checks world 2 against one process."""
    x = torch.randn(2, 6, 16)
    for training in (True, False):
        ours, plain = make(balance_scope="global").train(training), make().train(training)
        torch.testing.assert_close(ours(x).aux_loss, plain(x).aux_loss, rtol=0, atol=0)
