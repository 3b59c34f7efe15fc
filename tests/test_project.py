"""Project contracts: import direction, packaging, presets documented, the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import multimodal_moe as mm
from multimodal_moe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported by a source file (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_import_direction():
    def offenders(package: str, forbidden: tuple[str, ...], allowed_files: tuple[str, ...] = ()):
        found = []
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in allowed_files:
                continue
            bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
            if bad:
                found.append(f"{path.relative_to(ROOT)}: {bad}")
        return found

    assert offenders("multimodal_moe/layers", ("data_pipelines", "eval_tasks")) == []
    assert offenders("multimodal_moe/models", ("data_pipelines", "eval_tasks")) == []
    assert offenders("multimodal_moe", ("eval_tasks",), allowed_files=("cli.py",)) == []
    assert offenders("data_pipelines", ("eval_tasks", "multimodal_moe.models", "multimodal_moe.layers")) == []
    # the checker itself sees relative imports
    assert "multimodal_moe.layers.ffn" in imported_modules(ROOT / "multimodal_moe/layers/block.py")


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for top in ("multimodal_moe", "data_pipelines", "eval_tasks") for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk | {"multimodal_moe.configs"} == listed


@pytest.mark.parametrize("name", mm.list_presets())
def test_every_preset_documents_itself_and_its_launch_command(name):
    header = []
    for line in (ROOT / "configs" / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{name} needs a comment header saying what it is"
    command = "finetune" if name.startswith("finetune/") else "pretrain"
    assert any(line.startswith(f"# Launch: mmoe {command} --config configs/{name}.yaml") for line in header)


def test_cli_smoke_runs_the_default_preset(capsys):
    assert main(["smoke", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-2])
    assert lines[-1].startswith("ok: 483,200 parameters, 2 steps")
    assert report["ok"] and report["params_without_grad"] == [] and len(report["losses"]) == 2
    assert report["config"] == "configs/beit3/debug.yaml"


def test_cli_reports_config_errors(capsys):
    assert main(["smoke", "--config", "lm/debug", "--set", "model.dept=3"]) == 2
    err = capsys.readouterr().err
    assert "model.dept" in err and "did you mean 'depth'" in err
    assert main(["smoke", "--config", "nope"]) == 2
    assert "beit3/debug" in capsys.readouterr().err


def test_console_script_lists_presets():
    mmoe = Path(sys.executable).parent / "mmoe"
    out = subprocess.run([str(mmoe), "presets"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == mm.list_presets()


def fresh_python(code: str) -> str:
    """stdout of ``code`` in a new interpreter: what a user's first script sees, whatever this
    process has imported."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_importing_the_library_loads_no_data_stack():
    modules = ("webdataset", "sentencepiece", "data_pipelines", "eval_tasks")
    code = f"import sys, multimodal_moe; print([m for m in {modules} if m in sys.modules])"
    assert fresh_python(code).strip() == "[]"


def test_a_fresh_process_loads_every_task_kind_and_a_fine_tuned_checkpoint(tmp_path):
    from multimodal_moe.training import build_task
    from multimodal_moe.training.checkpoint import save_checkpoint

    cfg = mm.load_config("finetune/vqa_debug", ["task.answers=[one,two,three]"])
    save_checkpoint(tmp_path / "vqa" / "checkpoints", 1, task=build_task(cfg), state={}, cfg=cfg)
    out = fresh_python(
        "import multimodal_moe as mm\n"
        "print(*(mm.load_config(f'configs/{name}.yaml').task.kind for name in mm.list_presets()))\n"
        f"model = mm.load_checkpoint({str(tmp_path / 'vqa')!r})\n"
        "print(type(model).__name__, type(model.model).__name__, model.training)\n")
    kinds, model = out.splitlines()
    assert kinds.split() == [mm.load_config(name).task.kind for name in mm.list_presets()]
    assert {"lm", "mmm", "vqa", "retrieval"} <= set(kinds.split()) and model == "VQA MultiwayEncoder False"
