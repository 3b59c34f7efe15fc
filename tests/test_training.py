"""The training engine: losses fall, a run killed at a random step resumes exactly, checkpoints
are atomic and refuse what does not fit, non-finite steps are skipped and then stop the run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import multimodal_moe as mm
from multimodal_moe.tasks import MaskedDataModeling
from multimodal_moe.training import CheckpointError, TrainingDiverged, build_task, train
from multimodal_moe.training.checkpoint import Checkpoint, save_checkpoint

# Small, fast runs: 8 samples per stream, no loader workers.
FAST = ["train.num_workers=0", "train.warmup_steps=2", "train.log_every=2", "train.checkpoint_every=4"]
MMM_FAST = [*FAST, "task.image.batch_size=8", "task.text.batch_size=8", "task.image_text.batch_size=8",
            "task.text.shuffle_buffer=50", "task.image.shuffle_buffer=50", "task.image_text.shuffle_buffer=50"]
LM_FAST = [*FAST, "task.text.batch_size=8", "task.text.max_len=64", "task.text.shuffle_buffer=50"]
TIMING = {"samples_per_s", "tokens_per_s"}


def config(preset: str, *overrides: str) -> mm.Config:
    fast = LM_FAST if preset.startswith("lm/") else MMM_FAST
    return mm.load_config(preset, [*fast, *overrides])


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["beit3/debug", "lm/xmoe_debug"])
def test_loss_falls_on_the_bundled_data(tmp_path, preset):
    cfg = config(preset, "train.steps=40", "train.log_every=5", "train.checkpoint_every=40")
    records = train(cfg, tmp_path, progress=False).records
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.5, (first, last)
    parts = {"image_mim_loss", "text_mlm_loss", "image_text_mim_loss", "image_text_mlm_loss"} \
        if preset.startswith("beit3") else {"lm_loss"}
    for part in parts:
        assert records[-1][part] < records[0][part], part
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "bad_steps", "skipped_samples", "aux_loss"):
        assert key in records[-1]
    if preset == "lm/xmoe_debug":
        moe = records[-1]["moe"]
        assert set(moe) == {"layer1.shared"}
        assert len(moe["layer1.shared"]["load"]) == 8 and sum(moe["layer1.shared"]["load"]) == pytest.approx(1, 1e-3)
        assert 0 <= moe["layer1.shared"]["dropped_fraction"] <= 1


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the run did not reach step {step}")


@pytest.mark.parametrize("preset, recipe", [
    ("beit3/debug", []), ("lm/xmoe_debug", []),
    ("lm/lossfree_debug", []),  # the balancing biases are checkpointed with the weights
    # Adafactor's factored moments and a schedule with a constant phase come back as well
    ("lm/xmoe_debug", ["train.optimizer=adafactor", "train.schedule=inverse_sqrt", "train.warmup_steps=0",
                       "train.constant_steps=5", "train.lr=0.01"]),
])
def test_a_run_killed_at_a_random_step_resumes_exactly(tmp_path, preset, recipe):
    overrides = ["train.steps=24", *recipe]
    cfg = config(preset, *overrides)
    reference = train(cfg, tmp_path / "reference", progress=False)

    run_dir = tmp_path / "killed"
    kill_after = random.Random(preset + str(recipe)).randrange(6, 20)
    args = [sys.executable, "-m", "multimodal_moe.cli", "pretrain", "--config", preset, "--run-dir", str(run_dir),
            "--no-progress", *[f"--set={o}" for o in (*(LM_FAST if preset.startswith("lm/") else MMM_FAST),
                                                     *overrides)]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        wait_for_step(run_dir, kill_after, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = Checkpoint.open(run_dir / "checkpoints").training_state()["step"]
    assert 4 <= saved < 24

    resumed = train(cfg, run_dir, resume=True, progress=False)
    assert resumed.step == 24
    assert comparable(read_records(run_dir)) == comparable(read_records(tmp_path / "reference"))
    ours = load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "checkpoints" / "latest" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert reference.step == 24


def test_sigterm_checkpoints_the_step_it_arrives_in_and_the_run_resumes_exactly(tmp_path):
    """A preempted run (SIGTERM) finishes its step, checkpoints it though no checkpoint is due,
    exits with 143, and --resume ends where an uninterrupted run does, bitwise."""
    overrides = ["train.steps=24", "train.checkpoint_every=100"]  # no periodic checkpoint before the end
    cfg = config("lm/xmoe_debug", *overrides)
    train(cfg, tmp_path / "reference", progress=False)

    run_dir = tmp_path / "stopped"
    args = [sys.executable, "-m", "multimodal_moe.cli", "pretrain", "--config", "lm/xmoe_debug", "--run-dir",
            str(run_dir), "--no-progress", *[f"--set={o}" for o in (*LM_FAST, *overrides)]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        wait_for_step(run_dir, 8, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    saved = Checkpoint.open(run_dir / "checkpoints").training_state()["step"]
    assert 8 <= saved < 24
    assert f"stopped by SIGTERM after step {saved}" in err.decode() and "--resume" in err.decode()

    resumed = train(cfg, run_dir, resume=True, progress=False)
    assert resumed.step == 24
    assert comparable(read_records(run_dir)) == comparable(read_records(tmp_path / "reference"))
    ours = load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_checkpoints_are_kept_pruned_and_loadable(tmp_path):
    cfg = config("beit3/xmoe_debug", "train.steps=12", "train.keep_checkpoints=2")
    train(cfg, tmp_path, progress=False)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000008", "step_0000012"]
    assert os.readlink(ckpts / "latest") == "step_0000012"
    assert set(os.listdir(ckpts / "latest")) == {"model.safetensors", "heads.safetensors", "state.pt", "config.yaml",
                                                "checksums.json"}

    model = mm.load_checkpoint(tmp_path)
    assert not model.training and model.cfg == cfg.model
    saved = load_file(ckpts / "latest" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    state = torch.load(ckpts / "latest" / "state.pt", weights_only=True)
    assert state["step"] == 12 and {"optimizer", "per_rank"} <= set(state)
    assert state["world"] == 1 and {"rng", "data", "meter"} == set(state["per_rank"][0])


def test_a_crash_while_saving_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch):
    cfg = config("beit3/debug", "train.steps=4")
    task = build_task(cfg)
    save_checkpoint(tmp_path, 4, task=task, state={"x": 1}, cfg=cfg)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointError, match="step_0000008 .*failed: disk full"):
        save_checkpoint(tmp_path, 8, task=task, state={"x": 2}, cfg=cfg)
    monkeypatch.undo()
    assert not (tmp_path / "step_0000008").exists()
    assert Checkpoint.open(tmp_path).training_state() == {"x": 1, "step": 4}
    assert not (tmp_path / ".tmp-step_0000008").exists()  # the failed write cleaned up after itself
    (tmp_path / ".tmp-step_0000008").mkdir()  # as a process killed mid-write leaves it
    save_checkpoint(tmp_path, 8, task=task, state={"x": 2}, cfg=cfg)  # the leftover temp dir is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004", "step_0000008"]


def test_resume_refuses_a_different_model_naming_the_keys(tmp_path):
    train(config("beit3/debug", "train.steps=4"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"model\.depth \(checkpoint 3, requested 4\)"):
        train(config("beit3/debug", "train.steps=8", "model.depth=4"), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config("beit3/debug", "train.steps=8"), tmp_path, progress=False)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        mm.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        mm.load_checkpoint(tmp_path)
    train(config("beit3/debug", "train.steps=4"), tmp_path, progress=False)
    weights = tmp_path / "checkpoints" / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: 1000 bytes"):
        mm.load_checkpoint(tmp_path)
    (weights.parent / "checksums.json").unlink()  # as checkpoints written before checksums existed
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        mm.load_checkpoint(tmp_path)
    shutil.rmtree(weights.parent.resolve())  # latest now dangles
    with pytest.raises(CheckpointError, match=r"latest points at step_0000004, which does not exist; the checkpoints "
                                              r"there are none"):
        mm.load_checkpoint(tmp_path)


def test_sigterm_to_the_whole_process_group_checkpoints_like_sigterm_to_the_main_process(tmp_path):
    """Slurm's scancel and `kill -TERM -PGID` signal the loader workers too; they leave it to
    the main process, which checkpoints the step and exits 143 (before: the workers died and
    the step with them, exit 1, no checkpoint)."""
    overrides = ["train.steps=400", "train.checkpoint_every=1000", "train.num_workers=2"]
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "multimodal_moe.cli", "pretrain", "--config", "lm/xmoe_debug", "--run-dir",
            str(run_dir), "--no-progress", *[f"--set={o}" for o in (*LM_FAST, *overrides)]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_step(run_dir, 4, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    saved = Checkpoint.open(run_dir / "checkpoints").training_state()["step"]
    assert 4 <= saved < 400 and f"stopped by SIGTERM after step {saved}" in err.decode()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    """One process trains into a run dir at a time (a fresh run or a --resume); the lock dies
    with its holder, SIGKILL included."""
    from multimodal_moe.training import RunDirLocked, Trainer
    from multimodal_moe.training.run_lock import RunLock

    cfg = config("lm/debug", "train.steps=4")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from multimodal_moe.training.run_lock "
                               "import RunLock; lock = RunLock(sys.argv[1]); print('locked', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        for resume in (False, True):
            with pytest.raises(RunDirLocked, match=f"in use by pid {holder.pid} on "):
                Trainer(cfg, tmp_path, resume=resume, progress=False)
    finally:
        holder.kill()
        holder.wait()
    with Trainer(cfg, tmp_path, progress=False) as trainer:  # SIGKILL left no stale lock
        with pytest.raises(RunDirLocked):
            RunLock(tmp_path)
        trainer.fit()
    RunLock(tmp_path).release()  # released when the run closed
    with pytest.raises(FileExistsError) as failed:  # a fresh run into it, refused after taking the lock
        Trainer(cfg, tmp_path, progress=False)
    RunLock(tmp_path).release()  # released although the traceback (and the Trainer in it) lives on
    assert failed.value is not None


def test_a_filesystem_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """NFS without lockd, Lustre mounted noflock (before: a raw OSError, no training at all)."""
    import errno
    import fcntl

    from multimodal_moe.training.run_lock import RunLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        RunLock(tmp_path).release()
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    from multimodal_moe.cli import main

    sets = [f"--set={o}" for o in (*LM_FAST, "train.steps=4")]
    assert main(["pretrain", "--config", "lm/debug", "--run-dir", str(tmp_path), "--no-progress", *sets]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--config", "lm/debug", "--run-dir", str(tmp_path), "--no-progress", "--resume",
                 *sets]) == 0
    assert "has already finished its 4 steps; nothing to do" in capsys.readouterr().err
    sets = [f"--set={o}" for o in (*LM_FAST, "train.steps=6")]  # a grown train.steps trains on
    assert main(["pretrain", "--config", "lm/debug", "--run-dir", str(tmp_path), "--no-progress", "--resume",
                 *sets]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert Checkpoint.open(tmp_path / "checkpoints").training_state()["step"] == 6


def test_a_flipped_bit_in_a_checkpoint_is_caught_and_an_intact_one_resumed(tmp_path):
    """Every checkpoint file's CRC-32 is checked when it is read: a corrupt newest checkpoint
    names its file (before: it loaded, and the run diverged), and --resume=latest-intact
    continues from the newest intact one, as exactly as from any checkpoint."""
    cfg = config("lm/debug", "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=2")
    reference = train(cfg, tmp_path / "reference", progress=False)
    train(cfg, tmp_path / "run", progress=False)
    newest = tmp_path / "run" / "checkpoints" / "step_0000008" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0x10  # one bit of one weight
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt.*latest-intact"):
        mm.load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    resumed = train(cfg, tmp_path / "run", resume="latest-intact", progress=False)  # from step 4, to 8 again
    assert resumed.step == 8
    assert comparable(read_records(tmp_path / "run")) == comparable(read_records(tmp_path / "reference"))
    assert reference.step == 8 and mm.load_checkpoint(tmp_path / "run") is not None  # step 8 written anew
    # the corrupt one was set aside, so making room for step 8 could not delete step 4, the only intact one
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["corrupt-step_0000008", "latest", "step_0000004", "step_0000008"]


def test_a_full_disk_leaves_the_previous_checkpoints_and_says_where(tmp_path, monkeypatch):
    """A checkpoint write that fails (ENOSPC here) removes its temporary folder and says where,
    how much is free and how much a checkpoint takes; the previous ones stay (before: a bare
    "enforce fail at inline_container.cc", and the folder left behind)."""
    import errno

    from multimodal_moe.training import checkpoint as checkpoint_module

    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step_0000004 into .*failed: No space left on device \(\d+ bytes "
                                              r"free on that disk; a checkpoint takes about \d+ bytes\)"):
        train(config("lm/debug", "train.steps=8", "train.checkpoint_every=2"), tmp_path, progress=False)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]  # no .tmp-step_0000004
    assert Checkpoint.open(ckpts).training_state()["step"] == 2


def test_room_is_made_before_a_checkpoint_is_written(tmp_path, monkeypatch):
    """With keep_checkpoints=K a run never holds more than K checkpoints, the one being written included."""
    from multimodal_moe.training import checkpoint as checkpoint_module

    real_save, seen = checkpoint_module.save_weights, []

    def counting(state, path, step):
        seen.append(len(list(path.parent.parent.glob("step_*"))))
        return real_save(state, path, step)

    monkeypatch.setattr(checkpoint_module, "save_weights", counting)
    train(config("lm/debug", "train.steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=2"), tmp_path,
          progress=False)
    assert max(seen) == 1 and len(list((tmp_path / "checkpoints").glob("step_*"))) == 2


def test_a_garbled_metrics_line_stops_the_resume_with_its_number(tmp_path):
    """A torn last line (a crash mid-write) is dropped on resume; a bad line anywhere else stops
    it, naming the line (before: every later line was dropped without a word)."""
    cfg = config("lm/debug", "train.steps=8", "train.checkpoint_every=4")
    train(cfg, tmp_path, progress=False)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["{garbled"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        train(cfg, tmp_path, resume=True, progress=False)
    metrics.write_text("\n".join(lines) + '\n{"step": 9, "lo')
    train(config("lm/debug", "train.steps=12", "train.checkpoint_every=4"), tmp_path, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4, 6, 8, 10, 12]


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    forward = MaskedDataModeling.forward
    calls = {"n": 0}
    poisoned = {3, 4} | set(range(7, 100))  # steps 3-4 recover; from step 7 on nothing is finite

    def poison(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] in poisoned:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskedDataModeling, "forward", poison)
    cfg = config("beit3/debug", "train.steps=20", "train.max_bad_steps=3", "train.checkpoint_every=2")
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(cfg, tmp_path, progress=False)
    records = read_records(tmp_path)
    assert records[-1]["bad_steps"] >= 2
    by_step = {r["step"]: r for r in records}
    assert by_step[4]["loss"] is None and by_step[4]["grad_norm"] is None  # steps 3-4 both skipped: no mean
    assert by_step[6]["loss"] > 0
    # no checkpoint inside a bad streak (step 8 is in the one from step 7): the newest is from before it
    assert Checkpoint.open(tmp_path / "checkpoints").training_state()["step"] == 6
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "checkpoints/latest/model.safetensors").values())

    monkeypatch.setattr(MaskedDataModeling, "forward", forward)  # the cause fixed (a lower lr, say)
    assert train(cfg, tmp_path, resume=True, progress=False).step == 20  # the streak did not come back with it


def test_sigterm_inside_a_bad_streak_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Before: the SIGTERM checkpoint was written whatever the step, bad streak included."""
    from multimodal_moe.training import TrainingStopped

    forward, calls = MaskedDataModeling.forward, {"n": 0}

    def poison(self, batch):
        out = forward(self, batch)
        calls["n"] += 1
        if calls["n"] >= 5:
            out.loss = out.loss * float("nan")
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # preempted in the streak of steps 5 on
        return out

    monkeypatch.setattr(MaskedDataModeling, "forward", poison)
    cfg = config("beit3/debug", "train.steps=20", "train.max_bad_steps=5", "train.checkpoint_every=4")
    with pytest.raises(TrainingStopped, match="after step 6; checkpoint .*step_0000004") as stopped:
        train(cfg, tmp_path, progress=False)
    assert stopped.value.checkpoint.name == "step_0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000004"]


