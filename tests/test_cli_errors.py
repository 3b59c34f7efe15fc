"""Bad input on the command line ends in one line that names the fault (exit 2 for a bad
config, 1 for a bad checkpoint), with the traceback only under ``--debug``."""

from __future__ import annotations

import pytest
import torch

from multimodal_moe.cli import main
from multimodal_moe.configurable import ConfigError

FAST = ["train.num_workers=0", "train.warmup_steps=0", "train.steps=2", "task.text.batch_size=8",
        "task.text.max_len=64"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def pretrain(capsys, tmp_path, *sets: str, config: str = "lm/debug") -> tuple[int, str]:
    return run(capsys, "pretrain", "--config", config, "--run-dir", str(tmp_path / "run"), "--no-progress",
               *[f"--set={s}" for s in (*FAST, *sets)])


@pytest.mark.parametrize("setting, message", [
    ("train.device=banana", "config error: train.device: 'banana' is not a device; use auto, cpu, cuda or cuda:N"),
    ("seed=-1", "config error: seed: must be in [0, 2**63), got -1"),
    ("train.steps=[1,", "config error: train.steps: --set value '[1,' is not valid YAML"),
    ("task.text.max_len=2", "config error: task.text.max_len: must be at least 3 (BOS, a token and EOS), got 2"),
])
def test_a_bad_setting_is_one_line_naming_its_key(capsys, tmp_path, setting, message):
    code, err = pretrain(capsys, tmp_path, setting)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="train.device"):
        main(["--debug", "pretrain", "--config", "lm/debug", "--run-dir", str(tmp_path), "--set",
              "train.device=banana"])


def test_cuda_without_a_gpu_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = pretrain(capsys, tmp_path, "train.device=cuda")
    assert code == 2 and "train.device=cuda, but torch sees no CUDA GPU here" in err and "use train.device=cpu" in err


def test_missing_shards_are_named_before_the_model_is_built(capsys, tmp_path, monkeypatch):
    """Before: the base preset built its 1.7 GB model (9.5 s) and then failed in the loader."""
    import multimodal_moe.training.trainer as trainer

    def no_build(cfg):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(trainer, "build_task", no_build)
    code, err = pretrain(capsys, tmp_path, f"task.text.shards=['{tmp_path}/nope-{{000..003}}.tar']",
                         f"task.tokenizer.path={tmp_path}/nope.model", config="beit3/base")
    assert code == 2 and "the task's data is not there" in err
    assert f"task.text.shards: shard(s) not found: {tmp_path}/nope-000.tar" in err
    assert f"task.tokenizer.path: {tmp_path}/nope.model not found" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_untrusted_pickle_in_a_checkpoint_is_refused_in_one_line(capsys, tmp_path):
    """A replaced ``state.pt`` (before: torch's UnpicklingError, suggesting weights_only=False)."""
    assert pretrain(capsys, tmp_path)[0] == 0
    latest = (tmp_path / "run" / "checkpoints" / "latest").resolve()
    torch.save({"step": 2, "payload": print}, latest / "state.pt")
    resume = ["pretrain", "--config", "lm/debug", "--run-dir", str(tmp_path / "run"), "--no-progress", "--resume",
              *[f"--set={s}" for s in (*FAST, "train.steps=4")]]
    code, err = run(capsys, *resume)  # the checksum catches the swap first
    assert code == 1 and "state.pt is corrupt" in err and "Traceback" not in err
    (latest / "checksums.json").unlink()  # as a checkpoint written before checksums existed
    code, err = run(capsys, *resume)
    assert code == 1, err
    assert "state.pt pickles Python objects other than tensors and plain values" in err
    assert "(it asks for print); it was not unpickled, since that could run code" in err
    assert "weights_only" not in err and "Traceback" not in err
