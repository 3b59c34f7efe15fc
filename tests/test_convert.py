"""BEiT-3 checkpoint conversion: torchscale and unilm layouts in, torchscale and unilm out.

The reference is torchscale 0.3.0's ``BEiT3`` itself (installed test-only by ``make test``:
``pip install --no-deps torchscale==0.3.0 fairscale==0.4.0``); the unilm heads are built here
from unilm's definitions (pooler: LayerNorm -> Linear -> tanh over the first token; VQA head:
Linear -> LayerNorm -> GELU -> Linear; retrieval: bias-free projections and a scalar logit scale).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import multimodal_moe as mm
from eval_tasks.beit3_convert import ConversionError, from_beit3, to_beit3
from eval_tasks.vqa import read_answers
from multimodal_moe.cli import main
from multimodal_moe.configurable import to_dict
from multimodal_moe.models.beit3_weights import resize_vision_positions
from multimodal_moe.training import Checkpoint, build_task
from multimodal_moe.training.checkpoint import save_checkpoint

NEEDS_TORCHSCALE = "the torchscale 0.3.0 reference is not installed (pip install --no-deps torchscale==0.3.0 " \
                   "fairscale==0.4.0; make test does)"

# EncoderConfig overrides: widths, depths, patch grids, channels, with and without the final LN
# (vocabularies of 4096 fit the bundled tokenizer that the task tests load)
SIZES = [
    dict(encoder_embed_dim=64, encoder_attention_heads=4, encoder_ffn_embed_dim=128, encoder_layers=2,
         img_size=32, patch_size=8, vocab_size=4096, max_source_positions=40, normalize_output=True),
    dict(encoder_embed_dim=48, encoder_attention_heads=3, encoder_ffn_embed_dim=80, encoder_layers=3,
         img_size=24, patch_size=6, vocab_size=4096, max_source_positions=20, normalize_output=False),
    dict(encoder_embed_dim=32, encoder_attention_heads=2, encoder_ffn_embed_dim=64, encoder_layers=1,
         img_size=20, patch_size=4, in_chans=1, vocab_size=30, max_source_positions=12, normalize_output=True),
]


def torchscale_beit3(seed: int = 0, **overrides) -> nn.Module:
    """A torchscale BEiT3 with every weight (norms and positions too) drawn at random."""
    pytest.importorskip("torchscale", reason=NEEDS_TORCHSCALE)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    args = dict(multiway=True, no_output_layer=True, layernorm_embedding=False, **overrides)
    torch.manual_seed(seed)
    model = BEiT3(EncoderConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def inputs(overrides: dict, batch: int = 3, length: int = 7, seed: int = 1):
    """Images, token ids, a padding mask (ragged rows) and a patch mask."""
    g = torch.Generator().manual_seed(seed)
    size, chans = overrides["img_size"], overrides.get("in_chans", 3)
    images = torch.randn(batch, chans, size, size, generator=g)
    ids = torch.randint(0, overrides["vocab_size"], (batch, length), generator=g)
    padding = torch.arange(length)[None] >= torch.tensor([length, length - 2, 1])[:batch, None]
    patches = (size // overrides["patch_size"]) ** 2
    mask = torch.rand(batch, patches, generator=g) < 0.4
    return images, ids, padding, mask


def both_outputs(theirs: nn.Module, ours: nn.Module, overrides: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(torchscale, ours) hidden states for image-only, text-only and image-text inputs."""
    images, ids, padding, mask = inputs(overrides)
    cases = [(dict(visual_tokens=images), dict(images=images)),
             (dict(visual_tokens=images, vision_masked_position=mask), dict(images=images, image_mask=mask)),
             (dict(textual_tokens=ids, text_padding_position=padding), dict(text_ids=ids, text_padding_mask=padding)),
             (dict(visual_tokens=images, textual_tokens=ids, text_padding_position=padding,
                   vision_masked_position=mask),
              dict(images=images, text_ids=ids, text_padding_mask=padding, image_mask=mask))]
    with torch.no_grad():
        return [(theirs(**t)["encoder_out"], ours(**o).hidden) for t, o in cases]


