"""``mmoe inspect <run-dir>``: what a run did, as a table and as plots.

Reads the run's ``metrics.jsonl`` and writes into ``<run-dir>/plots/``:

- ``loss.png``: the total loss and every per-part loss against the step;
- ``expert_load.png``: per MoE layer and branch, a heatmap of each expert's share of the routed
  tokens over training (x E, so 1 is perfect balance), one log step per column;

and returns a text summary: first and last value of every logged number, throughput, skipped
steps and samples, and per MoE layer the last interval's load imbalance, dropped fraction and
activation ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plots import figure

__all__ = ["inspect_run", "read_metrics"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run directory of mmoe pretrain?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e})") from None
    if not records:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return records


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(records: list[dict[str, Any]]) -> str:
    first, last = records[0], records[-1]
    rows = [["metric", f"step {first['step']}", f"step {last['step']}"]]
    for key, value in _scalars(last).items():
        start = first.get(key)
        rows.append([key, f"{start:.4g}" if isinstance(start, (int, float)) else "-", f"{value:.4g}"])
    out = [_table(rows)]
    skipped = {stream: reasons for stream, reasons in last.get("skipped_samples", {}).items() if reasons}
    out.append(f"skipped samples: {json.dumps(skipped) if skipped else 'none'}")
    moe = last.get("moe")
    if moe:
        rows = [["MoE layer.branch", "max load (x E)", "dropped", "active experts"]]
        for key, entry in moe.items():
            rows.append([key, f"{entry['max_load']:.3f}" if "max_load" in entry else "-",
                         f"{entry['dropped_fraction']:.3f}" if "dropped_fraction" in entry else "-",
                         f"{entry['activation_ratio']:.3f}" if "activation_ratio" in entry else "-"])
        out.append(f"MoE statistics over the last log interval (step {last['step']}):\n{_table(rows)}")
    return "\n\n".join(out)


def plot(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import numpy as np

    steps = [r["step"] for r in records]
    # every loss any line has (an interval of skipped steps logs null)
    losses = list(dict.fromkeys(k for r in records for k in _scalars(r) if k == "loss" or k.endswith("_loss")))
    written = [out_dir / "loss.png"]
    with figure(written[0], figsize=(7, 4)) as (_, ax):
        for key in losses:
            ax.plot(steps, [r.get(key, np.nan) for r in records], label=key, linewidth=2 if key == "loss" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    keys = [k for k in records[-1].get("moe", {}) if "load" in records[-1]["moe"][k]]
    if keys:
        written.append(out_dir / "expert_load.png")
        with figure(written[-1], len(keys), 1, figsize=(7, 1.2 + 1.6 * len(keys)), squeeze=False) as (fig, axes):
            for ax, key in zip(axes[:, 0], keys):
                loads = [r.get("moe", {}).get(key, {}).get("load") for r in records]
                experts = len(records[-1]["moe"][key]["load"])
                grid = np.array([row if row else [np.nan] * experts for row in loads]).T * experts
                image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, np.nanmax(grid)),
                                  extent=(steps[0], steps[-1], experts - 0.5, -0.5), interpolation="nearest")
                ax.set_ylabel(f"{key}\nexpert", fontsize=8)
                fig.colorbar(image, ax=ax, label="load x E")
            axes[-1, 0].set_xlabel("step")
    return written


def inspect_run(run_dir: str | Path, *, plots: bool = True) -> str:
    """The summary text of a run; with ``plots``, also writes its PNGs (listed at the end)."""
    records = read_metrics(run_dir)
    text = summarize(records)
    if plots:
        written = plot(records, Path(run_dir) / "plots")
        text += "\n\nplots: " + ", ".join(str(p) for p in written)
    return text
