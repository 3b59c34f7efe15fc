"""The GPU acceptance run (``mmoe bench gpu``) on the CPU: its report, its refusals and its FLOP
accounting (never its timings)."""

from __future__ import annotations

import json
import time

import pytest
import torch

import multimodal_moe as mm
from data_pipelines.batches import ImageBatch, ImageTextBatch, LMBatch, TextBatch
from multimodal_moe.bench_gpu import distributed, process_group, run, synthetic_step
from multimodal_moe.bench_gpu.harness import QUICK
from multimodal_moe.cli import main
from multimodal_moe.flops import active_parameters, model_flops_per_step, peak_bf16_tflops
from multimodal_moe.training import Trainer

GROUPED_CASES = ("grouped_matmul_bf16", "grouped_matmul_bf16_unaligned", "grouped_experts_bf16",
                 "grouped_experts_fp32_autocast")


def test_cpu_quick_run_trains_presets_and_checks_grouped_matmul(tmp_path, capsys, monkeypatch):
    # one thread in the section processes: two spinning OpenMP threads on a busy 2-core machine run
    # a debug step 20x slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "gpu.json"
    code = main(["bench", "gpu", "--device", "cpu", "--quick", "--sections", "presets,grouped_mm",
                 "--presets", "beit3/xmoe_debug,lm/openmoe_debug", "--out", str(out)])
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert code == 0 and report["ok"]
    assert report["device"]["type"] == "cpu" and report["device"]["torch"] == torch.__version__
    assert {"name", "cuda", "bf16_supported", "xformers"} <= set(report["device"])
    assert "distributed" not in report and "throughput" not in report

    presets = report["presets"]
    assert presets["ok"] and list(presets["results"]) == ["beit3/xmoe_debug", "lm/openmoe_debug"]
    for entry in presets["results"].values():
        assert entry["ok"] and entry["finite"] and entry["checkpoint_loads"] and entry["bad_steps"] == 0
        assert entry["steps"] == 10 and entry["mean_last_3"] < entry["mean_first_3"]
        assert entry["first_loss_rel_diff"] <= presets["first_loss_rtol"]

    grouped = report["grouped_mm"]
    assert grouped["ok"] and 0 in grouped["rows_per_expert"]
    for case in GROUPED_CASES:
        assert grouped[case]["ok"] and grouped[case]["empty_experts_max_abs_weight_grad"] == 0.0
        assert {"forward", "grad_x_MK" if "matmul" in case else "grad_w1_EDF"} <= set(grouped[case]["errors"])
    assert grouped["speed"]["ok"] and grouped["speed"]["grouped_rows_per_s"] > 0


def test_without_cuda_it_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", "never.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and "--device cpu" in err and "\n" not in err


def test_unknown_sections_and_presets_are_named(capsys):
    assert main(["bench", "gpu", "--device", "cpu", "--sections", "presets,speed"]) == 2
    assert "['speed']" in capsys.readouterr().err
    assert main(["bench", "gpu", "--device", "cpu", "--presets", "beit3/base"]) == 2
    assert "beit3/debug" in capsys.readouterr().err


@pytest.mark.parametrize(("preset", "expert_params", "share"), [
    ("lm/debug", 0, 1.0),
    ("lm/xmoe_debug", 8 * 3 * 64 * 128, 1 / 8),  # top-1 of 8 SwiGLU experts 64 -> 128
    ("lm/openmoe_debug", 8 * 3 * 64 * 64, 2 / 8),  # top-2 of 8 SwiGLU experts 64 -> 64
    ("lm/mhmoe_debug", 8 * 3 * 16 * 128, 4 * 1 / 8),  # 4 sub-tokens of width 16, each top-1 of 8
    ("lm/mot_debug", 8 * 3 * 64 * 32, 1 / 2),  # every expert once per mixture of 2 tokens
    ("lm/deepseekmoe_debug", 63 * 3 * 64 * 16, 7 / 63),  # top-7 of 63 routed; the shared expert counts whole
])
def test_active_parameters_count_the_experts_a_token_uses(preset, expert_params, share):
    model = mm.build_model(mm.load_config(preset))  # tied embeddings: the output projection counts once
    total = sum(p.numel() for p in model.parameters())
    assert active_parameters(model) == total - expert_params * (1 - share)


def test_an_expert_choice_token_uses_capacity_factor_x_k_experts_on_average():
    from multimodal_moe.layers.moe import TopKMoEConfig

    moe = TopKMoEConfig(hidden_dim=32, num_experts=8, top_k=1, routing="expert_choice", capacity_factor=2.0,
                        balance_loss_weight=0.0).build(16)
    experts = sum(p.numel() for p in moe.experts.parameters())
    assert active_parameters(moe) == sum(p.numel() for p in moe.router.parameters()) + experts * 2 / 8


def test_a_token_takes_one_multiway_branch():
    model = mm.build_model(mm.load_config("beit3/debug"))
    vision, text = (active_parameters(block.ffn[name]) for block in model.layers[:1] for name in ("vision", "text"))
    assert vision == text == 2 * 64 * 128 + 128 + 64 + 2 * 128  # fc1, fc2 with biases, the Sub-LN
    assert active_parameters(model.layers[0].ffn) == vision