@pytest.mark.parametrize("overrides", SIZES, ids=["d64-normed", "d48-no-final-ln", "d32-1chan"])
def test_torchscale_beit3_converts_to_the_same_function(tmp_path, overrides):
    theirs = torchscale_beit3(**overrides)
    torch.save(theirs.state_dict(), tmp_path / "beit3.pt")
    report = from_beit3(tmp_path / "beit3.pt", tmp_path / "ours", heads=overrides["encoder_attention_heads"])
    assert report.source_format == "torchscale" and report.task is None and not report.not_converted
    assert json.loads((tmp_path / "ours" / "conversion.json").read_text())["tokenizer"] == {"path": "beit3.spm",
                                                                                          "layout": "xlmr"}
    ours = mm.load_checkpoint(tmp_path / "ours")
    assert ours.cfg.normalize_output == overrides["normalize_output"]
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in theirs.named_parameters()) - 2 * 2 * ours.cfg.dim  # the fairseq offset rows
    for got_theirs, got_ours in both_outputs(theirs, ours, overrides):
        assert got_ours.shape == got_theirs.shape
        assert (got_ours - got_theirs).abs().max() <= 1e-5


def test_ours_round_trips_through_torchscale_exactly(tmp_path):
    cfg = mm.load_config("beit3/debug")
    task = build_task(cfg)
    save_checkpoint(tmp_path / "run", 5, task=task, state={}, cfg=cfg)
    report = to_beit3(tmp_path / "run", tmp_path / "beit3.pt")
    state = torch.load(tmp_path / "beit3.pt", weights_only=True)

    # torchscale loads it strictly and computes what ours does
    pytest.importorskip("torchscale", reason=NEEDS_TORCHSCALE)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    theirs = BEiT3(EncoderConfig(**report.torchscale_config)).eval()
    theirs.load_state_dict(state, strict=True)
    overrides = dict(img_size=cfg.model.image_size, patch_size=cfg.model.patch_size, vocab_size=cfg.model.vocab_size)
    for got_theirs, got_ours in both_outputs(theirs, task.model.eval(), overrides):
        assert (got_ours - got_theirs).abs().max() <= 1e-5

    # and back: the same model config and bitwise the same weights
    from_beit3(tmp_path / "beit3.pt", tmp_path / "back", heads=cfg.model.heads)
    back = Checkpoint.open(tmp_path / "back")
    assert to_dict(back.config.model) == to_dict(cfg.model)
    original = Checkpoint.open(tmp_path / "run").weights()
    returned = back.weights()
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)


class Pooler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.dense = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x_BTD):
        return torch.tanh(self.dense(self.norm(x_BTD[:, 0])))


def random_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def unilm_checkpoint(path, backbone: nn.Module, heads: dict[str, nn.Module | torch.Tensor]) -> None:
    """A unilm-style file: ``{"model": {"beit3." + backbone keys, head keys}}``."""
    state = {f"beit3.{k}": v for k, v in backbone.state_dict().items()}
    for name, head in heads.items():
        state.update({name: head} if isinstance(head, torch.Tensor) else
                     {f"{name}.{k}": v for k, v in head.state_dict().items()})
    torch.save({"model": state}, path)


