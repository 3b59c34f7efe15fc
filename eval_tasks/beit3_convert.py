"""Official BEiT-3 checkpoints in and out of the ``decoupled`` Multiway encoder.

Two source formats are read:

- a torchscale ``BEiT3`` state dict (``text_embed.weight``, ``vision_embed.*``, ``encoder.*``);
- a unilm ``beit3`` checkpoint: the state dict under ``model`` or ``module``, the backbone
  prefixed ``beit3.``, the task's head beside it.

The decoupled layout is torchscale's: every projection and norm has a vision branch (torchscale's
``A``) and a text branch (``B``), so the weights map one to one. Three things change on the way:

- positions: torchscale keeps fairseq's offset of 2 (rows 0 and 1 of both tables are never
  read; each modality starts at row 2). Ours start at row 0, so rows 0-1 are dropped, and zero
  rows are put back when writing torchscale's layout;
- the vision table is resized (bicubic over the patch grid, the CLS row kept) when a new image
  size is asked for, as unilm's ``load_model_and_may_interpolate`` does;
- heads: unilm's VQA pooler and classifier, and its retrieval projections and logit scale,
  become the ``vqa`` and ``retrieval`` tasks' heads. The other unilm heads (NLVR2, ImageNet,
  captioning and pretraining MLM/MIM) have no task here: they are reported by name and left out.

The size is read off the weights. The number of attention heads is not in them: it defaults to
D / 64 (BEiT-3 base and large) and can be given. Anything else (an unknown key, a shape that
does not fit the inferred size, MoE keys from another codebase) is a :class:`ConversionError`
naming the keys, never a partial load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from multimodal_moe.config import Config, dump_config
from multimodal_moe.configurable import to_dict
from multimodal_moe.layers.ffn import DenseFFNConfig
from multimodal_moe.layers.multiway import TEXT, VISION
from multimodal_moe.models import MultiwayEncoderConfig
from multimodal_moe.tasks.streams import TokenizerConfig
from multimodal_moe.training.checkpoint import (
    CONFIG_FILE,
    HEADS_FILE,
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    load_weights,
    save_weights,
)

from .retrieval import RetrievalConfig
from .vqa import VQAConfig, answer_vocab

__all__ = ["ConversionError", "ConversionReport", "from_beit3", "read_state_dict", "to_beit3", "torchscale_args"]

REPORT_FILE = "conversion.json"
OFFSET = 2  # fairseq's position offset in torchscale's tables
UNILM_PREFIX = "beit3."

# (torchscale name, our name). {X} is the branch (A/B there, vision/text here), {i} a layer.
_RULES = [
    ("text_embed.weight", "text_embed.tokens.weight"),
    ("vision_embed.{v}", "vision_embed.{v}"),
    ("encoder.layers.{i}.self_attn.{proj}.{X}.{p}", "layers.{i}.attn.{proj}.{X}.{p}"),
    ("encoder.layers.{i}.self_attn.inner_attn_ln.{X}.{p}", "layers.{i}.attn.inner_norm.{X}.{p}"),
    ("encoder.layers.{i}.self_attn_layer_norm.{X}.{p}", "layers.{i}.attn_norm.{X}.{p}"),
    ("encoder.layers.{i}.ffn.{X}.{fc}.{p}", "layers.{i}.ffn.{X}.{fc}.{p}"),
    ("encoder.layers.{i}.ffn.{X}.ffn_layernorm.{p}", "layers.{i}.ffn.{X}.ffn_norm.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{X}.{p}", "layers.{i}.ffn_norm.{X}.{p}"),
    ("encoder.layer_norm.{X}.{p}", "final_norm.{X}.{p}"),
]
_FIELDS = {"i": r"\d+", "p": "weight|bias", "proj": "q_proj|k_proj|v_proj|out_proj", "fc": "fc1|fc2",
           "v": r"mask_token|cls_token|proj\.weight|proj\.bias"}
_BRANCH_OURS = {"A": VISION, "B": TEXT}
_BRANCH_THEIRS = {v: k for k, v in _BRANCH_OURS.items()}
POSITIONS = {"encoder.embed_positions.A.weight": "vision_embed.pos_embed",
             "encoder.embed_positions.B.weight": "text_embed.pos_embed"}
_POSITIONS_THEIRS = {v: k for k, v in POSITIONS.items()}

# unilm heads with a task here: unilm name -> ours
VQA_HEAD = {"pooler.norm.weight": "pooler.0.weight", "pooler.norm.bias": "pooler.0.bias",
            "pooler.dense.weight": "pooler.1.weight", "pooler.dense.bias": "pooler.1.bias",
            **{f"head.{i}.{p}": f"head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}}
RETRIEVAL_HEAD = {"vision_head.weight": "vision_head.weight", "language_head.weight": "language_head.weight",
                  "logit_scale": "logit_scale"}
# unilm heads without one: reported, not converted (name prefixes)
OTHER_HEADS = {
    "nlvr2": ("head.norm1.", "head.dense1.", "head.norm2.", "head.dense2."),
    "imagenet": ("fc_norm.", "head.weight", "head.bias"),
    "mlm (captioning / pretraining)": ("mlm_head.",),
    "mim (pretraining)": ("mim_head.",),
}
_MOE = re.compile(r"(^|\.)(moe_layer|experts|gate)\.")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending keys."""