def test_model_flops_and_device_peaks():
    assert model_flops_per_step(10, depth=2, dim=4, sequences=[(3, 5)]) == {
        "tokens": 15, "parameter_flops": 6 * 10 * 15, "attention_flops": 12 * 2 * 4 * 3 * 5 * 5}
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert peak_bf16_tflops("NVIDIA H100 NVL") is None and peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_synthetic_steps_have_the_task_batch_types_and_train(tmp_path):
    cfg = mm.load_config("beit3/xmoe_debug", ["task.image.batch_size=4", "task.text.batch_size=4",
                                              "task.image_text.batch_size=4", "train.num_workers=0"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    step, sequences = synthetic_step(trainer.cfg, torch.device("cpu"))
    assert isinstance(step.image, ImageBatch) and isinstance(step.text, TextBatch)
    assert isinstance(step.image_text, ImageTextBatch)
    text_len = trainer.cfg.task.text.max_len
    assert step.image.images_B3HW.shape == (4, 3, 32, 32) and step.text.text_ids_BL.shape == (4, text_len)
    assert sequences == [(4, 17), (4, text_len), (4, 17 + trainer.cfg.task.image_text.max_len)]
    info = trainer.train_step([step])
    assert info.applied and torch.isfinite(torch.tensor(info.loss))

    lm = mm.load_config("lm/debug", ["task.text.batch_size=3", "task.text.max_len=16"])
    batch, sequences = synthetic_step(lm, torch.device("cpu"))
    assert isinstance(batch, LMBatch) and batch.ids_BT.shape == (3, 17) and sequences == [(3, 16)]


def test_a_section_running_past_the_budget_is_killed(monkeypatch):
    monkeypatch.setattr(run, "CHILD_GRACE_S", 1)
    start = time.time()
    entry = run._run_section_process("grouped_mm", ["--device", "cpu", "--quick"], deadline=start)
    assert not entry["ok"] and entry["error"].startswith("killed after 1 s")


def test_distributed_checks_a_process_group_of_one(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the section's mmoe pretrain launches take some 7 s each here; this test is about the process group
    monkeypatch.setattr(distributed, "_pretrain", lambda *args: {"ok": True, "seconds": 0.0, "losses": []})
    args = run._parser().parse_args(["--device", "cpu", "--quick"])
    section = distributed.section(args, torch.device("cpu"), QUICK, deadline=time.time() + 120)
    checked = section["process_group"]
    assert section["ok"] and checked["ok"] and checked["returncode"] == 0 and "process group of one" in \
        section["launches_note"]
    assert checked["backend"] == checked["expected_backend"] == "gloo" and checked["world"] == 1
    for collective in ("all_reduce", "all_gather_into_tensor", "all_to_all_single"):
        assert checked["collectives"][collective] == {"ok": True, "max_abs_error": 0.0, **(
            {"send_splits": [3], "recv_splits": [3]} if collective == "all_to_all_single" else {})}
    assert checked["tolerance"] == 1e-5 and checked["plain_max_abs_grad"] > 1e-3
    for wrapper in ("ddp", "fsdp", "expert_parallel"):
        entry = checked[wrapper]
        assert entry["ok"] and entry["loss"] == pytest.approx(checked["plain_loss"], abs=1e-5)
        assert entry["loss_abs_error"] <= 1e-5 and entry["max_grad_abs_error"] <= 1e-5
        assert entry["parameters"] == checked["ddp"]["parameters"] > 0
    assert checked["expert_parallel"]["sharded_parameters"] == [
        f"model.layers.1.ffn.experts.{name}" for name in ("w1_EDF", "w3_EDF", "w2_EFD")]

    monkeypatch.setattr(distributed, "_process_group", lambda *args: {"ok": False, "error": "no NCCL"})
    assert not distributed.section(args, torch.device("cpu"), QUICK, deadline=time.time() + 120)["ok"]


def test_the_process_group_check_wants_one_process(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        process_group.main(["--device", "cpu", "--out", str(tmp_path / "never.json")])
    assert "WORLD_SIZE is 2" in capsys.readouterr().err and not (tmp_path / "never.json").exists()


def test_profile_step_reports_where_a_step_goes_on_a_cpu(tmp_path):
    from multimodal_moe.bench_gpu.profile import main as profile_main

    out = tmp_path / "profile.json"
    assert profile_main(["--device", "cpu", "--presets", "lm/debug,nope", "--batches", "2", "--steps", "1", "--top",
                         "3", "--out", str(out)]) == 0
    ok, bad = json.loads(out.read_text())
    assert (ok["preset"], ok["batch"], ok["tokens_per_step"]) == ("lm/debug", 2, 2 * 64)
    assert ok["seconds_per_step"] > 0 and ok["tokens_per_s"] > 0
    assert ok["host_syncs_per_step"] is None and ok["top_device_ops"] == []  # CUDA counts, on a GPU only
    assert len(ok["top_cpu_ops"]) == 3 and all(op["calls"] >= 1 for op in ok["top_cpu_ops"])
    assert bad["preset"] == "nope" and "error" in bad  # one preset's failure does not lose the others


def test_the_profile_section_profiles_each_preset_at_two_batches(monkeypatch):
    import argparse

    from multimodal_moe.bench_gpu import profile

    monkeypatch.setattr(profile, "CPU_PROFILE_PRESETS", ("lm/debug",))
    args = argparse.Namespace(quick=True, encoder_batch=2, text_len=None, lm_batch=None, lm_seq=None)
    report = profile.section(args, torch.device("cpu"), QUICK, deadline=time.time() + 600)
    assert report["ok"] and list(report["results"]) == ["lm/debug x2", "lm/debug x4"]
    assert [r["batch"] for r in report["results"].values()] == [2, 4]
    assert all(r["ok"] and r["top_cpu_ops"] for r in report["results"].values())
