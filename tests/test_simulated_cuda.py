"""The simulated-CUDA tier: one training step of every task and FFN kind on ``cuda``, in fp32
and under bf16 autocast, with CUDA's device, dtype, grouped-GEMM and host-sync rules enforced
(:mod:`tests.simulated_cuda`); plus one evaluation pass of each task."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import eval_tasks.retrieval
import multimodal_moe as mm
import multimodal_moe.tasks.mmm
from multimodal_moe.layers.moe import Router
from multimodal_moe.layers.mot import MixtureOfTokens
from multimodal_moe.tasks.visual_targets import VisualTargets
from multimodal_moe.tasks.vqkd import VQKDTokenizer
from multimodal_moe.training.trainer import Trainer

from .simulated_cuda import SimTensor, SimulatedCuda

# a training step outside a logging step reads the device once: the update's finite flag,
# loss and gradient norm together (2 are allowed; 1 is what the trainer makes)
SYNC_BUDGET = 1


def _moe(ffn: str, *extra: str) -> list[str]:
    return ["model.moe_every=3", f"model.moe_ffn={{{ffn}}}", *extra]


# (an override merges into the preset's moe_ffn, so each spells out what it differs in)
_TOPK = "kind: topk_moe, hidden_dim: 64, num_experts: 4, top_k: 2, router: softmax, renormalize: false"
_XMOE = "kind: topk_moe, hidden_dim: 64, num_experts: 4, top_k: 1, router: xmoe, renormalize: false"
_MH_MOE = "kind: mh_moe, heads: 4, hidden_dim: 64, num_experts: 4, top_k: 1, router: xmoe, renormalize: false"
_PAPER = ("model.layout=paper", "model.vl_ffn_layers=1")
# model overrides for any debug-size encoder preset: every FFN kind, in its debug preset's shape
ENCODER_FFNS = {
    "dense": ["model.moe_every=0", "model.moe_ffn=null"],
    "topk_softmax_dropless": _moe(f"{_TOPK}, capacity_factor: null"),
    "xmoe_capacity": _moe(f"{_XMOE}, capacity_factor: 1.0"),  # the default preset's own
    "xmoe_dropless": _moe(f"{_XMOE}, capacity_factor: null"),
    "shared_expert": _moe(f"{_TOPK}, capacity_factor: null, shared_expert_dim: 32"),
    "expert_choice": _moe(f"{_TOPK}, capacity_factor: 1.0, routing: expert_choice, balance_loss_weight: 0.0"),
    "mh_moe_capacity": _moe(f"{_MH_MOE}, capacity_factor: 1.0", *_PAPER),
    "mh_moe_dropless": _moe(f"{_MH_MOE}, capacity_factor: null", *_PAPER),
    "mot": _moe("kind: mot, hidden_dim: 64, num_experts: 4, group_size: 2", "model.moe_branches=[vision]"),
}
ENCODER_TASKS = {
    "mmm_kmeans": ("pretrain/debug", []),
    "mmm_vqkd": ("pretrain/debug", ["task.visual_targets={kind: vqkd, path: VQKD}"]),
    "mmm_pixels": ("pretrain/debug", ["task.visual_targets={kind: pixels}"]),
    "vqa": ("finetune/vqa_debug", []),
    "retrieval": ("finetune/retrieval_debug", []),
    "nlvr2": ("finetune/nlvr2_debug", []),
    "captioning": ("finetune/captioning_debug", []),
    "classification": ("finetune/classification_debug", []),
}
LM_FFNS = {
    "dense": ("lm/debug", []),
    "xmoe_capacity": ("lm/xmoe_debug", []),
    "topk_swiglu_capacity": ("lm/openmoe_debug", []),
    "topk_softmax_dropless": ("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null"]),
    "shared_expert": ("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null", "model.moe_ffn.shared_expert_dim=32"]),
    "mh_moe_capacity": ("lm/mhmoe_debug", []),
    "mh_moe_dropless": ("lm/mhmoe_debug", ["model.moe_ffn.capacity_factor=null"]),
    "mot": ("lm/mot_debug", []),
    "loss_free": ("lm/lossfree_debug", []),  # sigmoid gates, the bias update after the optimizer step
    "expert_biases_sub_ln": ("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null", "model.moe_ffn.bias=true",
                                                  "model.moe_ffn.sub_ln=true"]),  # each row's expert, on the device
}
DROPLESS_MOE = {"topk_softmax_dropless", "xmoe_dropless", "shared_expert", "mh_moe_dropless", "loss_free",
                "expert_biases_sub_ln"}
MOE_OVERRIDES = ["model.moe_ffn.router=softmax", "model.moe_ffn.capacity_factor=null"]  # evaluation cases
PRECISIONS = ["fp32", "bf16"]
# small batches and shuffle buffers: the simulation runs every op in Python
SMALL = {"lm": ["task.text.batch_size=4", "task.text.max_len=32", "task.text.shuffle_buffer=20"],
         "finetune": ["task.train.batch_size=8", "task.train.shuffle_buffer=20"],
         "mmm": [f"task.{stream}.{setting}" for stream in ("image", "text", "image_text")
                 for setting in ("batch_size=8", "shuffle_buffer=20")]}


def small(preset: str) -> list[str]:
    return SMALL["lm" if preset.startswith("lm/") else "finetune" if preset.startswith("finetune/") else "mmm"]


@contextlib.contextmanager
def simulated(monkeypatch):
    """A SimulatedCuda with the code that must stay in fp32 under autocast marked as such."""
    with SimulatedCuda() as sim:
        def fp32(owner, name, what):
            original = getattr(owner, name)

            def run(*args, **kwargs):
                with sim.fp32_region(what):
                    return original(*args, **kwargs)
            monkeypatch.setattr(owner, name, run)

        fp32(Router, "forward", "router logits")
        fp32(MixtureOfTokens, "mixing_weights", "MoT mixing weights")
        fp32(VisualTargets, "__call__", "visual targets")
        fp32(eval_tasks.retrieval, "clip_loss", "CLIP loss")
        fp32(multimodal_moe.tasks.mmm, "_cross_entropy", "masked-modeling cross-entropy")
        for loss in ("cross_entropy", "mse_loss", "binary_cross_entropy_with_logits"):
            fp32(F, loss, f"F.{loss}")
        yield sim
        monkeypatch.undo()


def config(preset: str, overrides: list[str], precision: str) -> mm.Config:
    """A preset on ``cuda`` with small batches."""
    return mm.load_config(preset, [*small(preset), *overrides, "train.device=cuda", f"train.precision={precision}",
                                   "train.num_workers=0"])


def one_step(monkeypatch, tmp_path, cfg: mm.Config):
    """A Trainer on the simulated GPU and one training step; returns (sim, step info, gradients)."""
    with simulated(monkeypatch) as sim:
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        assert all(isinstance(p, SimTensor) for p in trainer.task.parameters())
        batches = iter(trainer.data)
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum)]
        sim.reset()
        info = trainer.train_step(micro_batches)
        grads = [p.grad for p in trainer.task.parameters() if p.requires_grad]
    return sim, info, grads


def check_step(sim, info, grads, *, precision: str, dropless_moe: bool) -> None:
    assert info.applied and torch.isfinite(torch.tensor(info.loss))
    assert not sim.errors, "\n".join(sim.errors)
    assert len(sim.syncs) <= SYNC_BUDGET, "host syncs in one training step:\n" + "\n".join(map(str, sim.syncs))
    assert all("trainer.py" in s.where and "train_step" in s.where for s in sim.syncs), sim.syncs
    assert all(isinstance(g, SimTensor) for g in grads if g is not None)
    assert any(g is not None for g in grads)
    if dropless_moe and precision == "bf16":  # the experts take the grouped kernel
        assert sim.grouped_mm and all(c["a"][0] == c["b"][0] == torch.bfloat16 for c in sim.grouped_mm)
    if precision == "fp32":  # no fp32 grouped kernel on CUDA: the padded layout, no sync
        assert not sim.grouped_mm


@pytest.fixture(scope="module")
def vqkd_file(tmp_path_factory) -> str:
    """A tiny VQ-KD tokenizer for the debug encoder's 32-pixel images, saved as unilm saves one."""
    torch.manual_seed(0)
    tokenizer = VQKDTokenizer(image_size=32, patch_size=8, dim=32, depth=2, heads=2, codebook_size=64, codebook_dim=8)
    path = tmp_path_factory.mktemp("vqkd") / "vqkd.pth"
    torch.save({"model": tokenizer.state_dict()}, path)
    return str(path)


