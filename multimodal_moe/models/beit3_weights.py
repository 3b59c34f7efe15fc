"""The ``decoupled`` Multiway encoder's weights under official BEiT-3 names, both ways.

Image as a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks
(Wang et al., arXiv 2208.10442), as released: torchscale's ``BEiT3`` (``text_embed.weight``,
``vision_embed.*``, ``encoder.*``) and unilm's ``beit3`` checkpoints (that state dict under
``model`` or ``module``, prefixed ``beit3.``, a task's head beside it). This module is the
backbone's half of the contract, in the spirit of timm's ``checkpoint_filter_fn``: reading such
files, the name of every weight both ways, the encoder config read off the weights, and the
torchscale ``EncoderConfig`` of one of ours. Task heads declare their unilm names themselves
(:class:`HeadMap`, from ``TaskConfig.unilm_heads``); ``eval_tasks.beit3_convert`` puts the two
together into checkpoint folders.

The decoupled layout is torchscale's: every projection and norm has a vision branch (torchscale's
``A``) and a text branch (``B``), so the weights map one to one. Two things change on the way:

- positions: torchscale keeps fairseq's offset of 2 (rows 0 and 1 of both tables are never
  read; each modality starts at row 2). Ours start at row 0, so rows 0-1 are dropped, and zero
  rows are put back when writing torchscale's layout;
- the vision table is resized (bicubic over the patch grid, no antialiasing, the CLS row kept)
  when a new image size is asked for, as unilm's ``load_model_and_may_interpolate`` does.

The size is read off the weights. The number of attention heads is not in them: it defaults to
D / 64 (BEiT-3 base and large) and can be given. Anything else (a shape that does not fit the
inferred size, MoE keys from another codebase, a missing layer) is a :class:`ConversionError`
naming the keys, never a partial load.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from ..layers.ffn import DenseFFNConfig
from ..layers.multiway import TEXT, VISION
from ..state_dicts import compare_state, listing
from .multiway_encoder import MultiwayEncoder, MultiwayEncoderConfig

__all__ = ["ConversionError", "HeadMap", "HeadsNotConverted", "check_shapes", "encoder_to_torchscale",
           "infer_model_config", "listing", "load_encoder", "our_name", "read_state_dict", "resize_vision_positions",
           "split_backbone", "their_name", "torchscale_args", "torchscale_incompatibilities"]

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
_MOE = re.compile(r"(^|\.)(moe_layer|experts|gate)\.")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending keys."""


class HeadsNotConverted(ConversionError):
    """A task head that needs what was not given to convert (a VQA head its answer list): the
    backbone converts without it, and the message says what is missing."""


@dataclass(frozen=True)
class HeadMap:
    """A task's head weights under unilm's names (what ``TaskConfig.unilm_heads`` declares).

    Attributes:
        names: unilm's name -> ours, of every head weight.
        scalars: unilm's names of weights it keeps 0-d and we keep with shape (1,), since
            FSDP2 shards no scalars (a retrieval logit scale).
        unless: prefixes of unilm keys whose presence means these keys are another model's
            (captioning's ``mlm_head`` beside a ``mim_head`` is pretraining's).
    """

    names: Mapping[str, str]
    scalars: frozenset[str] = field(default_factory=frozenset)
    unless: tuple[str, ...] = ()

    def to_ours(self, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.names[k]: v.reshape(1) if k in self.scalars else v for k, v in theirs.items()}

    def to_theirs(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: ours[v].reshape(()) if k in self.scalars else ours[v] for k, v in self.names.items()}

    def their_name(self, ours: str) -> str | None:
        return next((theirs for theirs, name in self.names.items() if name == ours), None)


# -- names -----------------------------------------------------------------------------------------

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


def our_name(theirs: str) -> str | None:
    """Our name of a torchscale backbone weight; None if it is not one."""
    return POSITIONS.get(theirs) or _rename(theirs, _TO_OURS, _BRANCH_OURS)


def their_name(ours: str) -> str | None:
    """The torchscale name of one of our backbone weights; None if it has none."""
    return _POSITIONS_THEIRS.get(ours) or _rename(ours, _TO_THEIRS, _BRANCH_THEIRS)


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
        raise ConversionError(f"{path}: entries that are not tensors: {listing([str(k) for k in not_tensors])}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    prefixed = [k for k in state if k.startswith(UNILM_PREFIX)]
    if prefixed:
        clash = [k for k in prefixed if k.removeprefix(UNILM_PREFIX) in state]
        if clash:
            raise ConversionError(f"{path} holds backbone weights both with and without the {UNILM_PREFIX!r} "
                                  f"prefix: {listing(clash)}")
        state = {k.removeprefix(UNILM_PREFIX): v for k, v in state.items()}
    return state, ("unilm" if wrapped or prefixed else "torchscale")


def split_backbone(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the backbone's weights, everything else: a unilm head's), both under torchscale's names;
    a Mixture-of-Experts checkpoint is refused."""
    moe = [k for k in state if _MOE.search(k)]
    if moe:
        raise ConversionError("this is a Mixture-of-Experts checkpoint from another codebase (torchscale X-MoE "
                              "keys); only dense BEiT-3 checkpoints convert. MoE keys: " + listing(moe))
    backbone = {k: v for k, v in state.items() if our_name(k) is not None}
    return backbone, {k: v for k, v in state.items() if k not in backbone}


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
    (bicubic, in fp32, without antialiasing, as unilm resizes it); the CLS row is kept."""
    return resample_abs_pos_embed(table_1TD, [grid, grid], num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str,
                 name_of: Callable[[str], str | None]) -> None:
    """Every expected key present with its shape and nothing more; errors name the keys as the
    source file does (``name_of``: our name -> the source's)."""
    if mismatch := compare_state(state, expected, name_of=name_of):
        raise ConversionError(f"{what} does not fit the inferred model; {mismatch}")


def load_encoder(backbone: dict[str, torch.Tensor], *, heads: int | None = None, image_size: int | None = None,
                 source: str = "the checkpoint") -> tuple[MultiwayEncoder, list[str]]:
    """The decoupled encoder holding a torchscale-named backbone (:func:`split_backbone`), its
    vision positions resized to ``image_size`` if given; and notes for the user."""
    cfg, trained_size, notes = infer_model_config(backbone, heads=heads, image_size=image_size)
    ours = {our_name(k): v for k, v in backbone.items()}
    for name in POSITIONS.values():
        ours[name] = ours[name][OFFSET:][None]
    if cfg.image_size != trained_size:
        ours["vision_embed.pos_embed"] = resize_vision_positions(ours["vision_embed.pos_embed"],
                                                                 cfg.image_size // cfg.patch_size)
        notes.append(f"vision positions resized from {trained_size} px ({(trained_size // cfg.patch_size) ** 2} "
                     f"patches) to {cfg.image_size} px ({cfg.num_patches} patches), bicubic")
    model = cfg.build()
    check_shapes(ours, {k: tuple(v.shape) for k, v in model.state_dict().items()}, source, their_name)
    model.load_state_dict(ours)
    return model, notes


# -- the reverse -----------------------------------------------------------------------------------

def encoder_to_torchscale(weights: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Our decoupled encoder's weights under torchscale's names, the position tables with
    fairseq's two unused rows put back (zeros)."""
    out = {}
    for name, tensor in weights.items():
        theirs = their_name(name)
        if theirs is None:
            raise ConversionError(f"{source}: no torchscale name for {name!r}")
        if name in _POSITIONS_THEIRS:
            tensor = torch.cat([tensor.new_zeros(OFFSET, tensor.shape[-1]), tensor[0]])
        out[theirs] = tensor
    return out


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
