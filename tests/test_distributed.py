"""Distributed training on CPU with gloo, world size 2 (spawned processes): DDP, FSDP2 and
expert parallelism take the same steps as one process on the same global batch, and a
sharded checkpoint saved at world size 2 resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import multimodal_moe as mm
from data_pipelines.mixer import PretrainStep
from multimodal_moe.distributed.expert_parallel import ExpertParallelExperts
from multimodal_moe.training import Trainer

WORLD = 2
STEPS = 3
BASE = ["train.num_workers=0", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100",
        "task.text.batch_size=8", "task.text.max_len=32", "task.text.shuffle_buffer=20"]
RETRIEVAL = [*BASE[:4], "task.train.batch_size=8", "task.train.shuffle_buffer=20"]
MMM = [*BASE[:4], *[f"task.{s}.{k}" for s in ("image", "text", "image_text")
                    for k in ("batch_size=8", "shuffle_buffer=20")]]
# Routing statistics (balance loss, capacity) are per rank by design, as in GShard; without them
# a sharded MoE step is the same computation as one process's.
MOE_EXACT = ["model.moe_ffn.capacity_factor=null", "model.moe_ffn.balance_loss_weight=0.0",
             "model.moe_ffn.z_loss_weight=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears its group down while another still uses it
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(fn, *args, timeout: float = 240) -> None:
    """``fn(rank, *args)`` in WORLD spawned processes; fails (and kills them) after ``timeout`` s."""
    ctx = mp.start_processes(_worker, args=(free_port(), fn, args), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {timeout} s")


def global_batches(cfg: mm.Config) -> list:
    from multimodal_moe.training import build_task

    data = iter(build_task(cfg).train_data(seed=0, num_workers=0))
    return [next(data) for _ in range(STEPS)]


def rank_share(batch, rank: int):
    """This rank's rows of a global batch (a retrieval batch's captions renumbered; each stream
    of a pretraining step split)."""
    if isinstance(batch, PretrainStep):
        return dataclasses.replace(batch, **{name: rank_share(b, rank) for name, b in batch.batches().items()})
    rows = slice(rank * (len(batch) // WORLD), (rank + 1) * (len(batch) // WORLD))
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    share = {k: v[rows] if isinstance(v, (torch.Tensor, list)) and len(v) == len(batch) else v
             for k, v in fields.items()}
    if "caption_image_N" in share:
        share["caption_image_N"] = torch.arange(rows.stop - rows.start)
    return type(batch)(**share)


def steps_on_rank(rank: int, cfg: mm.Config, run_dir: Path, batches: list, out: Path) -> None:
    trainer = Trainer(cfg, run_dir, progress=False)
    losses = []
    for batch in batches:
        info = trainer.train_step([rank_share(batch, rank)])
        losses.append(trainer.env.mean([info.loss])[0])
    if cfg.train.expert_parallel > 1:
        assert any(isinstance(m, ExpertParallelExperts) for m in trainer.task.modules())
    trainer.save()
    if rank == 0:
        out.write_text(json.dumps(losses))


@pytest.mark.parametrize("preset, parallel", [
    ("lm/debug", ["train.data_parallel=ddp"]),
    ("lm/debug", ["train.data_parallel=fsdp"]),
    ("lm/mot_debug", ["train.data_parallel=fsdp"]),  # MoT: experts sharded as ordinary parameters
    ("lm/xmoe_debug", ["train.expert_parallel=2", *MOE_EXACT]),
    ("lm/mhmoe_debug", ["train.expert_parallel=2", *MOE_EXACT]),
    # experts with DenseFFN's biases and Sub-LN, each rank holding half of them
    ("lm/xmoe_debug", ["train.expert_parallel=2", *MOE_EXACT, "model.moe_ffn.bias=true", "model.moe_ffn.sub_ln=true"]),
    # the global-batch balance loss (its f over both ranks' tokens) is the balance loss of one process
    ("lm/openmoe_debug", ["train.data_parallel=ddp", "model.moe_ffn.capacity_factor=null",
                          "model.moe_ffn.z_loss_weight=0.0", "model.moe_ffn.balance_scope=global"]),
    # loss-free balancing: each bias moved by the load of the update on both ranks (one all-reduce)
    ("lm/lossfree_debug", ["train.data_parallel=fsdp"]),
    ("lm/lossfree_debug", ["train.expert_parallel=2"]),
    # the CLIP loss over features gathered with their gradient (its encoder has an X-MoE layer)
    ("finetune/retrieval_debug", ["train.data_parallel=ddp", *MOE_EXACT]),
    # both images of a pair through the encoder as 2B rows, then the pair head
    ("finetune/nlvr2_debug", ["train.data_parallel=ddp", *MOE_EXACT]),
    # Mixup / CutMix drawn once, in the collate of the global batch: both sides train on the same mix
    ("finetune/classification_debug", ["train.data_parallel=ddp", *MOE_EXACT, "task.mixup=0.8", "task.cutmix=1.0"]),
    # each rank's masked-token loss weighted by its share of the update's masked tokens
    ("finetune/captioning_debug", ["train.data_parallel=ddp", *MOE_EXACT]),
    # masked data modeling: each part the mean over the global batch's masked positions
    ("beit3/debug", ["train.data_parallel=ddp"]),
], ids=["ddp", "fsdp", "fsdp-mot", "expert-parallel-topk", "expert-parallel-mhmoe", "expert-parallel-biases-sub-ln",
        "global-balance-ddp", "lossfree-fsdp", "lossfree-expert-parallel", "retrieval-ddp", "nlvr2-ddp",
        "classification-ddp", "captioning-ddp", "mmm-ddp"])
def test_world_of_two_matches_one_process(tmp_path, preset, parallel):
    base = RETRIEVAL if preset.startswith("finetune/") else MMM if preset.startswith("beit3/") else BASE
    cfg = mm.load_config(preset, [*base, *parallel])
    single_cfg = mm.load_config(preset, [*base, *[p for p in parallel if not p.startswith("train.")]])
    batches = global_batches(single_cfg)

    single = Trainer(single_cfg, tmp_path / "single", progress=False)
    expected = [single.train_step([b]).loss for b in batches]
    single.save()

    run_ranks(steps_on_rank, cfg, tmp_path / "dist", batches, tmp_path / "losses.json")
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses == pytest.approx(expected, abs=1e-5)
    ours = load_file(tmp_path / "dist" / "checkpoints" / "latest" / "model.safetensors")
    theirs = load_file(tmp_path / "single" / "checkpoints" / "latest" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-5, rtol=1e-4, msg=k)
    if "lossfree" in preset:  # the biases moved, on both sides alike
        assert any(k.endswith("expert_bias") and ours[k].abs().sum() > 0 for k in ours)


def fit_on_rank(rank: int, cfg: mm.Config, run_dir: Path, resume: bool) -> None:
    Trainer(cfg, run_dir, resume=resume, progress=False).fit()


def test_sharded_checkpoint_at_world_two_resumes_exactly(tmp_path):
    cfg = mm.load_config("lm/xmoe_debug", [*BASE, "train.data_parallel=fsdp", "train.steps=6",
                                           "train.checkpoint_every=3", "train.log_every=1"])
    run = tmp_path / "run"
    run_ranks(fit_on_rank, cfg, run, False)
    ckpts = run / "checkpoints"
    assert (ckpts / "step_0000003" / "sharded").is_dir()
    final = load_file(ckpts / "step_0000006" / "model.safetensors")
    records = (run / "metrics.jsonl").read_text().splitlines()

    # as if the run had died after writing step 3's checkpoint
    shutil.rmtree(ckpts / "step_0000006")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_0000003")
    run_ranks(fit_on_rank, cfg, run, True)
    resumed = load_file(ckpts / "step_0000006" / "model.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)

    def losses(lines):
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")} for x in lines]

    assert losses((run / "metrics.jsonl").read_text().splitlines()) == losses(records)
    assert mm.load_checkpoint(run).cfg == cfg.model  # the consolidated weights load on one process


def test_torchrun_pretrain_with_expert_parallelism(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    run = tmp_path / "run"
    args = [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", "-m", "multimodal_moe.cli", "pretrain",
            "--config", "lm/xmoe_debug", "--run-dir", str(run), "--no-progress",
            *[f"--set={o}" for o in (*BASE, "train.steps=4", "train.expert_parallel=2")]]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 reports
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    state = torch.load(run / "checkpoints" / "latest" / "state.pt", weights_only=True)
    assert state["world"] == 2 and len(state["per_rank"]) == 2
    experts = load_file(run / "checkpoints" / "latest" / "model.safetensors")["layers.1.ffn.experts.w1_EDF"]
    assert experts.shape[0] == 8  # gathered whole from both ranks' halves


@pytest.mark.parametrize("target", ["torchrun", "process group"])
def test_torchrun_sigterm_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, target):
    """torchrun forwards SIGTERM to its workers; they agree on the step, checkpoint it, stop.
    Signalled as a whole process group (Slurm's preemption), the loader workers leave it to
    their rank. torchrun itself then exits 1 with its own SignalException: its behaviour."""
    from tests.test_training import wait_for_step

    torchrun = Path(sys.executable).parent / "torchrun"
    run = tmp_path / "run"
    workers = 2 if target == "process group" else 0
    args = [str(torchrun), "--standalone", f"--nproc_per_node={WORLD}", "-m", "multimodal_moe.cli", "pretrain",
            "--config", "lm/debug", "--run-dir", str(run), "--no-progress",
            *[f"--set={o}" for o in (*BASE, "train.steps=1000", "train.checkpoint_every=1000",
                                     f"train.num_workers={workers}")]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_step(run, 4, proc, timeout=180)
        if target == "torchrun":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    state = torch.load(run / "checkpoints" / "latest" / "state.pt", weights_only=True)
    assert 4 <= state["step"] < 1000 and state["world"] == 2 and len(state["per_rank"]) == 2
    assert err.count(f"stopped by SIGTERM after step {state['step']}") == 1, err[-3000:]  # rank 0 reports
    assert "exited unexpectedly" not in err and "DataLoader worker" not in err, err[-3000:]
    assert err.count("Traceback") == err.count("SignalException: Process"), err[-3000:]  # torchrun's own only


def evaluate_on_rank(rank: int, preset: str, out: Path) -> None:
    from multimodal_moe.distributed import init_distributed
    from multimodal_moe.training import build_task

    init_distributed("cpu")
    report = build_task(mm.load_config(preset, eval_overrides(preset))).evaluate(None)
    if rank == 0:
        out.write_text(json.dumps(report))


def eval_overrides(preset: str) -> list[str]:
    # with capacity limits a token's expert output depends on the batch it is in (and batches differ
    # per rank); dropless, the results depend only on how the ranks' shares are gathered. Captioning
    # decodes greedily and briefly: decoding the split once per rank and once alone is the test's cost
    short = ["task.num_beams=1", "task.train.max_len=8"] if preset == "finetune/captioning_debug" else []
    return ["model.moe_ffn.eval_capacity_factor=dropless", *short]


@pytest.mark.parametrize("preset", ["finetune/vqa_debug", "finetune/retrieval_debug", "finetune/nlvr2_debug",
                                    "finetune/classification_debug", "finetune/captioning_debug"])
def test_evaluation_at_world_two_gathers_every_rank_share(tmp_path, preset):
    from multimodal_moe.training import build_task

    single = build_task(mm.load_config(preset, eval_overrides(preset))).evaluate(None)
    run_ranks(evaluate_on_rank, preset, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    counts = [k for k in ("questions", "images", "captions", "statements") if k in single]
    assert [report[k] for k in counts] == [single[k] for k in counts]  # every sample once
    for key, value in single.items():
        if isinstance(value, float):  # per-rank batches differ, so an exact tie may break differently
            assert report[key] == pytest.approx(value, abs=0.5), key


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """`cuda:N` under torchrun would put every rank on GPU N; a bare `cuda` takes LOCAL_RANK."""
    from multimodal_moe.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="all 2 ranks on GPU 3.*train.device=cuda"):
        init_distributed("cuda:3")