def test_the_default_preset_step(monkeypatch, tmp_path):
    """`mmoe pretrain`'s default preset at its own batch sizes, under bf16 as on a GPU."""
    cfg = mm.load_config("pretrain/debug", ["train.device=cuda", "train.num_workers=0"])
    sim, info, grads = one_step(monkeypatch, tmp_path, cfg)
    check_step(sim, info, grads, precision="bf16", dropless_moe=False)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("ffn", ENCODER_FFNS)
@pytest.mark.parametrize("task", ENCODER_TASKS)
def test_encoder_task_step(monkeypatch, tmp_path, vqkd_file, task, ffn, precision):
    preset, overrides = ENCODER_TASKS[task]
    overrides = [o.replace("VQKD", vqkd_file) for o in overrides] + ENCODER_FFNS[ffn]
    sim, info, grads = one_step(monkeypatch, tmp_path, config(preset, overrides, precision))
    check_step(sim, info, grads, precision=precision, dropless_moe=ffn in DROPLESS_MOE)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("ffn", LM_FFNS)
def test_language_modeling_step(monkeypatch, tmp_path, ffn, precision):
    preset, overrides = LM_FFNS[ffn]
    sim, info, grads = one_step(monkeypatch, tmp_path, config(preset, overrides, precision))
    check_step(sim, info, grads, precision=precision, dropless_moe=ffn in DROPLESS_MOE)


