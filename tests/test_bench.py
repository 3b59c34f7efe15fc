"""The benchmark's contract (never its timings): FLOP-matched variants and a complete report."""

from __future__ import annotations

import pytest
import torch

from multimodal_moe.bench import _peak_step_memory_mb, bench_moe, expert_macs_per_token, moe_variants


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_variants_do_the_dense_ffn_expert_work(activation):
    variants = moe_variants(2048, activation)
    dense = expert_macs_per_token(variants["dense"], 512)
    assert dense == (3 if activation == "swiglu" else 2) * 512 * 2048
    assert {name: expert_macs_per_token(cfg, 512) for name, cfg in variants.items()} == dict.fromkeys(variants, dense)


def test_report_on_tiny_shapes():
    report = bench_moe(batch=32, seq=2, dim=32, dense_hidden=64, rounds=1, memory=False, huggingface=False)
    assert set(report["variants"]) == set(moe_variants(64))
    assert report["variants"]["dense"]["vs_dense"] == 1.0
    assert all(v["tokens_per_s"] > 0 for v in report["variants"].values())
    assert report["huggingface_mixtral_eager"] == {"transformers": "skipped", "variants": {}}


def test_hugging_face_mixtral_is_timed_with_its_eager_and_grouped_mm_experts():
    """transformers (a test reference, installed by make test): its MoE block beside ours at the
    same SwiGLU shapes, both of its experts implementations, each the same computation."""
    import transformers

    from multimodal_moe.bench import _hf_mixtral

    report = bench_moe(batch=32, seq=2, dim=32, dense_hidden=64, rounds=1, memory=False)
    for section in ("huggingface_mixtral_eager", "huggingface_mixtral_grouped_mm"):
        assert report[section]["transformers"] == transformers.__version__
        assert set(report[section]["variants"]) == {"top2_of_8", "top2_of_32", "top8_of_64"}
        assert all(v["ours_vs_hf"] > 0 for v in report[section]["variants"].values())
    cfg = moe_variants(64, activation="swiglu")["top2_of_8"]
    torch.manual_seed(0)
    eager = _hf_mixtral(32, cfg)
    grouped = _hf_mixtral(32, cfg, "grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    x = torch.randn(4, 8, 32)
    torch.testing.assert_close(grouped(x), eager(x), rtol=1e-5, atol=1e-6)


def test_compiled_variants_are_timed_against_their_eager_selves():
    report = bench_moe(batch=32, seq=2, dim=32, dense_hidden=64, rounds=1, memory=False, huggingface=False,
                       compile_backend="aot_eager")  # AOTAutograd's graphs run eagerly: no compiler needed
    compiled = report["compiled"]
    assert compiled["backend"] == "aot_eager" and set(compiled["variants"]) == set(moe_variants(64))
    assert all(v["compiled_tokens_per_s"] > 0 and v["compiled_vs_eager"] > 0 for v in compiled["variants"].values())
    assert "compiled" not in bench_moe(batch=32, seq=2, dim=32, dense_hidden=64, rounds=1, memory=False,
                                       huggingface=False)


def test_peak_memory_of_a_step_is_measured_in_a_fresh_process():
    small = _peak_step_memory_mb("dense", 32, 4, 32, 64, tuned=True)
    large = _peak_step_memory_mb("dense", 32, 256, 256, 1024, tuned=True)  # activations of about 64 MiB
    assert small is not None and large is not None and large > small + 30


@pytest.mark.parametrize("sparse, dense", [  # the debug presets: tests/test_preset_fidelity.py
    ("lm/deepseekmoe_64e", "lm/mhmoe_backbone"), ("beit3/base_deepseekmoe_64e", "beit3/base"),
    ("beit3/base_ec_8e", "beit3/base"), ("lm/lossfree_8e", "lm/mhmoe_backbone"),
    ("beit3/base_lossfree_8e", "beit3/base")])
def test_fine_grained_expert_choice_and_loss_free_base_presets_do_their_dense_ffns_multiply_adds(sparse, dense):
    import multimodal_moe as mm

    moe, ffn = mm.load_config(sparse).model, mm.load_config(dense).model
    assert moe.moe_ffn is not None and moe.dim == ffn.dim
    assert expert_macs_per_token(moe.moe_ffn, moe.dim) == expert_macs_per_token(ffn.ffn, ffn.dim)
