"""multimodal_moe: BEiT-3-style Multiway Transformers and decoder LMs with Mixture-of-Experts FFNs.

Shape vocabulary, used in tensor names (``x_BTD``, ``w1_EDF``) and shape comments everywhere:

    B batch            T tokens (sequence)     D model dim        F ffn (hidden) dim
    E experts          K top-k                 H heads            d head dim (D / H)
    G group size (MoT) P image patches         L text tokens      V vocabulary
    C image channels   N layers

Public API (stable)::

    import multimodal_moe as mm
    cfg = mm.load_config("configs/beit3/debug.yaml", overrides=["model.depth=4"])  # strict
    model = mm.build_model(cfg)
    out = model(images=x_BCHW, text_ids=ids_BL, text_padding_mask=pad_BL)         # any subset
    out.hidden, out.aux_loss, out.moe_stats
    model = mm.load_checkpoint("runs/x/checkpoints/latest")                       # eval mode
    vqa = mm.load_checkpoint("runs/vqa"); vqa.predict(["x.jpg"], ["what is it?"])   # a fine-tuned task
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import Config, dump_config, list_presets, load_config
from .configurable import ConfigError
from .layers.ffn import FFNConfig, FFNOutput
from .models import ModelConfig, ModelOutput, build_model

__all__ = ["Config", "ConfigError", "FFNConfig", "FFNOutput", "ModelConfig", "ModelOutput", "build_model",
           "dump_config", "list_presets", "load_checkpoint", "load_config"]

__version__ = "0.1.0"


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """What a checkpoint (a ``step_*`` dir, ``checkpoints/latest`` or a run dir) holds, built from
    the config saved with it, in eval mode:

    - a fine-tuned downstream task (VQA, retrieval): the task, its backbone (``.model``) and
      heads, with its inference methods (``vqa.predict(images, questions)``,
      ``retrieval.encode_image(images)`` / ``.encode_text(texts)`` / ``.rank(image, captions)``)
      and the preprocessing it was trained with;
    - any other (pretraining, LM): the backbone; ``model.cfg`` is its model config.

    Raises:
        multimodal_moe.training.CheckpointError: the path is not a checkpoint, or a file of it
            is missing or unreadable.
    """
    from .training.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(path)
    cfg = checkpoint.config
    if cfg.task is not None and type(cfg.task).downstream:
        return checkpoint.load_task(cfg).to(device).eval()
    model = build_model(cfg)
    checkpoint.load_model_into(model)
    return model.to(device).eval()