@pytest.mark.parametrize("task", ["vqa", "retrieval", "nlvr2", "classification", "captioning"])
def test_finetuning_evaluation(monkeypatch, tmp_path, task):
    short = ["task.num_beams=1", "task.train.max_len=8"] if task == "captioning" else []  # greedy, brief: decoding
    cfg = mm.load_config(f"finetune/{task}_debug", [*MOE_OVERRIDES, "train.device=cuda", "train.precision=bf16",
                                                    "task.eval_batch_size=64", *short])
    with simulated(monkeypatch) as sim:
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        sim.reset()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results = trainer.task.evaluate(tmp_path / "eval")
    assert not sim.errors, "\n".join(sim.errors)
    assert results  # scored on the held-out split without a device mismatch


def test_language_model_evaluation(monkeypatch, tmp_path):
    from eval_tasks.lm_eval import perplexity, read_documents

    cfg = mm.load_config("lm/openmoe_debug", ["train.device=cuda", "train.precision=bf16"])
    with simulated(monkeypatch) as sim:
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        model = trainer.task.model.eval()
        documents = read_documents(["bundled:text/val"])[:4]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = perplexity(model, trainer.task.tokenizer, documents, seq_len=64, batch_size=4)
    assert not sim.errors, "\n".join(sim.errors)
    assert result["perplexity"] > 1


