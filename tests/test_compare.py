"""``mmoe compare``: the table's values are those of the runs' logs, the plots are PNGs, bad
input is one line naming it (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import multimodal_moe as mm
from multimodal_moe.cli import main
from multimodal_moe.compare import compare_runs, format_table
from multimodal_moe.training import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, preset: str, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(mm.dump_config(mm.load_config(preset)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def moe(activation_ratio: float, dropped_fraction: float, max_load: float) -> dict:
    return {"load": [0.5, 0.5], "max_load": max_load, "dropped_fraction": dropped_fraction,
            "activation_ratio": activation_ratio, "router_entropy": 0.6}


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    # a dense LM whose step-40 interval was skipped (null loss); the final loss averages 5, 4, 2
    dense = write_run(tmp_path / "dense", "lm/debug", [
        {"step": s, "loss": loss, "lr": 1e-3} for s, loss in ((10, 6.0), (20, 5.0), (30, 4.0), (40, None), (50, 2.0))])
    # a multiway encoder with X-MoE in both branches of layer 2, scored by mmoe evaluate --out eval
    sparse = write_run(tmp_path / "sparse", "beit3/xmoe_debug", [
        {"step": 10, "loss": 9.0, "moe": {"layer2.vision": moe(0.5, 0.3, 3.0), "layer2.text": moe(0.5, 0.1, 2.0)}},
        {"step": 20, "loss": 8.0, "moe": {"layer2.vision": moe(1.0, 0.02, 1.2), "layer2.text": moe(0.5, 0.04, 1.6)}},
    ])
    (sparse / "eval").mkdir()
    (sparse / "eval" / "results.json").write_text(json.dumps(
        {"task": "lm", "checkpoint": str(sparse / "checkpoints" / "step_0000020"), "perplexity": math.e ** 2,
         "expert_usage": {"activation_ratio": 0.625, "layers": {}}}))
    return dense, sparse


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000, path


def test_the_table_holds_the_runs_values_and_the_plots_are_written(runs, tmp_path):
    dense, sparse = runs
    summary = compare_runs([dense, sparse], tmp_path / "out")
    rows = {row["label"]: row for row in summary["runs"]}
    assert rows["dense"] == {
        "label": "dense", "run_dir": str(dense), "model": "decoder_lm 2x64", "ffn": "dense", "experts": None,
        "top_k": None, "steps": 50, "train_loss": pytest.approx(11 / 3), "heldout_loss": None, "perplexity": None,
        "heldout_step": None, "results": None, "activation_ratio": None, "dropped_fraction": None, "max_load": None,
        "heldout_activation": None}
    assert rows["sparse"] == {
        "label": "sparse", "run_dir": str(sparse), "model": "multiway_encoder 3x64", "ffn": "topk_moe/xmoe",
        "experts": 8, "top_k": 1, "steps": 20, "train_loss": pytest.approx(8.5), "heldout_loss": pytest.approx(2.0),
        "perplexity": pytest.approx(math.e ** 2), "heldout_step": 20, "results": str(sparse / "eval" / "results.json"),
        "activation_ratio": pytest.approx(0.75), "dropped_fraction": pytest.approx(0.03),
        "max_load": pytest.approx(1.4), "heldout_activation": 0.625}
    assert json.loads((tmp_path / "out" / "compare.json").read_text()) == summary
    names = ["loss.png", "activation_ratio.png", "dropped_fraction.png", "load_balance.png"]
    assert summary["plots"] == [str(tmp_path / "out" / name) for name in names]
    for name in names:
        assert_png(tmp_path / "out" / name)


def test_dense_runs_get_the_loss_plot_only(runs, tmp_path):
    summary = compare_runs([runs[0]], tmp_path / "out")
    assert summary["plots"] == [str(tmp_path / "out" / "loss.png")]
    assert format_table(summary).splitlines()[2].split()[-5:] == ["-"] * 5


def test_cli_prints_the_table_under_the_given_labels(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out), "--labels", "baseline,xmoe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "model", "ffn", "E", "K", "steps", "train", "loss", "held-out", "loss",
                                "perplexity", "active", "dropped", "max", "load", "held-out", "active"]
    assert lines[2].split() == ["baseline", "decoder_lm", "2x64", "dense", "-", "-", "50", "3.667", "-", "-", "-",
                                "-", "-", "-"]
    assert lines[3].split() == ["xmoe", "multiway_encoder", "3x64", "topk_moe/xmoe", "8", "1", "20", "8.5", "2",
                                "7.389", "0.75", "0.03", "1.4", "0.625"]
    assert str(out / "compare.json") in lines[-1]
    assert [row["label"] for row in json.loads((out / "compare.json").read_text())["runs"]] == ["baseline", "xmoe"]


def test_a_masked_data_modeling_run_is_compared_by_its_evaluated_loss(runs, tmp_path):
    sparse = runs[1]
    (sparse / "eval" / "results.json").write_text(json.dumps(
        {"task": "mmm", "checkpoint": str(sparse / "checkpoints" / "step_0000010"), "loss": 27.5,
         "text_mlm_loss": 7.5}))
    row = compare_runs([sparse], tmp_path / "out")["runs"][0]
    assert (row["heldout_loss"], row["perplexity"], row["heldout_step"], row["heldout_activation"]) == (
        27.5, None, 10, None)


def test_folders_of_the_same_name_are_labelled_by_their_paths(runs, tmp_path):
    twin = write_run(tmp_path / "other" / "dense", "lm/debug", [{"step": 1, "loss": 1.0}])
    summary = compare_runs([runs[0], twin], tmp_path / "out")
    assert [row["label"] for row in summary["runs"]] == [str(runs[0]), str(twin)]


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "{tmp}/nowhere/metrics.jsonl does not exist"),
    (["{dense}", "{sparse}", "--labels", "a"], "1 labels ['a'] for 2 run directories; give one label per run"),
    (["{dense}", "{sparse}", "--labels", "a,a"], "labels must differ, ['a'] is given more than once"),
    (["{dense}", "{dense}"], "a run directory is given twice"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, args, message):
    names = {"tmp": tmp_path, "dense": runs[0], "sparse": runs[1]}
    code = main(["compare", *(a.format(**names) for a in args), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"mmoe: error: {message.format(**names)}" in err
    assert len(err.strip().splitlines()) == 1, err


def test_two_real_runs(tmp_path):
    fast = ["train.steps=4", "train.log_every=2", "train.warmup_steps=1", "train.num_workers=0",
            "task.text.batch_size=4", "task.text.max_len=32", "task.text.shuffle_buffer=20"]
    for preset in ("lm/debug", "lm/xmoe_debug"):
        train(mm.load_config(preset, fast), tmp_path / preset.replace("/", "_"), progress=False)
    summary = compare_runs([tmp_path / "lm_debug", tmp_path / "lm_xmoe_debug"], tmp_path / "out")
    dense, sparse = summary["runs"]
    assert dense["steps"] == sparse["steps"] == 4 and dense["max_load"] is None
    assert (sparse["ffn"], sparse["experts"], sparse["top_k"]) == ("topk_moe/xmoe", 8, 1)
    assert sparse["max_load"] >= 1.0 and 0.0 <= sparse["dropped_fraction"] < 1.0
    assert math.isfinite(dense["train_loss"]) and math.isfinite(sparse["train_loss"])
    for path in summary["plots"]:
        assert_png(Path(path))


def test_the_ffn_column_names_a_sigmoid_score_and_expert_choice():
    from multimodal_moe.compare import _ffn_name

    assert _ffn_name({"kind": "topk_moe", "router": "xmoe", "score": "softmax", "routing": "token_choice"}) == \
        "topk_moe/xmoe"
    assert _ffn_name({"kind": "topk_moe", "router": "softmax", "score": "sigmoid"}) == "topk_moe/softmax/sigmoid"
    assert _ffn_name({"kind": "topk_moe", "router": "softmax", "routing": "expert_choice"}) == \
        "topk_moe/softmax/expert_choice"
    assert _ffn_name({"kind": "mot"}) == "mot"
