"""Every preset builds; the tiny ones train a step with gradients everywhere and no NaN."""

from __future__ import annotations

import pytest
import torch

import multimodal_moe as mm
from multimodal_moe.smoke import run_smoke, smoke_loss, synthetic_inputs

from .conftest import DEBUG_PRESETS, tiny


@pytest.mark.parametrize("name", mm.list_presets())
def test_every_preset_builds(name):
    cfg = mm.load_config(name)
    with torch.device("meta"):
        model = mm.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_beit3_base_has_the_reference_parameter_count():
    # torchscale's BEiT3 base backbone: 221.0M (its position tables carry 2 extra offset rows each).
    with torch.device("meta"):
        model = mm.build_model(mm.load_config("beit3/base"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 221.0


@pytest.mark.parametrize("name", DEBUG_PRESETS)
def test_debug_presets_train_with_gradients_everywhere(name):
    cfg, model = tiny(name)
    report = run_smoke(model, cfg.model, steps=2)
    assert report.params_without_grad == []
    assert all(torch.isfinite(torch.tensor(report.losses)))
    assert report.losses[1] != report.losses[0]


@pytest.mark.parametrize("name", [n for n in DEBUG_PRESETS if n.startswith("beit3/")])
def test_encoder_output_shapes(name):
    cfg, model = tiny(name)
    c = cfg.model
    images, text, joint = synthetic_inputs(c, batch_size=4, text_len=5)
    for kwargs, tokens, num_vision in [(images, 1 + c.num_patches, 1 + c.num_patches), (text, 5, 0),
                                       (joint, 1 + c.num_patches + 5, 1 + c.num_patches)]:
        out = model(**kwargs)
        assert out.hidden.shape == (4, tokens, c.dim) and out.num_vision == num_vision
        assert out.vision_hidden.shape[1] == num_vision and out.text_hidden.shape[1] == tokens - num_vision
        assert out.aux_loss.shape == () and len(out.moe_stats) == c.depth


@pytest.mark.parametrize("name", DEBUG_PRESETS)
def test_grad_checkpointing_changes_nothing(name):
    outputs = []
    for flag in ("false", "true"):
        cfg, model = tiny(name, f"model.grad_checkpointing={flag}")
        inputs = synthetic_inputs(cfg.model, generator=torch.Generator().manual_seed(1))
        loss = sum(smoke_loss(model(**kw)) for kw in inputs)
        loss.backward()
        outputs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = outputs
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-6, atol=1e-7, msg=n)


def test_drop_path_is_random_in_training_and_off_in_eval():
    cfg, model = tiny("beit3/debug", "model.drop_path=0.5")
    kwargs = synthetic_inputs(cfg.model)[2]
    model.eval()
    torch.testing.assert_close(model(**kwargs).hidden, model(**kwargs).hidden, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    a = model(**kwargs).hidden
    torch.manual_seed(1)
    assert not torch.allclose(a, model(**kwargs).hidden)


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    cfg = mm.load_config("beit3/debug")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = mm.build_model(cfg), mm.build_model(cfg)
    assert torch.rand(1) == before
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    c = mm.build_model(cfg, seed=1)
    assert not torch.equal(a.text_embed.tokens.weight, c.text_embed.tokens.weight)


def test_sub_ln_init_scales_residual_projections():
    cfg = mm.load_config("beit3/debug")
    plain = mm.build_model(mm.load_config("beit3/debug", ["model.sub_ln=false"]))
    scaled = mm.build_model(cfg)
    factor = cfg.model.init_scale
    assert factor == pytest.approx((torch.log(torch.tensor(6.0))).sqrt().item())
    names = ("attn.v_proj.text.weight", "attn.out_proj.vision.weight", "ffn.text.fc1.weight", "ffn.vision.fc2.bias")
    for name in names:
        p_plain, p_scaled = (dict(m.layers[1].named_parameters())[name] for m in (plain, scaled))
        torch.testing.assert_close(p_scaled, p_plain * factor, msg=name)
    for name in ("attn.q_proj.text.weight", "attn.k_proj.vision.weight"):
        p_plain, p_scaled = (dict(m.layers[1].named_parameters())[name] for m in (plain, scaled))
        torch.testing.assert_close(p_scaled, p_plain, msg=name)


def test_bad_inputs_give_clear_errors():
    cfg, model = tiny("beit3/debug")
    c = cfg.model
    images, text, _ = synthetic_inputs(c)
    with pytest.raises(ValueError, match="pass images, text_ids or both"):
        model()
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\)"):
        model(images=torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="image_mask must be a bool tensor of shape"):
        model(images=images["images"], image_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_text_len is 64"):
        model(text_ids=torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="entirely padding"):
        model(text_ids=text["text_ids"], text_padding_mask=torch.ones_like(text["text_padding_mask"]))
    with pytest.raises(ValueError, match="different batch sizes"):
        model(images=images["images"], text_ids=text["text_ids"][:1])
    with pytest.raises(ValueError, match="without images"):
        model(text_ids=text["text_ids"], image_mask=images["image_mask"])
    _, lm = tiny("lm/debug")
    with pytest.raises(ValueError, match="max_seq_len is 128"):
        lm(torch.zeros(1, 129, dtype=torch.long))


def test_smoke_reports_parameters_without_gradient():
    cfg, model = tiny("lm/debug")
    model.unused = torch.nn.Parameter(torch.zeros(3))
    report = run_smoke(model, cfg.model, steps=1)
    assert report.params_without_grad == ["unused"] and not report.ok


MOE_IN_MODELS = {
    "vision MoE, text dense": ("beit3/debug", ["model.vision_ffn={kind: topk_moe, hidden_dim: 32, num_experts: 4}"]),
    "every branch MH-MoE, VL MoT": ("beit3/debug_paper", [
        "model.ffn={kind: mh_moe, hidden_dim: 32, num_experts: 4, heads: 2, top_k: 1}",
        "model.vision_language_ffn={kind: mot, hidden_dim: 32, num_experts: 4, group_size: 2}"]),
    "LM X-MoE": ("lm/debug", ["model.ffn={kind: topk_moe, hidden_dim: 32, num_experts: 4, router: xmoe, top_k: 1}"]),
}


@pytest.mark.parametrize("case", MOE_IN_MODELS)
def test_moe_ffns_inside_models(case):
    preset, overrides = MOE_IN_MODELS[case]
    cfg, model = tiny(preset, *overrides)
    report = run_smoke(model, cfg.model, steps=2)
    assert report.ok, report.params_without_grad
    kwargs = synthetic_inputs(cfg.model)[-1]
    out = model(**kwargs)
    assert out.aux_loss > 0
    stats = out.moe_stats[-1]
    if preset == "beit3/debug":  # vision MoE only: stats for the vision branch, counting vision tokens only
        assert set(stats) == {"vision"}
        assert stats["vision"]["routed_tokens"] == 2 * (1 + cfg.model.num_patches)
    elif preset == "beit3/debug_paper":  # joint input goes through the VL-FFN (MoT) in the top layer
        assert set(stats) == {"vision_language"} and "mixing_entropy" in stats["vision_language"]
        assert set(out.moe_stats[0]) == {"vision", "text"}
    else:  # padded text: the padding token is not routed
        assert set(stats) == {"shared"} and stats["shared"]["routed_tokens"] == kwargs["ids_BT"].numel() - 1


def test_moe_placement_every_n_and_explicit_layers():
    from multimodal_moe.layers import DenseFFN, MultiHeadMoE, TopKMoE

    moe = "model.moe_ffn={kind: topk_moe, hidden_dim: 32, num_experts: 4}"
    _, lm = tiny("lm/debug", "model.depth=4", "model.moe_every=2", moe)
    assert [type(layer.ffn) for layer in lm.layers] == [DenseFFN, TopKMoE, DenseFFN, TopKMoE]
    _, lm = tiny("lm/debug", "model.depth=4", "model.moe_layers=[0, 3]", moe)
    assert [type(layer.ffn) for layer in lm.layers] == [TopKMoE, DenseFFN, DenseFFN, TopKMoE]
    cfg, enc = tiny("beit3/debug_paper", "model.moe_every=3", "model.moe_branches=[vision, vision_language]",
                    "model.moe_ffn={kind: mh_moe, hidden_dim: 32, num_experts: 4, heads: 2}")
    top = enc.layers[2].ffn
    assert (type(top.vision), type(top.text), type(top.vision_language)) == (MultiHeadMoE, DenseFFN, MultiHeadMoE)
    assert all(isinstance(branch, DenseFFN) for layer in enc.layers[:2] for branch in layer.ffn.values())
    assert run_smoke(enc, cfg.model, steps=1).ok


@pytest.mark.parametrize("overrides, key, words", [
    (["model.moe_every=2"], "model.moe_ffn", "is null"),
    (["model.moe_ffn={kind: topk_moe, hidden_dim: 8}"], "model.moe_ffn", "no layer uses it"),
    (["model.moe_ffn={kind: topk_moe, hidden_dim: 8}", "model.moe_layers=[3]"], "model.moe_layers", "[3]"),
    (["model.moe_ffn={kind: topk_moe, hidden_dim: 8}", "model.moe_layers=[1]", "model.moe_every=1"],
     "model.moe_layers", "not both"),
    (["model.moe_every=-1"], "model.moe_every", ">= 0"),
    (["model.moe_branches=[audio]"], "model.moe_branches[0]", "'vision'"),
    (["model.moe_ffn={kind: topk_moe, hidden_dim: 8}", "model.moe_every=1", "model.moe_branches=[]"],
     "model.moe_branches", "empty"),
])
def test_moe_placement_validation(overrides, key, words):
    with pytest.raises(mm.ConfigError) as info:
        mm.load_config("beit3/debug", overrides)
    assert info.value.key == key and words in info.value.message


def test_ffn_width_constraints_fail_at_config_time():
    with pytest.raises(mm.ConfigError) as info:
        mm.load_config("beit3/debug", ["model.text_ffn={kind: mh_moe, hidden_dim: 8, heads: 3}"])
    assert info.value.key == "model.text_ffn.heads" and "width 64 is not divisible by heads 3" in info.value.message
