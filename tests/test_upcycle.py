"""Sparse upcycling: a MoE preset started from a dense checkpoint, experts copied, routers fresh."""

from __future__ import annotations

import pytest
import torch

import multimodal_moe as mm
from multimodal_moe.cli import main
from multimodal_moe.configurable import ConfigError
from multimodal_moe.layers.moe import TopKMoE
from multimodal_moe.training import Checkpoint, build_task, save_checkpoint
from multimodal_moe.upcycle import upcycle

# the experts of these presets as the dense debug FFNs are (width 128, biases, Sub-LN), with
# renormalised top-2 gates that sum to 1: the upcycled model is the dense one, exactly
LIKE_DENSE = ["model.moe_ffn.hidden_dim=128", "model.moe_ffn.bias=true", "model.moe_ffn.sub_ln=true",
              "model.moe_ffn.top_k=2", "model.moe_ffn.renormalize=true", "model.moe_ffn.capacity_factor=null",
              "model.moe_ffn.eval_capacity_factor=train"]
FAMILIES = {"lm": ("lm/debug", "lm/openmoe_debug", ["model.moe_ffn.activation=swiglu"]),
            "beit3": ("beit3/debug", "beit3/xmoe_debug", [])}


def dense_checkpoint(tmp_path, preset: str):
    cfg = mm.load_config(preset)
    torch.manual_seed(1)
    task = build_task(cfg)
    with torch.no_grad():  # a trained Sub-LN is not ones and zeros
        for name, p in task.model.named_parameters():
            if "ffn_norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(tmp_path / "dense" / "checkpoints", 7, task=task, state={"step": 7}, cfg=cfg)
    return task, tmp_path / "dense"


def outputs(model, family: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if family == "lm":
        return model.logits(model(torch.randint(5, 4000, (2, 12), generator=g)).hidden)
    return model(images=torch.randn(2, 3, 32, 32, generator=g), text_ids=torch.randint(5, 4000, (2, 6), generator=g)
                 ).hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_an_upcycled_model_with_renormalised_top2_computes_the_dense_model(tmp_path, family):
    dense_preset, moe_preset, extra = FAMILIES[family]
    dense, src = dense_checkpoint(tmp_path, dense_preset)
    path = upcycle(src, tmp_path / "moe", mm.load_config(moe_preset, [*LIKE_DENSE, *extra]))
    ckpt = Checkpoint.open(path)
    assert ckpt.training_state()["step"] == 7 and ckpt.config.model.moe_ffn.bias
    moe = mm.build_model(ckpt.config)
    ckpt.load_model_into(moe)
    layers = {n: m for n, m in moe.named_modules() if isinstance(m, TopKMoE)}
    assert layers and (family == "lm" or len(layers) == 2)  # the encoder: its vision and text branches
    dense_state = dense.model.state_dict()
    for name, layer in layers.items():
        ex = layer.experts
        for e in range(ex.w1_EDF.shape[0]):
            assert torch.equal(ex.w1_EDF[e], dense_state[f"{name}.fc1.weight"].t())
            assert torch.equal(ex.w2_EFD[e], dense_state[f"{name}.fc2.weight"].t())
            assert torch.equal(ex.b2_ED[e], dense_state[f"{name}.fc2.bias"])
            assert torch.equal(ex.norm_weight_EF[e], dense_state[f"{name}.ffn_norm.weight"])
    dense.model.eval(), moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(moe, family), outputs(dense.model, family), rtol=1e-5, atol=1e-5)


def test_noise_tells_the_copies_apart_and_the_upcycled_run_trains(tmp_path):
    _, src = dense_checkpoint(tmp_path, "lm/debug")
    cfg = mm.load_config("lm/openmoe_debug", [*LIKE_DENSE, "model.moe_ffn.activation=swiglu"])
    assert main(["convert", "upcycle", str(src), "--config", "lm/openmoe_debug", "--dst", str(tmp_path / "moe"),
                 "--noise", "0.01", *[f"--set={o}" for o in LIKE_DENSE], "--set=model.moe_ffn.activation=swiglu"]) == 0
    w1 = Checkpoint.open(tmp_path / "moe").weights()["layers.1.ffn.experts.w1_EDF"]
    dense_w1 = Checkpoint.open(src).weights()["layers.1.ffn.fc1.weight"].t()
    relative = (w1 - dense_w1).std(dim=(1, 2)) / dense_w1.std()
    assert torch.allclose(relative, torch.full((8,), 0.01), rtol=0.1)  # a draw per expert, of 1% of the std
    assert not torch.equal(w1[0], w1[1])
    run = tmp_path / "run"
    assert main(["pretrain", "--init", str(tmp_path / "moe"), "--run-dir", str(run), "--no-progress",
                 "--set=train.steps=2", "--set=train.warmup_steps=1", "--set=task.text.batch_size=4"]) == 0
    assert Checkpoint.open(run).config.model == cfg.model


@pytest.mark.parametrize("overrides, key, message", [
    (["model.moe_ffn.hidden_dim=128", "model.moe_ffn.activation=swiglu", "model.moe_ffn.sub_ln=true"],
     "model.moe_ffn", "set model.moe_ffn.bias=true"),
    (["model.moe_ffn.hidden_dim=128", "model.moe_ffn.activation=swiglu", "model.moe_ffn.bias=true"],
     "model.moe_ffn", "set model.moe_ffn.sub_ln=true"),
    (["model.moe_ffn.activation=swiglu", "model.moe_ffn.bias=true", "model.moe_ffn.sub_ln=true"],
     "model.moe_ffn.hidden_dim", "must have the dense FFN's width"),
    (["model.moe_ffn.hidden_dim=128", "model.moe_ffn.activation=swiglu", "model.moe_ffn.bias=true",
      "model.moe_ffn.sub_ln=true", "model.moe_ffn.shared_expert_dim=16"], "model.moe_ffn.shared_expert_dim",
     "no dense counterpart"),
    (["model.moe_ffn.hidden_dim=128", "model.moe_ffn.activation=swiglu", "model.moe_ffn.bias=true",
      "model.moe_ffn.sub_ln=true", "model.depth=4"], "model", "model.depth (checkpoint 2, requested 4)"),
    (["model.moe_ffn.hidden_dim=128", "model.moe_ffn.activation=silu", "model.moe_ffn.bias=true",
      "model.moe_ffn.sub_ln=true"], "model.moe_ffn.activation", "is not the dense FFN's swiglu"),
])
def test_an_upcycling_that_cannot_copy_names_what_differs(tmp_path, overrides, key, message):
    """Each refusal names the setting to change; a preset deeper than the dense model would
    leave layers uncopied and is refused too."""
    _, src = dense_checkpoint(tmp_path, "lm/debug")
    with pytest.raises(ConfigError) as info:
        upcycle(src, tmp_path / "moe", mm.load_config("lm/openmoe_debug", overrides))
    assert info.value.key == key and message in info.value.message
    with pytest.raises(ConfigError, match="sub-tokens of width D/h"):
        upcycle(src, tmp_path / "mh", mm.load_config("lm/mhmoe_debug"))
