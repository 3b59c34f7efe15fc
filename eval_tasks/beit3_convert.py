"""Official BEiT-3 checkpoints in and out of checkpoint folders of ours.

BEiT-3 (arXiv 2208.10442) as released: a torchscale ``BEiT3`` state dict, or a unilm ``beit3``
checkpoint (the state dict under ``model`` or ``module``, the backbone prefixed ``beit3.``, the
task's head beside it). Two contracts meet here, each declared where it belongs:

- the backbone's weight names, positions and config: :mod:`multimodal_moe.models.beit3_weights`;
- a task's head: its config class says how unilm names the head
  (``TaskConfig.unilm_heads``), how to make a config of it (``from_unilm_heads``: the VQA
  answer list, the retrieval width, the ImageNet class count) and what goes beside it on the way out
  (``write_unilm_files``: the VQA ``answer2label.txt``). Every registered task kind is asked,
  so the converter knows no task by name.

The unilm heads without a task here (pretraining MLM/MIM) are reported by name and left out
(``mlm_head`` beside a ``mim_head`` is a pretraining head, alone captioning's); any other key stops
the conversion, naming it. Converted folders
are written by the checkpoint writer (:class:`~multimodal_moe.training.checkpoint.FolderWriter`),
with ``conversion.json`` beside the weights: nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from multimodal_moe.config import Config
from multimodal_moe.configurable import to_dict
from multimodal_moe.models.beit3_weights import (
    UNILM_PREFIX,
    ConversionError,
    HeadsNotConverted,
    encoder_to_torchscale,
    listing,
    load_encoder,
    read_state_dict,
    split_backbone,
    torchscale_args,
    torchscale_incompatibilities,
)
from multimodal_moe.tasks.base import TaskConfig
from multimodal_moe.tasks.stream_config import TokenizerConfig
from multimodal_moe.training.checkpoint import HEADS_FILE, Checkpoint, CheckpointError, FolderWriter, check_new_folder

__all__ = ["ConversionError", "ConversionReport", "from_beit3", "to_beit3"]

REPORT_FILE = "conversion.json"
# unilm heads without a task here: reported, not converted (name prefixes)
OTHER_HEADS = {
    "mlm (pretraining)": ("mlm_head.",),
    "mim (pretraining)": ("mim_head.",),
}


@dataclass
class ConversionReport:
    """What a conversion did: written to ``conversion.json`` beside the converted weights.

    Attributes:
        source: the file or checkpoint read.
        source_format: torchscale | unilm | multimodal_moe.
        destination: what was written.
        task: the task whose heads were converted (vqa | retrieval | nlvr2 | classification), or None.
        not_converted: unilm head name -> its keys, for heads without a task here.
        notes: anything the user should know (assumed head count, resized positions, ...).
        torchscale_config: the ``EncoderConfig`` keyword arguments of the model.
        tokenizer: the tokenizer the weights expect (also in the task config, when there is one).
    """

    source: str
    source_format: str
    destination: str
    task: str | None = None
    not_converted: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    torchscale_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"converted {self.source} ({self.source_format}) -> {self.destination}",
                 f"heads: {self.task or 'none (backbone only)'}"]
        if self.tokenizer:
            lines.append(f"tokenizer: {self.tokenizer['path']} ({self.tokenizer['layout']} layout)")
        lines += [f"not converted ({name}: no such task here): {listing(keys)}"
                  for name, keys in self.not_converted.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _unilm_tasks() -> dict[str, type[TaskConfig]]:
    """Every task kind with a head in unilm's checkpoints."""
    return {kind: cls for kind, cls in TaskConfig.kinds().items() if cls.unilm_heads is not None}


