"""A forward/backward smoke run of any preset on synthetic inputs.

Not training: it checks that a config builds, that every input path runs (for the encoder:
masked images alone, padded text alone, and image-text pairs; for the LM: padded text), that
nothing is NaN, that every parameter receives a gradient, and how fast a step is. The loss is
a stand-in (mean square of the hidden states plus the FFN aux losses).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .models import DecoderLMConfig, ModelConfig, ModelOutput, MultiwayEncoderConfig

__all__ = ["SmokeReport", "run_smoke", "synthetic_inputs"]


def synthetic_inputs(cfg: ModelConfig, batch_size: int = 2, text_len: int = 8,
                     generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """Model keyword arguments that together exercise every input path of ``cfg``'s model.

    Text batches are right-padded by one token in their last row.
    """
    text_len = min(text_len, cfg.max_text_len if isinstance(cfg, MultiwayEncoderConfig) else cfg.max_seq_len)
    ids_BL = torch.randint(0, cfg.vocab_size, (batch_size, text_len), generator=generator)
    padding_BL = torch.zeros(batch_size, text_len, dtype=torch.bool)
    if text_len > 1:
        padding_BL[-1, -1] = True
    if isinstance(cfg, DecoderLMConfig):
        return [dict(ids_BT=ids_BL, padding_mask_BT=padding_BL)]
    images_BCHW = torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=generator)
    image_mask_BP = torch.rand(batch_size, cfg.num_patches, generator=generator) < 0.4
    image_mask_BP[:, 0] = True  # at least one masked patch, so the mask token is used
    return [
        dict(images=images_BCHW, image_mask=image_mask_BP),
        dict(text_ids=ids_BL, text_padding_mask=padding_BL),
        dict(images=images_BCHW, text_ids=ids_BL, text_padding_mask=padding_BL),
    ]


def smoke_loss(output: ModelOutput) -> torch.Tensor:
    """Stand-in loss over real (non-padded) positions."""
    sq_BT = output.hidden.float().pow(2).mean(-1)
    if output.token_mask is not None:
        sq_BT = sq_BT[output.token_mask]
    return sq_BT.mean() + output.aux_loss


@dataclass
class SmokeReport:
    parameters: int
    losses: list[float]
    seconds_per_step: float
    params_without_grad: list[str]

    @property
    def ok(self) -> bool:
        return all(math.isfinite(x) for x in self.losses) and not self.params_without_grad


def run_smoke(model: nn.Module, cfg: ModelConfig, *, steps: int = 3, batch_size: int = 2, lr: float = 1e-3,
              seed: int = 0, progress: bool = False) -> SmokeReport:
    """``steps`` AdamW steps of :func:`smoke_loss` on fixed synthetic inputs."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    inputs = [{k: v.to(device) for k, v in kw.items()} for kw in synthetic_inputs(cfg, batch_size, generator=generator)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, without_grad, start = [], set(), time.perf_counter()
    steps_iter = range(steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, desc="smoke", unit="step")
    for _ in steps_iter:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(smoke_loss(model(**kw)) for kw in inputs)
        loss.backward()
        without_grad.update(n for n, p in model.named_parameters() if p.grad is None or not p.grad.any())
        optimizer.step()
        losses.append(loss.item())
        if progress:
            steps_iter.set_postfix(loss=f"{losses[-1]:.4f}")
    elapsed = (time.perf_counter() - start) / max(steps, 1)
    return SmokeReport(sum(p.numel() for p in model.parameters()), losses, elapsed, sorted(without_grad))