def test_unilm_vqa_checkpoint_converts_with_its_head(tmp_path):
    overrides = SIZES[1]  # unilm's VQA model has no final LayerNorm
    dim, answers = overrides["encoder_embed_dim"], [f"answer {i}" for i in range(11)]
    backbone = torchscale_beit3(**overrides)
    pooler = random_(Pooler(dim))
    head = random_(nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, len(answers))))
    unilm_checkpoint(tmp_path / "vqa.pth", backbone, {"pooler": pooler, "head": head})
    order = list(range(len(answers)))[::-1]  # answer2label.txt lines need not be in label order
    (tmp_path / "answer2label.txt").write_text("".join(json.dumps({"answer": answers[i], "label": i}) + "\n"
                                                       for i in order))

    report = from_beit3(tmp_path / "vqa.pth", tmp_path / "ours", heads=3, answers=tmp_path / "answer2label.txt",
                        tokenizer="bundled:tokenizer.model", tokenizer_layout="auto")
    assert report.source_format == "unilm" and report.task == "vqa"
    checkpoint = Checkpoint.open(tmp_path / "ours")
    assert checkpoint.config.task.answers == tuple(answers)
    default = from_beit3(tmp_path / "vqa.pth", tmp_path / "default", heads=3, answers=tmp_path / "answer2label.txt")
    assert to_dict(Checkpoint.open(tmp_path / "default").config.task.tokenizer) == {"path": "beit3.spm",
                                                                                     "layout": "xlmr"}
    assert any("evaluating needs it there" in n for n in default.notes)
    task = checkpoint.load_task().eval()
    images, ids, padding, _ = inputs(overrides)
    with torch.no_grad():
        expected = head(pooler(backbone(textual_tokens=ids, visual_tokens=images,
                                        text_padding_position=padding)["encoder_out"]))
        batch = _vqa_batch(images, ids, padding)
        got, _ = task.logits(batch)
    assert (got - expected).abs().max() <= 1e-5
    assert task.answers == answers

    # without the answers the head cannot be used: the backbone converts, the head is reported
    report = from_beit3(tmp_path / "vqa.pth", tmp_path / "backbone_only", heads=3)
    assert report.task is None and any("--answers" in n for n in report.notes)
    assert load_file(tmp_path / "backbone_only" / "heads.safetensors") == {}
    with pytest.raises(ConversionError, match="11 answers, the answer list 3"):
        (tmp_path / "three.txt").write_text("yes\nno\n2\n")
        from_beit3(tmp_path / "vqa.pth", tmp_path / "bad", heads=3, answers=tmp_path / "three.txt")


def _vqa_batch(images, ids, padding):
    from data_pipelines.batches import VQABatch

    B = len(images)
    return VQABatch(images_B3HW=images, text_ids_BL=ids, padding_mask_BL=padding, keys=[str(i) for i in range(B)],
                    question_ids=[str(i) for i in range(B)], question_types=["what"] * B, answers=[["yes"] * 10] * B)


def test_unilm_retrieval_checkpoint_converts_with_its_heads(tmp_path):
    overrides = SIZES[0]
    dim = overrides["encoder_embed_dim"]
    backbone = torchscale_beit3(**overrides)
    vision_head, language_head = random_(nn.Linear(dim, dim, bias=False)), random_(nn.Linear(dim, dim, bias=False))
    logit_scale = torch.tensor(math.log(1 / 0.05))  # a 0-d parameter in unilm
    pretraining = {"mim_head": random_(nn.Linear(dim, 8))}  # a head without a task here: reported
    unilm_checkpoint(tmp_path / "retrieval.pth", backbone, {"vision_head": vision_head,
                                                            "language_head": language_head,
                                                            "logit_scale": logit_scale, **pretraining})
    report = from_beit3(tmp_path / "retrieval.pth", tmp_path / "ours", heads=4, tokenizer="bundled:tokenizer.model",
                        tokenizer_layout="auto")
    assert report.task == "retrieval"
    assert report.not_converted == {"mim (pretraining)": ["mim_head.bias", "mim_head.weight"]}
    checkpoint = Checkpoint.open(tmp_path / "ours")
    task = checkpoint.load_task().eval()
    images, ids, padding, _ = inputs(overrides)
    with torch.no_grad():
        image_expected = F.normalize(vision_head(backbone(visual_tokens=images)["encoder_out"][:, 0]), dim=-1)
        text_expected = F.normalize(language_head(backbone(textual_tokens=ids, text_padding_position=padding)
                                                  ["encoder_out"][:, 0]), dim=-1)
        image_got, _ = task.image_features(images)
        text_got, _ = task.text_features(ids, padding)
    assert (image_got - image_expected).abs().max() <= 1e-5
    assert (text_got - text_expected).abs().max() <= 1e-5
    assert task.logit_scale.item() == logit_scale.item()

    # out again as unilm: the same keys and values as the file it came from (bar the unused offset rows)
    to_beit3(tmp_path / "ours", tmp_path / "again.pth", fmt="unilm")
    again = torch.load(tmp_path / "again.pth", weights_only=True)["model"]
    source = torch.load(tmp_path / "retrieval.pth", weights_only=True)["model"]
    assert set(again) == set(source) - {"mim_head.weight", "mim_head.bias"}
    for k, v in again.items():
        if "embed_positions" in k:
            v, source[k] = v[2:], source[k][2:]
        assert v.shape == source[k].shape and torch.equal(v, source[k]), k