def _matcher(template: str, branches: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{branches if part == 'X' else _FIELDS[part]})"
        for k, part in enumerate(parts)) + "$")


_TO_OURS = [(_matcher(theirs, "A|B"), ours) for theirs, ours in _RULES]
_TO_THEIRS = [(_matcher(ours, f"{VISION}|{TEXT}"), theirs) for theirs, ours in _RULES]


def _rename(name: str, rules: list[tuple[re.Pattern, str]], branches: dict[str, str]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            if "X" in groups:
                groups["X"] = branches[groups["X"]]
            return template.format(**groups)
    return None


def _listing(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class ConversionReport:
    """What a conversion did: written to ``conversion.json`` beside the converted weights.

    Attributes:
        source: the file or checkpoint read.
        source_format: torchscale | unilm | multimodal_moe.
        destination: what was written.
        task: the task whose heads were converted (vqa | retrieval), or None.
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
        lines += [f"not converted ({name}: no such task here): {_listing(keys)}"
                  for name, keys in self.not_converted.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- reading ---------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``path`` (``.pth``/``.pt``/``.bin`` or ``.safetensors``) and its format
    (``unilm`` when it sits under ``model``/``module`` or carries the ``beit3.`` prefix, else
    ``torchscale``), the ``beit3.`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    wrapped = False
    if path.suffix == ".safetensors":
        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConversionError(f"{path} holds Python objects besides tensors ({reason}); "
                                  f"if you trust the file, pass --trust-pickle") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ConversionError(f"cannot read {path}: {e}") from None
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                obj, wrapped = obj[key], True
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} holds no state dict (a mapping of names to tensors, possibly under "
                              f"'model' or 'module'); found {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {_listing([str(k) for k in not_tensors])}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    prefixed = [k for k in state if k.startswith(UNILM_PREFIX)]
    if prefixed:
        clash = [k for k in prefixed if k.removeprefix(UNILM_PREFIX) in state]
        if clash:
            raise ConversionError(f"{path} holds backbone weights both with and without the {UNILM_PREFIX!r} "
                                  f"prefix: {_listing(clash)}")
        state = {k.removeprefix(UNILM_PREFIX): v for k, v in state.items()}
    return state, ("unilm" if wrapped or prefixed else "torchscale")


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, list[str]], list[str]]:
    """(backbone under our names, the VQA or retrieval head under our names, other unilm heads
    by task, unknown keys)."""
    moe = [k for k in state if _MOE.search(k)]
    if moe:
        raise ConversionError("this is a Mixture-of-Experts checkpoint from another codebase (torchscale X-MoE "
                              "keys); only dense BEiT-3 checkpoints convert. MoE keys: " + _listing(moe))
    backbone, heads, others, unknown = {}, {}, {}, []
    for name, tensor in state.items():
        ours = POSITIONS.get(name) or _rename(name, _TO_OURS, _BRANCH_OURS)
        if ours is not None:
            backbone[ours] = tensor
        elif name in VQA_HEAD or name in RETRIEVAL_HEAD:
            heads[name] = tensor
        else:
            task = next((t for t, prefixes in OTHER_HEADS.items() if name.startswith(prefixes)), None)
            if task is None:
                unknown.append(name)
            else:
                others.setdefault(task, []).append(name)
    return backbone, heads, others, unknown


# -- the model config ------------------------------------------------------------------------------

def _need(state: dict[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"not a BEiT-3 checkpoint: {name!r} is missing")
    if state[name].ndim != ndim:
        raise ConversionError(f"{name!r} has shape {tuple(state[name].shape)}, expected {ndim} dimensions")
    return state[name]


def infer_model_config(state: dict[str, torch.Tensor], *, heads: int | None = None,
                       image_size: int | None = None) -> tuple[MultiwayEncoderConfig, int, list[str]]:
    """The decoupled encoder config of a torchscale-named state dict, the image size its vision
    positions were trained at, and notes (the assumed head count)."""
    vocab, dim = _need(state, "text_embed.weight", 2).shape
    _, in_chans, patch, _ = _need(state, "vision_embed.proj.weight", 4).shape
    hidden = _need(state, "encoder.layers.0.ffn.A.fc1.weight", 2).shape[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    depth = max(layers) + 1
    if layers != set(range(depth)):
        raise ConversionError(f"layers {sorted(set(range(depth)) - layers)} are missing (found {sorted(layers)})")
    vision_rows = _need(state, "encoder.embed_positions.A.weight", 2).shape[0] - OFFSET - 1
    grid = math.isqrt(max(vision_rows, 0))
    if vision_rows <= 0 or grid * grid != vision_rows:
        raise ConversionError(f"encoder.embed_positions.A.weight has {vision_rows + OFFSET + 1} rows; expected "
                              f"2 + 1 + a square number of patches")
    text_rows = _need(state, "encoder.embed_positions.B.weight", 2).shape[0] - OFFSET
    if "encoder.layers.0.self_attn.inner_attn_ln.A.weight" not in state:
        raise ConversionError("no Sub-LN weights (self_attn.inner_attn_ln): only the released BEiT-3 layout "
                              "(pre-LN with Sub-LN) converts, not DeepNorm or plain pre-LN encoders")
    notes = []
    if heads is None:
        if dim % 64:
            raise ConversionError(f"width {dim} is not a multiple of 64; give the number of attention heads "
                                  f"(--heads), which the weights do not record")
        heads = dim // 64
        notes.append(f"assumed {heads} attention heads (width {dim} / 64, as BEiT-3 base and large); the weights "
                     f"do not record it, pass --heads otherwise")
    trained_size = grid * patch
    try:
        cfg = MultiwayEncoderConfig(
            depth=depth, dim=dim, heads=heads, layout="decoupled",
            ffn=DenseFFNConfig(hidden_dim=hidden, activation="gelu", sub_ln=True), norm="layernorm",
            norm_eps=1e-5, sub_ln=True, image_size=image_size or trained_size, patch_size=patch,
            in_chans=in_chans, vocab_size=vocab, max_text_len=text_rows,
            normalize_output="encoder.layer_norm.A.weight" in state)
    except ValueError as e:
        raise ConversionError(f"the inferred model config is invalid: {e}") from None
    return cfg, trained_size, notes


def resize_vision_positions(table_1TD: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1, 1 + g*g, D) vision position table resized to a ``grid`` x ``grid`` patch grid
    (bicubic, in fp32); the CLS row is kept."""
    old = math.isqrt(table_1TD.shape[1] - 1)
    if old == grid:
        return table_1TD
    D = table_1TD.shape[-1]
    patches = table_1TD[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(table_1TD.dtype)
    return torch.cat([table_1TD[:, :1], patches], dim=1)


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                  name_of: Callable[[str], str | None]) -> None:
    """Every expected key present with its shape and nothing more; errors name the keys as the
    source file does (``name_of``: our name -> the source's)."""
    def source(k: str) -> str:
        return name_of(k) or k

    missing = [source(k) for k in expected if k not in state]
    unexpected = [source(k) for k in state if k not in expected]
    wrong = [f"{source(k)} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = ([f"missing: {_listing(missing)}"] if missing else []) + (
        [f"unexpected: {_listing(unexpected)}"] if unexpected else []) + (
        [f"shape mismatch: {_listing(wrong)}"] if wrong else [])
    if problems:
        raise ConversionError(f"{what} does not fit the inferred model; " + "; ".join(problems))


# -- heads -----------------------------------------------------------------------------------------

def read_answers(path: str | os.PathLike) -> list[str]:
    """VQA answers in head order from unilm's ``answer2label.txt`` (JSON lines with ``answer``
    and ``label``) or a plain list, one answer per line."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        try:
            pairs = sorted((int(rec["label"]), str(rec["answer"])) for rec in map(json.loads, lines))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: expected JSON lines with 'answer' and 'label' ({e})") from None
        labels = [label for label, _ in pairs]
        if labels != list(range(len(pairs))):
            raise ConversionError(f"{path}: labels must be 0..{len(pairs) - 1}, each once")
        return [answer for _, answer in pairs]
    return [ln.strip() for ln in lines]


def _convert_heads(heads: dict[str, torch.Tensor], dim: int, answers: list[str] | None, tokenizer: TokenizerConfig,
                   notes: list[str]):
    """(task config, head weights under our names) of unilm's VQA or retrieval head."""
    if not heads:
        return None, {}
    kinds = {"vqa": VQA_HEAD, "retrieval": RETRIEVAL_HEAD}
    kind = "vqa" if any(k in VQA_HEAD for k in heads) else "retrieval"
    if any(k in kinds["retrieval" if kind == "vqa" else "vqa"] for k in heads):
        raise ConversionError(f"both VQA and retrieval head keys: {_listing(list(heads))}")
    missing = sorted(set(kinds[kind]) - set(heads))
    if missing:
        raise ConversionError(f"the {kind} head is incomplete: missing {_listing(missing)}")
    ours = {kinds[kind][k]: v for k, v in heads.items()}
    if kind == "vqa":
        A = ours["head.3.weight"].shape[0]
        expected = {"pooler.0.weight": (dim,), "pooler.0.bias": (dim,), "pooler.1.weight": (dim, dim),
                    "pooler.1.bias": (dim,), "head.0.weight": (2 * dim, dim), "head.0.bias": (2 * dim,),
                    "head.1.weight": (2 * dim,), "head.1.bias": (2 * dim,), "head.3.weight": (A, 2 * dim),
                    "head.3.bias": (A,)}
        if answers is None:
            notes.append(f"the VQA head ({_listing(list(VQA_HEAD))}) was not converted: its {A} outputs need "
                         f"their answers (pass --answers answer2label.txt)")
            return None, {}
        if len(answers) != A:
            raise ConversionError(f"the VQA head has {A} answers, the answer list {len(answers)}")
        task = VQAConfig(answers=tuple(answers), tokenizer=tokenizer)
    else:
        E = ours["vision_head.weight"].shape[0]
        ours["logit_scale"] = ours["logit_scale"].reshape(1)
        expected = {"vision_head.weight": (E, dim), "language_head.weight": (E, dim), "logit_scale": (1,)}
        task = RetrievalConfig(embed_dim=None if E == dim else E, tokenizer=tokenizer)
    theirs = {v: k for k, v in kinds[kind].items()}
    _check_shapes(ours, {k: torch.empty(s) for k, s in expected.items()}, f"the {kind} head", theirs.get)
    return task, ours


def _fit_text_length(task: Any, max_text_len: int) -> Any:
    """The task config with texts of up to 64 tokens (unilm's) or the model's limit."""
    if task is None:
        return None
    return dataclasses.replace(task, train=dataclasses.replace(task.train, max_len=min(64, max_text_len)))


def _unilm_heads(task_kind: str | None, heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table = {"vqa": VQA_HEAD, "retrieval": RETRIEVAL_HEAD}.get(task_kind or "")
    if table is None:
        return {}
    out = {theirs: heads[ours] for theirs, ours in table.items()}
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


# -- writing ---------------------------------------------------------------------------------------

def _check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty directory; choose another --dst")


def _write_dir(dst: Path, write) -> None:
    """Create ``dst`` atomically: ``write(tmp)`` fills a sibling temp folder, then it is renamed."""
    _check_destination(dst)
    tmp = dst.parent / f".tmp-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)


def from_beit3(src: str | os.PathLike, dst: str | os.PathLike, *, heads: int | None = None,
               image_size: int | None = None, tokenizer: str | None = None,
               tokenizer_layout: Literal["xlmr", "beit3", "auto"] = "xlmr", answers: str | None = None,
               trust_pickle: bool = False) -> ConversionReport:
    """Convert a torchscale ``BEiT3`` state dict or a unilm ``beit3`` checkpoint into a checkpoint
    directory of ours (``model.safetensors``, ``heads.safetensors``, ``config.yaml``,
    ``conversion.json``) that ``mmoe finetune --init`` and ``mmoe evaluate`` read.

    Args:
        heads: attention heads (default: width / 64).
        image_size: resize the vision positions to this image size (default: as trained).
        tokenizer: the tokenizer path recorded in the task config (default: ``beit3.spm``,
            the official one).
        tokenizer_layout: its id layout (default: ``xlmr``, the official one's).
        answers: unilm's ``answer2label.txt`` (or one answer per line) for a VQA head.
        trust_pickle: allow files that pickle Python objects besides tensors.
    """
    _check_destination(Path(dst))
    state, source_format = read_state_dict(src, trust_pickle=trust_pickle)
    backbone, head_state, others, unknown = _split(state)
    if unknown:
        raise ConversionError(f"{src}: keys that are neither BEiT-3 backbone weights nor a known unilm head: "
                              f"{_listing(unknown)}")
    cfg, trained_size, notes = infer_model_config(state, heads=heads, image_size=image_size)
    backbone["vision_embed.pos_embed"] = backbone["vision_embed.pos_embed"][OFFSET:][None]
    backbone["text_embed.pos_embed"] = backbone["text_embed.pos_embed"][OFFSET:][None]
    if cfg.image_size != trained_size:
        backbone["vision_embed.pos_embed"] = resize_vision_positions(backbone["vision_embed.pos_embed"],
                                                                     cfg.image_size // cfg.patch_size)
        notes.append(f"vision positions resized from {trained_size} px ({(trained_size // cfg.patch_size) ** 2} "
                     f"patches) to {cfg.image_size} px ({cfg.num_patches} patches), bicubic")
    model = cfg.build()
    _check_shapes(backbone, model.state_dict(), str(src), _their_name)
    load_weights(model, backbone, str(src))
    tok = TokenizerConfig(path=tokenizer or "beit3.spm", layout=tokenizer_layout)
    task, head_weights = _convert_heads(head_state, cfg.dim, read_answers(answers) if answers else None, tok, notes)
    if answers and task is None:
        notes.append("--answers was given but the checkpoint has no VQA head")
    if task is not None and tokenizer is None:
        notes.append(f"the {task.kind} config names the tokenizer 'beit3.spm' (xlmr layout); evaluating needs it "
                     f"there or --set task.tokenizer.path=<beit3.spm>")
    task = _fit_text_length(task, cfg.max_text_len)
    run_cfg = Config(model=cfg, task=task)
    report = ConversionReport(str(src), source_format, str(dst), task=None if task is None else task.kind,
                              not_converted={k: sorted(v) for k, v in others.items()}, notes=notes,
                              torchscale_config=torchscale_args(cfg), tokenizer=to_dict(tok))

    def write(tmp: Path) -> None:
        save_weights(model.state_dict(), tmp / MODEL_FILE, 0)
        save_weights(head_weights, tmp / HEADS_FILE, 0)
        (tmp / CONFIG_FILE).write_text(dump_config(run_cfg))
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1))

    _write_dir(Path(dst), write)
    return report


def _their_name(ours: str) -> str | None:
    """The torchscale name of one of our backbone weights."""
    return _POSITIONS_THEIRS.get(ours) or _rename(ours, _TO_THEIRS, _BRANCH_THEIRS)


# -- the reverse -----------------------------------------------------------------------------------

def torchscale_incompatibilities(cfg: Any) -> list[str]:
    """Config keys that keep a model of ours from having a torchscale ``BEiT3`` twin."""
    if not isinstance(cfg, MultiwayEncoderConfig):
        return [f"model.kind is {cfg.kind}, not multiway_encoder"]
    out = []
    if cfg.layout != "decoupled":
        out.append(f"model.layout is {cfg.layout!r} (torchscale's BEiT3 is the decoupled layout)")
    if cfg.moe_ffn is not None:
        out.append("model.moe_ffn is set (torchscale has no Multiway MoE)")
    for name in ("ffn", "vision_ffn", "text_ffn"):
        ffn = getattr(cfg, name)
        if ffn is None:
            continue
        if not isinstance(ffn, DenseFFNConfig) or ffn.activation != "gelu" or not ffn.sub_ln or not ffn.bias:
            out.append(f"model.{name} is not a dense GELU FFN with Sub-LN and biases")
        elif ffn.hidden_dim != (cfg.vision_ffn or cfg.text_ffn or cfg.ffn).hidden_dim:
            out.append(f"model.{name}.hidden_dim differs between branches (torchscale has one FFN width)")
    if cfg.norm != "layernorm":
        out.append(f"model.norm is {cfg.norm!r}, not layernorm")
    if not cfg.sub_ln:
        out.append("model.sub_ln is false (BEiT-3 uses Sub-LN)")
    if cfg.norm_eps != 1e-5:
        out.append(f"model.norm_eps is {cfg.norm_eps} (the FFN's Sub-LN uses 1e-5; torchscale uses one eps)")
    return out


def torchscale_args(cfg: MultiwayEncoderConfig) -> dict[str, Any]:
    """``torchscale.architecture.config.EncoderConfig`` keyword arguments of the same model."""
    return dict(vocab_size=cfg.vocab_size, multiway=True, img_size=cfg.image_size, patch_size=cfg.patch_size,
                in_chans=cfg.in_chans, encoder_embed_dim=cfg.dim, encoder_attention_heads=cfg.heads,
                encoder_ffn_embed_dim=(cfg.vision_ffn or cfg.ffn).hidden_dim, encoder_layers=cfg.depth,
                max_source_positions=cfg.max_text_len + OFFSET, normalize_output=cfg.normalize_output,
                no_output_layer=True, layernorm_embedding=False, layernorm_eps=cfg.norm_eps,
                drop_path_rate=cfg.drop_path)


def to_beit3(src: str | os.PathLike, dst: str | os.PathLike, *,
             fmt: Literal["torchscale", "unilm"] = "torchscale") -> ConversionReport:
    """Write a checkpoint of ours (dense, decoupled) as a torchscale ``BEiT3`` state dict, or as a
    unilm checkpoint (``{"model": ...}``, ``beit3.`` prefix, plus the VQA or retrieval head when
    the checkpoint has one), with ``torch.save`` to the file ``dst``; ``dst.json`` gets the report
    with the ``EncoderConfig`` arguments to build the model with, and a VQA head's answers go to
    ``dst.answer2label.txt``."""
    try:
        checkpoint = Checkpoint.open(src)
        cfg = checkpoint.config
        weights = checkpoint.weights()
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    problems = torchscale_incompatibilities(cfg.model)
    if problems:
        raise ConversionError(f"{checkpoint.path} has no torchscale BEiT3 layout: " + "; ".join(problems))
    out = {}
    for name, tensor in weights.items():
        theirs = _their_name(name)
        if theirs is None:
            raise ConversionError(f"{checkpoint.path}: no torchscale name for {name!r}")
        if name in POSITIONS.values():
            tensor = torch.cat([tensor.new_zeros(OFFSET, tensor.shape[-1]), tensor[0]])
        out[theirs] = tensor
    task_kind = cfg.task.kind if cfg.task is not None else None
    heads = _unilm_heads(task_kind, checkpoint.weights(HEADS_FILE)) if fmt == "unilm" else {}
    if fmt == "unilm":
        out = {"model": {**{UNILM_PREFIX + k: v for k, v in out.items()}, **heads}}
    report = ConversionReport(str(checkpoint.path), "multimodal_moe", str(dst), task=task_kind if heads else None,
                              torchscale_config=torchscale_args(cfg.model))
    if heads and task_kind == "vqa" and cfg.model.normalize_output:
        report.notes.append("unilm's VQA model has no final LayerNorm, this one does (beit3.encoder.layer_norm.*): "
                            "build unilm's model with normalize_output=True to use it")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if heads and task_kind == "vqa":  # the head's label order, in unilm's answer2label.txt format
        answers = Path(f"{dst}.answer2label.txt")
        answers.write_text("".join(json.dumps({"answer": a, "label": i}) + "\n"
                                   for i, a in enumerate(answer_vocab(cfg.task))), encoding="utf-8")
        report.notes.append(f"VQA answers in head order: {answers}")
    tmp = dst.parent / f".tmp-{dst.name}"
    torch.save(out, tmp)
    os.replace(tmp, dst)
    Path(f"{dst}.json").write_text(json.dumps(asdict(report), indent=1))
    return report
