"""Attention, RoPE and the dense FFN against slow obvious oracles; the FFN registry contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import multimodal_moe.layers.attention as attention_module
from multimodal_moe.configurable import parse
from multimodal_moe.layers import FFNConfig, FFNOutput, attend
from multimodal_moe.layers.attention import RotaryEmbedding, apply_rotary
from multimodal_moe.layers.ffn import DenseFFN


def attention_oracle(q, k, v, padding=None, causal=False):
    """Loop over batch, head and query: softmax over the allowed keys."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                allowed = [s for s in range(T)
                           if (padding is None or not padding[b, s]) and (not causal or s <= t)]
                if causal and padding is not None:
                    allowed = sorted(set(allowed) | {t})
                scores = torch.stack([q[b, h, t] @ k[b, h, s] / math.sqrt(d) for s in allowed])
                weights = scores.softmax(0)
                out[b, h, t] = sum(w * v[b, h, s] for w, s in zip(weights, allowed))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_attention_matches_oracle(causal, padded):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    padding = None
    if padded:
        padding = torch.zeros(2, 6, dtype=torch.bool)
        padding[0, 4:] = True   # right padding
        padding[1, :2] = True   # left padding: causal queries 0 and 1 see no real key
    for backend in ("auto", "sdpa"):
        out = attend(q, k, v, key_padding_mask_BT=padding, causal=causal, backend=backend)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, attention_oracle(q, k, v, padding, causal))


def test_xformers_backend_fails_clearly_where_it_cannot_run(monkeypatch):
    q = torch.randn(1, 2, 4, 8)
    for installed in (False, True):
        monkeypatch.setattr(attention_module, "xformers_installed", lambda installed=installed: installed)
        with pytest.raises(RuntimeError, match="attention_backend='xformers' cannot run") as info:
            attend(q, q, q, backend="xformers")
        assert ("not installed" in str(info.value)) != installed
        assert ("on cpu" in str(info.value)) == installed
        # auto falls back to SDPA on CPU whether or not xformers is installed
        torch.testing.assert_close(attend(q, q, q, backend="auto"), F.scaled_dot_product_attention(q, q, q))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=8, max_len=32)
    cos, sin = rope(32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(m, n):
        qm = apply_rotary(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rotary(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("sub_ln", [True, False])
def test_dense_ffn_matches_its_formula(activation, sub_ln):
    ffn = parse(FFNConfig, {"kind": "dense", "hidden_dim": 12, "activation": activation, "sub_ln": sub_ln}).build(8)
    assert isinstance(ffn, DenseFFN)
    x = torch.randn(2, 5, 8)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": F.silu}[activation]
    h = act(x @ ffn.fc1.weight.T + ffn.fc1.bias)
    if activation == "swiglu":
        h = h * (x @ ffn.fc3.weight.T + ffn.fc3.bias)
    if sub_ln:
        h = F.layer_norm(h, (12,), ffn.ffn_norm.weight, ffn.ffn_norm.bias, eps=1e-5)
    expected = h @ ffn.fc2.weight.T + ffn.fc2.bias
    out = ffn(x, token_mask_BT=torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out.hidden, expected)


@pytest.mark.parametrize("kind", sorted(FFNConfig.kinds()))
def test_every_ffn_kind_honours_the_interface(kind):
    cfg = FFNConfig.kinds()[kind](hidden_dim=16)
    ffn = cfg.build(8)
    x = torch.randn(32, 5, 8, requires_grad=True)  # 32: Mixture of Tokens' default group size
    mask = torch.ones(32, 5, dtype=torch.bool)
    mask[2, 3:] = False
    out = ffn(x, token_mask_BT=mask)
    assert isinstance(out, FFNOutput) and out.hidden.shape == x.shape and out.aux_loss.shape == ()
    assert all(isinstance(v, torch.Tensor) for v in out.stats.values())
    (out.hidden[mask].sum() + out.aux_loss).backward()
    assert all(p.grad is not None for p in ffn.parameters())


def test_init_scale_multiplies_ffn_weights():
    cfg = parse(FFNConfig, {"kind": "dense", "hidden_dim": 12, "activation": "swiglu"})
    torch.manual_seed(0)
    plain = cfg.build(8)
    torch.manual_seed(0)
    scaled = cfg.build(8, init_scale=1.5)
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters()):
        factor = 1.0 if name.startswith("ffn_norm") else 1.5
        torch.testing.assert_close(b, a * factor, msg=name)