def test_vision_positions_resize_for_a_new_image_size(tmp_path):
    overrides = SIZES[0]
    theirs = torchscale_beit3(**overrides)
    torch.save(theirs.state_dict(), tmp_path / "beit3.pt")
    report = from_beit3(tmp_path / "beit3.pt", tmp_path / "ours", heads=4, image_size=48)
    assert any("resized from 32 px (16 patches) to 48 px (36 patches)" in n for n in report.notes)
    ours = mm.load_checkpoint(tmp_path / "ours")
    assert ours.cfg.image_size == 48 and ours.vision_embed.pos_embed.shape == (1, 37, 64)
    table = theirs.encoder.embed_positions.A.weight
    assert torch.equal(ours.vision_embed.pos_embed[0, 0], table[2])  # CLS row kept
    assert ours(images=torch.randn(2, 3, 48, 48)).hidden.shape == (2, 37, 64)

    # bicubic over the grid: constants stay constant, a resize to the same grid changes nothing
    constant = torch.cat([torch.zeros(1, 1, 5), torch.full((1, 16, 5), 0.7)], dim=1)
    assert torch.allclose(resize_vision_positions(constant, 6)[:, 1:], torch.full((1, 36, 5), 0.7), atol=1e-6)
    random = torch.randn(1, 17, 5)
    assert resize_vision_positions(random, 4) is random
    # a grid that varies along x only, against cubic convolution (a = -0.75, edges clamped) by hand
    row = torch.tensor([0.3, -1.2, 2.0, 0.5])
    resized = resize_vision_positions(torch.cat([torch.zeros(1, 1, 1), row.repeat(4)[None, :, None]], dim=1), 7)
    assert torch.allclose(resized[0, 1:, 0].reshape(7, 7), cubic_resize_1d(row, 7).expand(7, 7), atol=1e-5)


def cubic_resize_1d(values: torch.Tensor, size: int, a: float = -0.75) -> torch.Tensor:
    """Bicubic resampling of one row, pixel centres aligned (align_corners=False), one output at a time."""
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    n, out = len(values), []
    for i in range(size):
        source = (i + 0.5) * n / size - 0.5
        left = math.floor(source)
        out.append(sum(kernel(source - j) * values[min(max(j, 0), n - 1)].item() for j in range(left - 1, left + 3)))
    return torch.tensor(out)


# -- errors (no reference needed: the torchscale layout comes from our own export) --------------------