def _sort_heads(rest: dict[str, torch.Tensor], tasks: dict[str, type[TaskConfig]]
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]], list[str]]:
    """The non-backbone keys sorted out: (task kind -> its head's weights, other unilm heads
    by name -> their keys, unknown keys)."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, list[str]] = {}
    unknown = []
    for name, tensor in rest.items():
        kind = next((kind for kind, cls in tasks.items() if name in cls.unilm_heads.names
                     and not any(k.startswith(cls.unilm_heads.unless) for k in rest if cls.unilm_heads.unless)),
                    None)
        other = next((head for head, prefixes in OTHER_HEADS.items() if name.startswith(prefixes)), None)
        if kind is not None:
            heads.setdefault(kind, {})[name] = tensor
        elif other is not None:
            others.setdefault(other, []).append(name)
        else:
            unknown.append(name)
    return heads, others, unknown


def _convert_heads(heads: dict[str, dict[str, torch.Tensor]], tasks: dict[str, type[TaskConfig]], dim: int,
                   tokenizer: TokenizerConfig, answers: Path | None, notes: list[str]
                   ) -> tuple[TaskConfig | None, dict[str, torch.Tensor]]:
    """(task config, head weights under our names) of the one task head in the checkpoint."""
    if not heads:
        return None, {}
    if len(heads) > 1:
        raise ConversionError(f"head keys of more than one task ({', '.join(sorted(heads))}): "
                              f"{listing([k for head in heads.values() for k in head])}")
    [(kind, theirs)] = heads.items()
    cls = tasks[kind]
    head_map = cls.unilm_heads
    missing = sorted(set(head_map.names) - set(theirs))
    if missing:
        raise ConversionError(f"the {kind} head is incomplete: missing {listing(missing)}")
    ours = head_map.to_ours(theirs)
    try:
        return cls.from_unilm_heads(ours, dim=dim, tokenizer=tokenizer, answers=answers), ours
    except HeadsNotConverted as e:
        notes.append(f"the {kind} head ({listing(list(head_map.names))}) was not converted: {e}")
        return None, {}


def _fit_text_length(task: Any, max_text_len: int) -> Any:
    """The task config with texts of up to 64 tokens (unilm's) or the model's limit."""
    if task is None or not hasattr(task.train, "max_len"):  # image classification reads no text
        return task
    return dataclasses.replace(task, train=dataclasses.replace(task.train, max_len=min(64, max_text_len)))


def from_beit3(src: str | os.PathLike, dst: str | os.PathLike, *, heads: int | None = None,
               image_size: int | None = None, tokenizer: str | None = None,
               tokenizer_layout: Literal["xlmr", "beit3", "auto"] = "xlmr", answers: str | None = None,
               trust_pickle: bool = False) -> ConversionReport:
    """Convert a torchscale ``BEiT3`` state dict or a unilm ``beit3`` checkpoint into a checkpoint
    directory of ours (``model.safetensors``, ``heads.safetensors``, ``config.yaml``,
    ``conversion.json``, ``checksums.json``) that ``mmoe finetune --init`` and ``mmoe evaluate`` read.

    Args:
        heads: attention heads (default: width / 64).
        image_size: resize the vision positions to this image size (default: as trained).
        tokenizer: the tokenizer path recorded in the task config (default: ``beit3.spm``,
            the official one).
        tokenizer_layout: its id layout (default: ``xlmr``, the official one's).
        answers: unilm's ``answer2label.txt`` (or one answer per line) for a VQA head; for an
            ImageNet head, its class names, one per line (default ``class_0`` ...).
        trust_pickle: allow files that pickle Python objects besides tensors.
    """
    check_new_folder(dst)
    state, source_format = read_state_dict(src, trust_pickle=trust_pickle)
    backbone, rest = split_backbone(state)
    tasks = _unilm_tasks()
    head_state, others, unknown = _sort_heads(rest, tasks)
    if unknown:
        raise ConversionError(f"{src}: keys that are neither BEiT-3 backbone weights nor a known unilm head: "
                              f"{listing(unknown)}")
    model, notes = load_encoder(backbone, heads=heads, image_size=image_size, source=str(src))
    cfg = model.cfg
    tok = TokenizerConfig(path=tokenizer or "beit3.spm", layout=tokenizer_layout)
    task, head_weights = _convert_heads(head_state, tasks, cfg.dim, tok, Path(answers) if answers else None, notes)
    if answers and task is None:
        notes.append("--answers was given but the checkpoint has no VQA head")
    if task is not None and tokenizer is None and hasattr(task, "tokenizer"):
        notes.append(f"the {task.kind} config names the tokenizer 'beit3.spm' (xlmr layout); evaluating needs it "
                     f"there or --set task.tokenizer.path=<beit3.spm>")
    task = _fit_text_length(task, cfg.max_text_len)
    report = ConversionReport(str(src), source_format, str(dst), task=None if task is None else task.kind,
                              not_converted={k: sorted(v) for k, v in others.items()}, notes=notes,
                              torchscale_config=torchscale_args(cfg), tokenizer=to_dict(tok))
    writer = FolderWriter(dst)
    writer.write(model=model.state_dict(), heads=head_weights, cfg=Config(model=cfg, task=task),
                 files={REPORT_FILE: json.dumps(asdict(report), indent=1)})
    writer.commit()
    return report


def to_beit3(src: str | os.PathLike, dst: str | os.PathLike, *,
             fmt: Literal["torchscale", "unilm"] = "torchscale") -> ConversionReport:
    """Write a checkpoint of ours (dense, decoupled) as a torchscale ``BEiT3`` state dict, or as a
    unilm checkpoint (``{"model": ...}``, ``beit3.`` prefix, plus the task's head when unilm has
    one), with ``torch.save`` to the file ``dst``; ``dst.json`` gets the report with the
    ``EncoderConfig`` arguments to build the model with, and the task's own files go beside it
    (a VQA head's answers to ``dst.answer2label.txt``)."""
    try:
        checkpoint = Checkpoint.open(src)
        cfg = checkpoint.config
        weights = checkpoint.weights()
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    problems = torchscale_incompatibilities(cfg.model)
    if problems:
        raise ConversionError(f"{checkpoint.path} has no torchscale BEiT3 layout: " + "; ".join(problems))
    out = encoder_to_torchscale(weights, str(checkpoint.path))
    head_map = cfg.task.unilm_heads if cfg.task is not None and fmt == "unilm" else None
    heads = {} if head_map is None else head_map.to_theirs(checkpoint.weights(HEADS_FILE))
    if fmt == "unilm":
        out = {"model": {**{UNILM_PREFIX + k: v for k, v in out.items()}, **heads}}
    report = ConversionReport(str(checkpoint.path), "multimodal_moe", str(dst), task=cfg.task.kind if heads else None,
                              torchscale_config=torchscale_args(cfg.model))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if heads:
        report.notes += cfg.task.write_unilm_files(dst, cfg.model)
    tmp = dst.parent / f".tmp-{dst.name}"
    torch.save(out, tmp)
    os.replace(tmp, dst)
    Path(f"{dst}.json").write_text(json.dumps(asdict(report), indent=1))
    return report
