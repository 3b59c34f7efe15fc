"""Multiway routing: vision tokens only touch vision parameters, text tokens only text ones,
and the VL-FFN only exists in the top layers of the paper layout and only takes image-text
input."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from multimodal_moe.smoke import smoke_loss, synthetic_inputs

from .conftest import tiny

LEAVES = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Conv2d, nn.Embedding)


def tokens_seen(model: nn.Module, kwargs: dict) -> dict[str, list[int]]:
    """Module name -> the token counts of every call during one forward (leaf modules)."""
    seen: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LEAVES):
            def hook(mod, args, name=name):
                x = args[0]
                seen.setdefault(name, []).append(x.shape[1] if x.ndim == 3 else -1)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def branch_of(name: str) -> str | None:
    found = re.search(r"\.(vision_language|vision|text)(\.|$)", name)
    return found.group(1) if found else None


def params_with_grad(model: nn.Module, kwargs: dict) -> set[str]:
    model.zero_grad(set_to_none=True)
    smoke_loss(model(**kwargs)).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_decoupled_joint_input_routes_every_token_to_its_modality():
    cfg, model = tiny("beit3/debug")
    _, _, joint = synthetic_inputs(cfg.model, text_len=7)
    num_vision = 1 + cfg.model.num_patches
    seen = tokens_seen(model, joint)
    per_branch = {"vision": 0, "text": 0}
    for name, counts in seen.items():
        if name.startswith(("vision_embed", "text_embed")):
            continue
        branch = branch_of(name)
        assert branch in per_branch, f"{name} is shared in the decoupled layout"
        assert counts == [num_vision if branch == "vision" else 7], name
        per_branch[branch] += 1
    # attn_norm, q, k, v, inner_norm, out, ffn_norm, fc1, ffn_norm(sub-LN), fc2 per layer, plus the final norm
    assert per_branch == {"vision": 10 * cfg.model.depth + 1, "text": 10 * cfg.model.depth + 1}


def test_paper_layout_shares_attention_and_uses_vl_ffn_on_top_for_pairs():
    cfg, model = tiny("beit3/debug_paper")
    c = cfg.model
    _, _, joint = synthetic_inputs(c, text_len=7)
    num_vision, total = 1 + c.num_patches, 1 + c.num_patches + 7
    top = range(c.depth - c.vl_ffn_layers, c.depth)
    seen = tokens_seen(model, joint)
    for name, counts in seen.items():
        if name.startswith(("vision_embed", "text_embed")):
            continue
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        branch = branch_of(name)
        if branch is None:  # shared attention and final norm see the whole sequence
            assert counts == [total], name
        elif layer in top:
            assert branch == "vision_language" and counts == [total], name
        else:
            assert counts == [num_vision if branch == "vision" else 7], name
    vl_layers = {int(n.split(".")[1]) for n, _ in model.named_parameters() if "vision_language" in n}
    assert vl_layers == set(top)


@pytest.mark.parametrize("preset", ["beit3/debug", "beit3/debug_paper"])
def test_single_modality_inputs_touch_only_their_parameters(preset):
    cfg, model = tiny(preset)
    images, text, joint = synthetic_inputs(cfg.model)
    all_params = {n for n, _ in model.named_parameters()}
    vision_only = {n for n in all_params if n.startswith("vision_embed") or branch_of(n) == "vision"}
    text_only = {n for n in all_params if n.startswith("text_embed") or branch_of(n) == "text"}
    vl = {n for n in all_params if branch_of(n) == "vision_language"}
    shared = all_params - vision_only - text_only - vl

    from_images = params_with_grad(model, images)
    assert from_images == vision_only | shared
    from_text = params_with_grad(model, text)
    assert from_text == text_only | shared
    from_pairs = params_with_grad(model, joint)
    expected = all_params - {"vision_embed.mask_token"}  # no masked patches in this input
    if vl:
        top = cfg.model.depth - 1
        expected -= {n for n in all_params if re.match(rf"layers\.{top}\.ffn(_norm)?\.(vision|text)\.", n)}
    assert from_pairs == expected


def test_vision_tokens_outputs_do_not_depend_on_text_parameters_without_attention():
    # In the decoupled layout, the text branch of a layer changes vision tokens only through
    # attention: zeroing the text FFNs must leave image-only outputs unchanged.
    cfg, model = tiny("beit3/debug")
    images, _, _ = synthetic_inputs(cfg.model)
    model.eval()
    before = model(**images).hidden
    with torch.no_grad():
        for name, p in model.named_parameters():
            if branch_of(name) == "text":
                p.zero_()
    torch.testing.assert_close(model(**images).hidden, before, rtol=0, atol=0)