@pytest.fixture
def exported(tmp_path):
    """A torchscale-layout state dict of the debug preset, written by ``to_beit3``."""
    cfg = mm.load_config("beit3/debug")
    save_checkpoint(tmp_path / "run", 1, task=build_task(cfg), state={}, cfg=cfg)
    to_beit3(tmp_path / "run", tmp_path / "beit3.pt")
    return torch.load(tmp_path / "beit3.pt", weights_only=True)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(3)}),
     "neither BEiT-3 backbone weights nor a known unilm head: encoder.layers.0.self_attn.rel_pos.weight"),
    (lambda s: s.update({"encoder.layers.1.ffn.B.fc1.weight": torch.zeros(100, 64)}),
     r"shape mismatch: encoder.layers.1.ffn.B.fc1.weight \(100, 64\) \(expected \(128, 64\)\)"),
    (lambda s: s.pop("encoder.layers.2.self_attn.q_proj.A.bias"), "missing: encoder.layers.2.self_attn.q_proj.A.bias"),
    (lambda s: s.update({"encoder.layers.1.moe_layer.gate.wg": torch.zeros(4, 16),
                         "encoder.layers.1.moe_layer.experts.0.fc1.weight": torch.zeros(128, 64)}),
     "Mixture-of-Experts checkpoint from another codebase.*moe_layer.experts.0.fc1.weight"),
    (lambda s: [s.pop(k) for k in list(s) if "inner_attn_ln" in k], "no Sub-LN weights"),
    (lambda s: s.update({"encoder.embed_positions.A.weight": torch.zeros(20, 64)}), "square number of patches"),
])
def test_unexpected_checkpoints_are_refused_naming_the_keys(tmp_path, exported, change, message):
    change(exported)
    torch.save(exported, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=message):
        from_beit3(tmp_path / "bad.pt", tmp_path / "out", heads=4)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_heads_without_a_task_here_are_reported_by_name(tmp_path, exported):
    heads = {"mlm_head.weight": torch.zeros(4096, 64), "mim_head.weight": torch.zeros(8192, 64)}  # pretraining
    torch.save({"module": {**{f"beit3.{k}": v for k, v in exported.items()}, **heads}}, tmp_path / "heads.pth")
    report = from_beit3(tmp_path / "heads.pth", tmp_path / "out", heads=4)
    assert report.task is None and report.source_format == "unilm"
    assert report.not_converted == {"mlm (pretraining)": ["mlm_head.weight"],
                                    "mim (pretraining)": ["mim_head.weight"]}
    assert "not converted (mim (pretraining): no such task here): mim_head.weight" in report.summary()
    assert load_file(tmp_path / "out" / "heads.safetensors") == {}
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["not_converted"] == report.not_converted


def test_pickled_objects_need_trust_and_destinations_are_not_overwritten(tmp_path, exported):
    torch.save({"model": exported, "args": argparse_namespace()}, tmp_path / "with_args.pth")
    with pytest.raises(ConversionError, match="--trust-pickle"):
        from_beit3(tmp_path / "with_args.pth", tmp_path / "out", heads=4)
    assert from_beit3(tmp_path / "with_args.pth", tmp_path / "out", heads=4, trust_pickle=True).source_format == "unilm"
    with pytest.raises(FileExistsError, match="not an empty directory"):
        from_beit3(tmp_path / "with_args.pth", tmp_path / "out", heads=4, trust_pickle=True)
    torch.save(exported, tmp_path / "plain.pt")  # width 64: one head assumed, said so
    report = from_beit3(tmp_path / "plain.pt", tmp_path / "default_heads")
    assert mm.load_checkpoint(tmp_path / "default_heads").cfg.heads == 1
    assert any("assumed 1 attention heads" in n for n in report.notes)


def test_the_head_count_is_asked_for_when_it_cannot_be_assumed(tmp_path):
    cfg = mm.load_config("beit3/debug", ["model.dim=48", "model.heads=4"])
    save_checkpoint(tmp_path / "run", 1, task=build_task(cfg), state={}, cfg=cfg)
    to_beit3(tmp_path / "run", tmp_path / "beit3.pt")
    with pytest.raises(ConversionError, match="width 48 is not a multiple of 64; give the number of attention heads"):
        from_beit3(tmp_path / "beit3.pt", tmp_path / "out")
    from_beit3(tmp_path / "beit3.pt", tmp_path / "out", heads=4)
    assert to_dict(Checkpoint.open(tmp_path / "out").config.model) == to_dict(cfg.model)


