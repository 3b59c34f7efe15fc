"""Expert usage over a held-out corpus, as the MH-MoE paper measures expert activation
(arXiv 2404.15045, Fig. 1a and 4: per layer, the share of experts that the held-out tokens
use).

While an evaluation runs, every routed FFN (top-k and Multi-Head MoE) adds its
``tokens_per_expert`` to a per-layer, per-branch count (on the device; summed over ranks and
read once at the end).
For each layer and Multiway branch the report gives each expert's share of the routed
assignments (sub-tokens for MH-MoE) and the **activation ratio**: the share of experts whose
share exceeds ``threshold / E``, i.e. ``threshold`` of the uniform share, the layer's own
``activation_threshold`` (default 0.1: an expert that gets under a tenth of a fair share counts
as idle). Mixture of Tokens sends every token to every expert, so it has no such count.
``expert_usage.png`` is the expert x layer heatmap of share x E (1 = uniform).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimodal_moe.distributed.env import current
from multimodal_moe.layers.ffn import FFNOutput
from multimodal_moe.plots import figure

__all__ = ["ExpertUsage", "record_expert_usage"]

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.ffn(?:\.(\w+))?$")


class ExpertUsage:
    """Counts of routed assignments per expert, per ``layer<i>.<branch>`` (the metrics' keys)."""

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.thresholds: dict[str, float] = {}

    def add(self, key: str, module: nn.Module, output: Any) -> None:
        if not isinstance(output, FFNOutput) or "tokens_per_expert" not in output.stats:
            return
        counts = output.stats["tokens_per_expert"].detach().double()
        self.counts[key] = counts if key not in self.counts else self.counts[key] + counts
        self.thresholds[key] = float(module.cfg.activation_threshold)

    def report(self) -> dict[str, Any]:
        """``{"layers": {key: {"load", "activation_ratio", "experts_used", "experts", "threshold"}},
        "activation_ratio": mean over layers, "definition": ...}``; empty without routed layers."""
        if not self.counts:
            return {}
        keys = sorted(self.counts, key=lambda k: (int(k.split(".")[0][5:]), k))
        flat = torch.cat([self.counts[k].reshape(-1) for k in keys])
        current().sum_(flat)  # every rank scored its share of the corpus
        values = flat.tolist()  # one device read
        layers, at = {}, 0
        for key in keys:
            counts = values[at:at + self.counts[key].numel()]
            at += len(counts)
            total, experts, threshold = sum(counts) or 1.0, len(counts), self.thresholds[key]
            load = [c / total for c in counts]
            used = sum(share > threshold / experts for share in load)
            layers[key] = {"load": [round(x, 6) for x in load], "experts": experts, "experts_used": used,
                           "activation_ratio": used / experts, "threshold": threshold,
                           "assignments": int(sum(counts))}
        mean = sum(v["activation_ratio"] for v in layers.values()) / len(layers)
        return {"activation_ratio": mean, "layers": layers,
                "definition": "per layer and branch, the share of experts whose share of the held-out routed "
                              "assignments exceeds threshold / E"}

    def plot(self, report: dict[str, Any], path: Path) -> Path:
        """The expert x layer heatmap of ``report`` (share x E) to ``path``."""
        import numpy as np

        keys = list(report["layers"])
        width = max(v["experts"] for v in report["layers"].values())
        grid = np.full((len(keys), width), np.nan)
        for row, key in enumerate(keys):
            load = report["layers"][key]["load"]
            grid[row, :len(load)] = np.array(load) * len(load)
        with figure(path, figsize=(1.5 + 0.25 * width, 1.2 + 0.4 * len(keys))) as (fig, ax):
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(np.nanmax(grid))),
                              interpolation="nearest")
            ax.set_yticks(range(len(keys)), [f"{k} ({report['layers'][k]['experts_used']}/"
                                             f"{report['layers'][k]['experts']})" for k in keys], fontsize=8)
            ax.set_xlabel("expert")
            ax.set_title(f"held-out expert usage, activation ratio {report['activation_ratio']:.2f}", fontsize=9)
            fig.colorbar(image, ax=ax, label="share x E")
        return path


@contextlib.contextmanager
def record_expert_usage(model: nn.Module) -> Iterator[ExpertUsage]:
    """Counts what every routed FFN of ``model`` does inside the block."""
    usage, handles = ExpertUsage(), []
    for name, module in model.named_modules():
        if (match := _NAME.search(name)) and hasattr(getattr(module, "cfg", None), "activation_threshold"):
            key = f"layer{match[1]}.{match[2] or 'shared'}"
            handles.append(module.register_forward_hook(
                lambda mod, args, out, key=key: usage.add(key, mod, out)))
    try:
        yield usage
    finally:
        for handle in handles:
            handle.remove()
