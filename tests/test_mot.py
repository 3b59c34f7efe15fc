"""Mixture of Tokens against a loop over groups; group isolation, causality, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import multimodal_moe as mm
from multimodal_moe.layers.mot import MixtureOfTokensConfig, topk_from_mot

from .test_moe import assert_same_with_grads, expert_oracle


def make(dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    return MixtureOfTokensConfig(**{"hidden_dim": 12, "num_experts": 3, "group_size": 2, **kw}).build(dim)


def mot_oracle(mot, x_BTD, mask_BT=None, discrete=False):
    """For every position and every group of G consecutive examples, mix, run, redistribute."""
    B, T, _ = x_BTD.shape
    G, E = mot.cfg.group_size, mot.cfg.num_experts
    out = torch.zeros_like(x_BTD)
    for t in range(T):
        for start in range(0, B, G):
            rows = [b for b in range(start, start + G) if mask_BT is None or mask_BT[b, t]]
            if not rows:
                continue
            xs = x_BTD[rows, t]                                            # (g, D)
            scores = xs @ mot.controller_DE / mot.log_temperature.exp()    # (g, E)
            w = F.one_hot(scores.argmax(0), len(rows)).t().to(xs.dtype) if discrete else scores.softmax(0)
            for e in range(E):
                y = expert_oracle(mot, e, (w[:, e:e + 1] * xs).sum(0))
                for i, b in enumerate(rows):
                    out[b, t] = out[b, t] + w[i, e] * y
    return out


@pytest.mark.parametrize("kw", [dict(), dict(activation="swiglu", learn_temperature=True, temperature=0.5),
                                dict(group_size=4, num_experts=5)])
@pytest.mark.parametrize("padded", [False, True])
def test_mot_matches_loop_over_groups(kw, padded):
    mot = make(**kw)
    x = torch.randn(4, 3, 16, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(4, 3, dtype=torch.bool)
        mask[1, 1:] = False
        mask[0, 2] = False  # with G=2 the group {0, 1} at t=2 is all padding
    out = mot(x, token_mask_BT=mask)
    assert out.aux_loss == 0 and {"mixing_entropy", "temperature"} <= out.stats.keys()
    if mask is not None:
        assert (out.hidden[~mask] == 0).all()
    assert_same_with_grads(mot, x, lambda: mot(x, token_mask_BT=mask).hidden, lambda: mot_oracle(mot, x, mask))


def test_discrete_eval_mode_uses_one_hot_weights():
    mot = make(eval_mode="discrete", group_size=4).eval()
    x = torch.randn(4, 3, 16)
    torch.testing.assert_close(mot(x).hidden, mot_oracle(mot, x, discrete=True))
    torch.testing.assert_close(mot.train()(x).hidden, mot_oracle(mot, x))


def test_examples_only_mix_within_their_group():
    mot = make(group_size=2)
    x = torch.randn(6, 4, 16)
    out = mot(x).hidden
    changed = x.clone()
    changed[3] = torch.randn(4, 16)  # example 3 is in group {2, 3}
    new = mot(changed).hidden
    torch.testing.assert_close(new[[0, 1, 4, 5]], out[[0, 1, 4, 5]], rtol=0, atol=0)
    assert not torch.allclose(new[2], out[2])


def test_mot_language_model_stays_causal():
    cfg = mm.load_config("lm/debug", ["model.ffn={kind: mot, hidden_dim: 64, num_experts: 4, group_size: 2}"])
    model = mm.build_model(cfg).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (4, 10))
    out = model(ids).hidden
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, cfg.model.vocab_size, (4, 4))
    torch.testing.assert_close(model(changed).hidden[:, :6], out[:, :6], rtol=0, atol=1e-6)


def test_batch_not_a_multiple_of_the_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"group_size=4.*batch has 6.*divisible by 4"):
        make(group_size=4)(torch.randn(6, 2, 16))


def test_flop_matched_width():
    assert MixtureOfTokensConfig.flop_matched(2048, group_size=32, num_experts=32) == 2048
    assert MixtureOfTokensConfig.flop_matched(3072, group_size=32, num_experts=128) == 768
    with pytest.raises(ValueError, match="not divisible"):
        MixtureOfTokensConfig.flop_matched(100, group_size=3, num_experts=7)


def test_transition_tuning_copies_controller_and_experts():
    mot = make(temperature=0.5)
    moe = topk_from_mot(mot, top_k=1)
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe.router(x), x @ mot.controller_DE / 0.5)
    for name, p in mot.experts.named_parameters():
        assert torch.equal(p, dict(moe.experts.named_parameters())[name])
    out = moe(x[None])
    choice = (x @ mot.controller_DE).argmax(-1)
    gate = (x @ mot.controller_DE / 0.5).softmax(-1).max(-1).values
    expected = torch.stack([gate[n] * expert_oracle(mot, int(choice[n]), x[n]) for n in range(5)])
    torch.testing.assert_close(out.hidden[0], expected)


def test_float64_gradcheck():
    mot = make(dim=6, hidden_dim=4, learn_temperature=True).double()
    x = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    assert torch.autograd.gradcheck(lambda x: mot(x, token_mask_BT=mask).hidden, (x,))
    names = [n for n, _ in mot.named_parameters()]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(mot, dict(zip(names, ps)), (x.detach(),)).hidden,
        tuple(mot.parameters()))