def test_safetensors_files_convert_like_pickles(tmp_path, exported):
    from safetensors.torch import save_file

    save_file({f"beit3.{k}": v.contiguous() for k, v in exported.items()}, tmp_path / "beit3.safetensors")
    torch.save(exported, tmp_path / "beit3.pt")
    assert from_beit3(tmp_path / "beit3.safetensors", tmp_path / "a", heads=4).source_format == "unilm"
    from_beit3(tmp_path / "beit3.pt", tmp_path / "b", heads=4)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def argparse_namespace():
    import argparse

    return argparse.Namespace(model="beit3_base_patch16_224", input_size=224)


def test_moe_and_paper_layout_models_do_not_export(tmp_path):
    for preset, key in (("beit3/xmoe_debug", "model.moe_ffn"), ("beit3/debug_paper", "model.layout")):
        cfg = mm.load_config(preset)
        save_checkpoint(tmp_path / preset, 1, task=build_task(cfg), state={}, cfg=cfg)
        with pytest.raises(ConversionError, match=key):
            to_beit3(tmp_path / preset, tmp_path / "out.pt")


def test_answer_lists_read_in_label_order(tmp_path):
    (tmp_path / "a.txt").write_text('{"answer": "no", "label": 1}\n{"answer": "yes", "label": 0}\n')
    assert read_answers(tmp_path / "a.txt") == ["yes", "no"]
    (tmp_path / "b.txt").write_text("yes\nno\n\n")
    assert read_answers(tmp_path / "b.txt") == ["yes", "no"]
    (tmp_path / "c.txt").write_text('{"answer": "no", "label": 2}\n')
    with pytest.raises(ConversionError, match=r"labels must be 0\.\.0"):
        read_answers(tmp_path / "c.txt")


# -- the command line, end to end ------------------------------------------------------------------

FAST = ["--set=train.steps=3", "--set=train.warmup_steps=1", "--set=train.log_every=1", "--set=train.num_workers=0",
        "--set=train.checkpoint_every=3", "--set=task.train.batch_size=8", "--set=task.train.shuffle_buffer=20"]


def test_cli_fine_tunes_a_converted_checkpoint_and_hands_it_back(tmp_path, capsys):
    """torchscale file -> ``mmoe convert`` -> VQA fine-tuning here -> a unilm checkpoint with its
    answer list -> ``mmoe convert`` again -> ``mmoe evaluate``: the same accuracy."""
    cfg = mm.load_config("beit3/debug")
    save_checkpoint(tmp_path / "pre", 1, task=build_task(cfg), state={}, cfg=cfg)
    to_beit3(tmp_path / "pre", tmp_path / "beit3.pt")
    assert main(["convert", "beit3", "--src", str(tmp_path / "beit3.pt"), "--dst", str(tmp_path / "conv"),
                 "--heads", "4"]) == 0
    assert "mmoe finetune --config" in capsys.readouterr().out
    run = tmp_path / "ft"
    assert main(["finetune", "--config", "finetune/vqa_debug", "--init", str(tmp_path / "conv"), "--run-dir",
                 str(run), "--no-progress", *FAST]) == 0
    results = json.loads((run / "results.json").read_text())
    assert main(["convert", "beit3", "--to", "unilm", "--src", str(run), "--dst", str(tmp_path / "vqa.pth")]) == 0
    assert "EncoderConfig" in capsys.readouterr().out
    assert main(["convert", "beit3", "--src", str(tmp_path / "vqa.pth"), "--dst", str(tmp_path / "back"),
                 "--heads", "4", "--answers", str(tmp_path / "vqa.pth.answer2label.txt")]) == 0
    out = capsys.readouterr().out
    assert "heads: vqa" in out and "(unilm)" in out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "back"), "--config", "finetune/vqa_debug",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["vqa_accuracy"] == results["vqa_accuracy"] and again["questions"] == results["questions"]


def test_cli_reports_conversion_errors(tmp_path, capsys):
    torch.save({"model": {"beit3.text_embed.weight": torch.zeros(10, 8), "mystery": torch.zeros(1)}},
               tmp_path / "odd.pth")
    assert main(["convert", "beit3", "--src", str(tmp_path / "odd.pth"), "--dst", str(tmp_path / "out")]) == 1
    assert "mystery" in capsys.readouterr().err