def test_layer_decay_scales_the_learning_rate_per_block():
    from timm.optim import create_optimizer_v2

    cfg = config("beit3/debug")
    task = build_task(cfg)
    optimizer = create_optimizer_v2(task, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(task.named_parameters())
    depth = cfg.model.depth
    assert scale[id(params["model.text_embed.tokens.weight"])] == 0.5 ** (depth + 1)
    assert scale[id(params["model.layers.0.attn.q_proj.vision.weight"])] == 0.5 ** depth
    assert scale[id(params[f"model.layers.{depth - 1}.attn.q_proj.vision.weight"])] == 0.5
    assert scale[id(params["mim_head.weight"])] == 1.0
    for name in ("model.vision_embed.pos_embed", "model.vision_embed.cls_token", "model.vision_embed.mask_token",
                 "mim_head.bias"):
        assert decay[id(params[name])] == 0.0, name
    assert decay[id(params["mim_head.weight"])] == 0.05


def test_cli_pretrain_and_inspect(tmp_path, capsys):
    from multimodal_moe.cli import main

    run_dir = tmp_path / "run"
    assert main(["pretrain", "--config", "lm/debug", "--run-dir", str(run_dir), "--no-progress",
                 *[f"--set={o}" for o in (*LM_FAST, "train.steps=6")]]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "lm_loss" in out and "skipped samples: none" in out
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert main(["pretrain", "--config", "lm/debug", "--resume"]) == 2
    assert "--run-dir" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [p for p in mm.list_presets() if "debug" in p and not p.startswith("finetune/")])
def test_every_debug_preset_trains_its_default_task_with_gradients_everywhere(preset):
    cfg = config(preset)
    task = build_task(cfg)
    batch = next(iter(task.train_data(seed=0, num_workers=0)))
    out = task(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert [n for n, p in task.named_parameters() if p.grad is None] == []
    assert out.samples > 0 and out.tokens > out.samples


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    from data_pipelines.batches import LMBatch

    cfg = config("lm/debug")
    big = next(iter(build_task(cfg).train_data(seed=0, num_workers=0)))
    halves = [LMBatch(keys=[], ids_BT=big.ids_BT[:4]), LMBatch(keys=[], ids_BT=big.ids_BT[4:])]
    from multimodal_moe.training import Trainer

    one = Trainer(cfg, tmp_path / "one", progress=False)
    two = Trainer(mm.load_config("lm/debug", [*LM_FAST, "train.grad_accum=2"]), tmp_path / "two", progress=False)
    for _ in range(3):
        a, b = one.train_step([big]), two.train_step(halves)
        assert a.loss == pytest.approx(b.loss, abs=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (name, p), q in zip(one.task.named_parameters(), two.task.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def _rows(batch, rows: slice):
    """Rows of a batch (every field indexed by sample); of each stream of a pretraining step."""
    import dataclasses

    from data_pipelines.mixer import PretrainStep

    if isinstance(batch, PretrainStep):
        return dataclasses.replace(batch, **{name: _rows(b, rows) for name, b in batch.batches().items()})
    return type(batch)(**{f.name: v[rows] if isinstance(v := getattr(batch, f.name), (torch.Tensor, list))
                          and len(v) == len(batch) else v for f in dataclasses.fields(batch)})


def test_masked_data_modeling_accumulation_equals_one_big_batch(tmp_path):
    """Halves mask different numbers of positions; each part is still the mean over the update's."""
    from multimodal_moe.tasks.mmm import _read_masks
    from multimodal_moe.training import Trainer

    overrides = [f"task.{s}.batch_size=8" for s in ("image", "text", "image_text")]
    cfg = config("beit3/debug", *overrides)
    steps = iter(build_task(cfg).train_data(seed=0, num_workers=0))
    one = Trainer(cfg, tmp_path / "one", progress=False)
    two = Trainer(config("beit3/debug", *overrides, "train.grad_accum=2"), tmp_path / "two", progress=False)
    for _ in range(3):
        big = next(steps)
        halves = [_rows(big, slice(0, 3)), _rows(big, slice(3, 8))]
        # uneven: a mean of the halves' means would differ
        first, second = ([len(m) for m in _read_masks(h)[0].values()] for h in halves)
        assert any(a * 5 != b * 3 for a, b in zip(first, second))
        a, b = one.train_step([big]), two.train_step(halves)
        assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (name, p), q in zip(one.task.named_parameters(), two.task.parameters()):
        torch.testing.assert_close(p, q, atol=5e-6, rtol=1e-5, msg=name)  # fp32 sums in another order


def test_a_pretraining_step_moves_every_stream(tmp_path):
    step = next(iter(build_task(config("beit3/debug")).train_data(seed=0, num_workers=0)))
    moved = step.to("meta")
    assert moved.step == step.step and set(moved.batches()) == {"image", "text", "image_text"}
    tensors = [v for b in moved.batches().values() for v in vars(b).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 7 and all(t.device.type == "meta" for t in tensors)


def test_ema_is_checkpointed_and_resumed(tmp_path):
    cfg = config("lm/debug", "train.steps=8", "train.ema_decay=0.9")
    train(cfg, tmp_path / "full", progress=False)
    ema = load_file(tmp_path / "full" / "checkpoints" / "latest" / "ema.safetensors")
    model = load_file(tmp_path / "full" / "checkpoints" / "latest" / "model.safetensors")
    assert ema.keys() >= model.keys() - {"lm_head.weight"}
    assert not torch.equal(ema["tok_embed.weight"], model["tok_embed.weight"])  # an average, not a copy

    ckpts = tmp_path / "full" / "checkpoints"  # as if the run had died right after step 4's checkpoint
    shutil.rmtree(ckpts / "step_0000008")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_0000004")
    train(cfg, tmp_path / "full", resume=True, progress=False)
    resumed = load_file(ckpts / "latest" / "ema.safetensors")
    assert all(torch.equal(resumed[k], ema[k]) for k in ema)


def test_bf16_autocast_trains(tmp_path):
    records = train(config("beit3/xmoe_debug", "train.steps=4", "train.precision=bf16"), tmp_path,
                    progress=False).records
    assert all(isinstance(r["loss"], float) for r in records) and records[-1]["bad_steps"] == 0


def test_bad_samples_are_skipped_and_reported_in_the_metrics(tmp_path):
    import itertools

    import webdataset as wds

    from data_pipelines.shards import shard_urls
    from data_pipelines.skips import SkipCounter
    from data_pipelines.tars import tar_samples
    from multimodal_moe.tasks import data_path

    good = tar_samples(shard_urls(str(data_path("bundled:image_text/train"))), SkipCounter())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    with wds.TarWriter(str(mixed / "shard-000000.tar"), encoder=False) as tar:
        for i, sample in enumerate(itertools.islice(good, 60)):
            tar.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
            if i % 6 == 0:
                tar.write({"__key__": f"broken{i}", "png": b"\x89PNG not really", "txt": b"a caption"})
                tar.write({"__key__": f"latin{i}", "png": sample.get("png", b""), "txt": "caf\xe9".encode("latin-1")})
    cfg = config("beit3/debug", "train.steps=6", "train.log_every=3", f"task.image_text.shards=[{mixed}]")
    records = train(cfg, tmp_path / "run", progress=False).records
    skipped = records[-1]["skipped_samples"]["image_text"]
    assert skipped.get("bad_utf8", 0) > 0 and skipped.get("corrupt_image", 0) > 0
    assert all(r["bad_steps"] == 0 for r in records)


@pytest.mark.parametrize("preset, overrides, tolerance", [
    ("lm/debug", [], dict(abs=1e-4)),
    ("lm/openmoe_debug", ["train.precision=fp32"], dict(abs=1e-4)),  # capacity-limited: the padded expert layout
    # dropless in bf16: the traced _grouped_mm; fused kernels round bf16 differently
    ("lm/openmoe_debug", ["train.precision=bf16", "model.moe_ffn.capacity_factor=null"], dict(rel=1e-3)),
])
def test_compiled_backbone_trains_like_the_eager_one(tmp_path, preset, overrides, tolerance):
    eager = train(config(preset, "train.steps=3", *overrides), tmp_path / "eager", progress=False).records
    compiled = train(config(preset, "train.steps=3", "train.compile=true", *overrides), tmp_path / "compiled",
                     progress=False).records
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], **tolerance)
    assert set(load_file(tmp_path / "compiled/checkpoints/latest/model.safetensors")) == \
        set(load_file(tmp_path / "eager/checkpoints/latest/model.safetensors"))


def test_loss_free_balancing_moves_each_bias_by_its_whole_update_load(tmp_path):
    """lm/lossfree_debug: after each optimizer step every layer's bias moves by
    gamma * sign(mean - load), the load summed over both micro-batches of the update, as with one
    big batch; a non-finite step moves nothing."""
    from data_pipelines.batches import LMBatch
    from multimodal_moe.layers.moe import TopKMoE
    from multimodal_moe.training import Trainer

    cfg = config("lm/lossfree_debug")
    big = next(iter(build_task(cfg).train_data(seed=0, num_workers=0)))
    halves = [LMBatch(keys=[], ids_BT=big.ids_BT[:4]), LMBatch(keys=[], ids_BT=big.ids_BT[4:])]
    one = Trainer(cfg, tmp_path / "one", progress=False)
    two = Trainer(mm.load_config("lm/lossfree_debug", [*LM_FAST, "train.grad_accum=2"]), tmp_path / "two",
                  progress=False)
    layers = [m for m in two.task.modules() if isinstance(m, TopKMoE)]
    assert layers and all(m.expert_bias is not None for m in layers)
    seen = []
    step = two.optimizer.step
    two.optimizer.step = lambda: (seen.append([m.load_E.clone() for m in layers]), step())[1]
    for _ in range(3):
        before = [m.expert_bias.clone() for m in layers]
        one.train_step([big]), two.train_step(halves)
        for m, b, load in zip(layers, before, seen[-1]):
            assert load.sum() == big.ids_BT[:, 1:].numel() * 2  # every input token of both halves, top-2
            torch.testing.assert_close(m.expert_bias, b + 1e-3 * torch.sign(load.mean() - load))
    assert any(m.expert_bias.abs().sum() > 0 for m in layers)
    for name, b in one.task.named_buffers():
        if name.endswith("expert_bias"):
            torch.testing.assert_close(b, two.task.get_buffer(name), msg=name)
    before = [m.expert_bias.clone() for m in layers]
    nan = LMBatch(keys=[], ids_BT=big.ids_BT[:4])
    with torch.no_grad():
        two.task.model.tok_embed.weight.fill_(float("nan"))  # every loss NaN: the step is skipped
    assert not two.train_step([nan, nan]).applied
    assert all(torch.equal(m.expert_bias, b) and m.load_E.sum() == 0 for m, b in zip(layers, before))