def test_the_tier_catches_what_it_is_for(monkeypatch):
    """Each rule fails a step that breaks it: a CPU tensor in a CUDA op, bf16 x fp32 grouped
    GEMM, a bf16 op in an fp32 region, and a host read."""
    with simulated(monkeypatch) as sim:
        x = torch.randn(8, 16, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.randn(8, 16)
        with pytest.raises(RuntimeError):  # passes CUDA's checks, then fails in the fallback (here: at once)
            torch._grouped_mm(x.bfloat16(), torch.randn(2, 16, 16, device="cuda"),
                              offs=torch.tensor([4, 8], dtype=torch.int32, device="cuda"))
        with sim.fp32_region("a router"):
            x.bfloat16() @ x.t().bfloat16()
        sim.syncs.clear()
        bool(x.sum() > 0)
        x[x > 0]
    assert any("different dtypes" in e for e in sim.errors)
    assert any("fp32 region 'a router'" in e for e in sim.errors)
    assert [s.op for s in sim.syncs] == ["aten._local_scalar_dense.default", "aten.index.Tensor with a boolean mask"]


def test_metrics_stay_on_the_device_until_logged(monkeypatch):
    """The meter sums device values without reading them; a summary reads them in one transfer
    and gives what the host-side sums would."""
    from multimodal_moe.tasks.base import TaskOutput
    from multimodal_moe.training.metrics import StepMeter

    meter = StepMeter()
    with simulated(monkeypatch) as sim:
        outputs = []
        for loss, counts in ((2.0, [3.0, 1.0]), (4.0, [1.0, 3.0])):
            stats = {"tokens_per_expert": torch.tensor(counts, device="cuda"),
                     "routed_tokens": torch.full((), 4.0, device="cuda"),
                     "dropped_fraction": torch.full((), loss / 10, device="cuda")}
            parts = {"part": torch.full((), loss, device="cuda")}
            outputs.append((loss, TaskOutput(torch.zeros((), device="cuda"), parts, samples=2,
                                             tokens=torch.full((), 8, device="cuda"), moe_stats=[[{"x": stats}]])))
        sim.reset()
        for loss, out in outputs:
            meter.add_output(out, micro_batches=1)
            meter.add_step(loss, 1.0, 1e-3)
        assert not sim.syncs
        summary = meter.summary()
        assert len(sim.syncs) == 1
    assert summary["part"] == 3.0 and meter.tokens == 16
    assert summary["moe"]["layer0.x"]["load"] == [0.5, 0.5]
    assert summary["moe"]["layer0.x"]["dropped_fraction"] == pytest.approx(0.3)


def test_a_checkpoint_written_on_the_gpu_resumes_exactly(monkeypatch, tmp_path):
    """Save after a step on the simulated GPU, resume into a fresh Trainer there: the next
    step's loss and gradient norm are those of the uninterrupted run."""
    # drop path draws from the GPU's generator: the checkpoint must restore it
    cfg = config("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null", "train.steps=4", "train.warmup_steps=1",
                                      "model.drop_path=0.5"], "bf16")
    with simulated(monkeypatch) as sim:
        straight = Trainer(cfg, tmp_path / "straight", progress=False)
        batches = iter(straight.data)
        straight.train_step([next(batches)])
        expected = straight.train_step([next(batches)])

        first = Trainer(cfg, tmp_path / "resumed", progress=False)
        first.train_step([next(iter(first.data))])
        first.save()
        first.close()
        resumed = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False)
        got = resumed.train_step([next(iter(resumed.data))])
    assert not sim.errors, "\n".join(sim.errors)
    assert (got.loss, got.grad_norm) == (expected.loss, expected.grad_norm)


@pytest.mark.parametrize("preset, overrides", [
    ("pretrain/debug", []),
    ("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null"]),
    ("lm/mhmoe_debug", []),
    ("beit3/mot_debug", []),
])
def test_a_simulated_fp32_step_equals_the_cpu_one(monkeypatch, tmp_path, preset, overrides):
    """The shadow autograd and the CUDA code paths (padded layout, device-side counts) give the
    CPU run's loss and gradient norm."""
    on_gpu = one_step(monkeypatch, tmp_path / "gpu", config(preset, overrides, "fp32"))[1]
    cfg = mm.load_config(preset, [*small(preset), *overrides, "train.device=cpu", "train.precision=fp32",
                                  "train.num_workers=0"])
    trainer = Trainer(cfg, tmp_path / "cpu", progress=False)
    on_cpu = trainer.train_step([next(iter(trainer.data))])
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-6)
    assert on_gpu.grad_norm == pytest.approx(on_cpu.grad_norm, rel=1e-5)


def test_gpus_without_a_bf16_grouped_kernel_take_the_padded_layout(monkeypatch, tmp_path):
    """On an A100 (compute capability 8.0) torch's bf16 grouped matmul copies the offsets to the
    host; the experts take the padded layout instead."""
    cfg = config("lm/openmoe_debug", ["model.moe_ffn.capacity_factor=null"], "bf16")
    with SimulatedCuda(capability=(8, 0)) as sim:
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        batch = next(iter(trainer.data))
        sim.reset()
        info = trainer.train_step([batch])
    assert info.applied and not sim.errors and not sim.grouped_mm and len(sim.syncs) == SYNC_BUDGET


@pytest.mark.parametrize("kind", ["topk_moe", "mh_moe"])
def test_routing_and_aux_losses_stay_fp32_under_autocast(monkeypatch, kind):
    from multimodal_moe.configurable import parse
    from multimodal_moe.layers import FFNConfig

    moe = parse(FFNConfig, {"kind": kind, "hidden_dim": 32, "num_experts": 4, "top_k": 2}).build(32)
    with simulated(monkeypatch) as sim:
        moe.to("cuda")
        x = torch.randn(2, 6, 32, device="cuda")
        mask = torch.ones(2, 6, dtype=torch.bool, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe(x, token_mask_BT=mask)
    assert not sim.errors, "\n".join(sim.errors)
    assert out.hidden.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.stats.values())
