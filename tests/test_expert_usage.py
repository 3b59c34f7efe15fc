"""Expert usage over held-out data in ``mmoe evaluate``: counts against the model's own
routing statistics, every real (sub-)token routed once per choice, padding never, and the
activation ratio by its documented threshold."""

from __future__ import annotations

import json

import pytest
import torch

import multimodal_moe as mm
from eval_tasks.expert_usage import ExpertUsage, record_expert_usage
from eval_tasks.lm_eval import perplexity, read_documents
from multimodal_moe.cli import main
from multimodal_moe.training import build_task
from multimodal_moe.training.checkpoint import save_checkpoint


def test_the_activation_ratio_counts_experts_above_the_threshold_share():
    usage = ExpertUsage()
    usage.counts["layer1.shared"] = torch.tensor([100.0, 5.0, 0.0, 95.0])
    usage.thresholds["layer1.shared"] = 0.1  # idle below 0.1 x 1/4 = 0.025 of the assignments
    layer = usage.report()["layers"]["layer1.shared"]
    assert layer["load"] == [0.5, 0.025, 0.0, 0.475]
    assert (layer["experts_used"], layer["activation_ratio"], layer["assignments"]) == (2, 0.5, 200)


@pytest.mark.parametrize("preset, per_token", [("lm/xmoe_debug", 1), ("lm/openmoe_debug", 2), ("lm/mhmoe_debug", 4)])
def test_counts_are_the_models_routing_over_real_tokens_only(preset, per_token):
    cfg = mm.load_config(preset, ["model.moe_ffn.capacity_factor=null", "model.moe_ffn.eval_capacity_factor=dropless"]
                         if preset == "lm/openmoe_debug" else [])
    task = build_task(cfg).eval()
    documents = read_documents(["bundled:text/val"])[:5]
    with record_expert_usage(task.model) as usage:
        scored = perplexity(task.model, task.tokenizer, documents, seq_len=64, batch_size=3)
    report = usage.report()
    assert set(report["layers"]) == {"layer1.shared"}
    layer = report["layers"]["layer1.shared"]
    # every predicted token was an input routed to K experts (H sub-tokens for MH-MoE); padding never
    assert layer["assignments"] == scored["tokens"] * per_token
    assert layer["experts"] == 8 and sum(layer["load"]) == pytest.approx(1)

    # the same counts as the stats the model returns, summed by hand over the same batch
    ids = torch.randint(5, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record_expert_usage(task.model) as usage:
        out = task.model(ids)
    counts = out.moe_stats[1]["shared"]["tokens_per_expert"].double()
    torch.testing.assert_close(usage.counts["layer1.shared"], counts)


def test_mmoe_evaluate_reports_usage_and_plots_it_for_moe_checkpoints_only(tmp_path, capsys):
    for preset in ("lm/xmoe_debug", "lm/debug"):
        cfg = mm.load_config(preset)
        run = tmp_path / preset.replace("/", "-")
        save_checkpoint(run / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
        assert main(["evaluate", "--checkpoint", str(run), "--no-progress"]) == 0
        results = json.loads((run / "results.json").read_text())
        moe = preset == "lm/xmoe_debug"
        assert ("expert_usage" in results) == moe == (run / "plots" / "expert_usage.png").is_file()
        if moe:
            usage = results["expert_usage"]
            assert usage["layers"]["layer1.shared"]["threshold"] == cfg.model.moe_ffn.activation_threshold
            assert usage["activation_ratio"] == usage["layers"]["layer1.shared"]["activation_ratio"]
            assert (run / "plots" / "expert_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
