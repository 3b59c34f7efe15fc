"""``mmoe compare RUN_DIR...``: several runs side by side, as one table and as plots.

Reads each run's ``metrics.jsonl``, ``config.yaml`` and, when ``mmoe evaluate`` has scored it,
``results.json`` (``<run>/results.json``, the default ``--out``, else the newest
``<run>/*/results.json``), and writes into the output folder (default ``compare/``):

- ``compare.json``: the table as data, one object per run (``null`` where a run has no value);
- ``loss.png``: the training loss against the step, one line per run, with a star at the
  evaluated step for the held-out loss of a run that has one;
- ``activation_ratio.png``, ``dropped_fraction.png``, ``load_balance.png``: the MoE statistic
  against the step, averaged over the run's MoE layers and branches (``load_balance`` is
  ``max_load``, the busiest expert's share of the routed tokens x E: 1 is perfect balance).
  Runs that do not log the statistic (dense models; Mixture of Tokens, which routes every token
  to every expert) have no line, and a plot no run has data for is not written.

The table's columns: the label; the model (kind, depth x dim) and its sparse FFN (kind and
router, experts E, top-k K; ``dense`` when it has none) from ``config.yaml``; the last logged
step; the final training loss, the mean of the last :data:`FINAL_INTERVALS` logged intervals
with a finite loss (so one noisy interval does not decide it); the held-out loss: for a language
model ln of the evaluated perplexity (mean negative log-likelihood per token, in nats, as the LM
task's ``lm_loss``), for masked data modeling the evaluated ``loss`` (the weighted masked-part
losses, the training objective without auxiliary losses); the perplexity (LM only); and at the
last log step, averaged over the MoE layers and branches, the activation ratio, the dropped
fraction and the max load; and the activation ratio over the held-out data that ``mmoe
evaluate`` measured (``expert_usage``), the one MH-MoE (arXiv 2404.15045) reports.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .inspect import _table, read_metrics
from .plots import figure

__all__ = ["FINAL_INTERVALS", "compare_runs", "format_table"]

FINAL_INTERVALS = 3
MOE_STATS = {"activation_ratio": "activation ratio", "dropped_fraction": "dropped fraction",
             "max_load": "max load (x E)"}
PLOT_NAMES = {"activation_ratio": "activation_ratio.png", "dropped_fraction": "dropped_fraction.png",
              "max_load": "load_balance.png"}
COLUMNS = {"label": "run", "model": "model", "ffn": "ffn", "experts": "E", "top_k": "K", "steps": "steps",
           "train_loss": "train loss", "heldout_loss": "held-out loss", "perplexity": "perplexity",
           "activation_ratio": "active", "dropped_fraction": "dropped", "max_load": "max load",
           "heldout_activation": "held-out active"}


def _number(value: Any) -> float:
    """A logged value as a float; NaN for a skipped interval's ``null`` (or ``"nan"``)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _moe_mean(record: dict[str, Any], stat: str) -> float:
    """``stat`` averaged over the MoE layers and branches of one log line that have it; NaN if none."""
    values = [_number(entry[stat]) for entry in record.get("moe", {}).values() if stat in entry]
    return sum(values) / len(values) if values else math.nan


def _or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ffn_name(ffn: dict[str, Any]) -> str:
    """kind/router, and the score and routing where they are not the defaults (softmax, token
    choice): ``topk_moe/xmoe``, ``topk_moe/softmax/sigmoid``, ``topk_moe/softmax/expert_choice``."""
    parts = [ffn[k] for k in ("kind", "router") if k in ffn]
    parts += [ffn[k] for k, default in (("score", "softmax"), ("routing", "token_choice"))
              if ffn.get(k, default) != default]
    return "/".join(map(str, parts))


def _model_summary(run_dir: Path) -> dict[str, Any]:
    """Model kind and size and the sparse FFN (kind/router, experts, top-k) from ``config.yaml``;
    with several different sparse FFNs, their kinds joined by ``+`` and no expert count or top-k."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {"model": None, "ffn": None, "experts": None, "top_k": None}
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    ffns = [v for k, v in sorted(model.items(), key=lambda kv: kv[0] != "moe_ffn")
            if k.endswith("ffn") and isinstance(v, dict) and v.get("kind", "dense") != "dense"]
    sparse = list(dict.fromkeys((_ffn_name(f), f.get("num_experts"), f.get("top_k")) for f in ffns))
    return {"model": f"{model.get('kind', '?')} {model.get('depth', '?')}x{model.get('dim', '?')}",
            "ffn": " + ".join(kind for kind, _, _ in sparse) or "dense",
            "experts": sparse[0][1] if len(sparse) == 1 else None, "top_k": sparse[0][2] if len(sparse) == 1 else None}


def _results(run_dir: Path) -> Path | None:
    """The run's ``results.json`` (see the module docstring), or None."""
    if (run_dir / "results.json").is_file():
        return run_dir / "results.json"
    found = sorted(run_dir.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _heldout(path: Path | None, last_step: int) -> dict[str, Any]:
    """From a ``results.json``: ``heldout_loss``, ``perplexity`` (None but for a language model),
    ``heldout_step`` (that of the checkpoint it names, ``.../step_0000400``, else the run's last
    step; None without a held-out loss) and ``heldout_activation`` (the expert activation ratio
    over the held-out data, None without routed experts); all None without the file."""
    found = dict.fromkeys(("heldout_loss", "perplexity", "heldout_step", "heldout_activation"))
    if path is None:
        return found
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); re-run mmoe evaluate or delete it") from None
    match = re.search(r"step_(\d+)$", str(results.get("checkpoint", "")))
    perplexity, loss = results.get("perplexity"), results.get("loss")
    if isinstance(perplexity, (int, float)) and perplexity > 0:
        found.update(heldout_loss=math.log(perplexity), perplexity=float(perplexity))
    elif isinstance(loss, (int, float)) and math.isfinite(loss):
        found["heldout_loss"] = float(loss)
    if found["heldout_loss"] is not None:
        found["heldout_step"] = int(match[1]) if match else last_step
    found["heldout_activation"] = results.get("expert_usage", {}).get("activation_ratio")
    return found


def _labels(run_dirs: list[Path], labels: list[str] | None) -> list[str]:
    if labels is None:
        names = [p.name for p in run_dirs]
        labels = names if len(set(names)) == len(names) else [str(p) for p in run_dirs]
        if len(set(labels)) < len(labels):
            raise ValueError(f"a run directory is given twice: {[str(p) for p in run_dirs]}")
        return labels
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels {labels} for {len(run_dirs)} run directories; give one label per run")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"labels must differ, {repeated} is given more than once")
    return labels


def _row(run_dir: Path, label: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-1]
    losses = [x for x in (_number(r.get("loss")) for r in records) if math.isfinite(x)][-FINAL_INTERVALS:]
    results = _results(run_dir)
    return {"label": label, "run_dir": str(run_dir), **_model_summary(run_dir), "steps": last["step"],
            "train_loss": sum(losses) / len(losses) if losses else None, **_heldout(results, last["step"]),
            "results": str(results) if results else None,
            **{stat: _or_none(_moe_mean(last, stat)) for stat in MOE_STATS}}


def _plot(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]], out_dir: Path) -> list[Path]:
    written = [out_dir / "loss.png"]
    with figure(written[0], figsize=(7, 4)) as (_, ax):
        for i, (row, records) in enumerate(runs):
            ax.plot([r["step"] for r in records], [_number(r.get("loss")) for r in records], color=f"C{i}",
                    label=row["label"])
            if row["heldout_loss"] is not None:
                ax.plot([row["heldout_step"]], [row["heldout_loss"]], "*", color=f"C{i}", markersize=12,
                        label=f"{row['label']} (held-out)")
        ax.set(xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for stat, name in PLOT_NAMES.items():
        curves = [(i, row, [r["step"] for r in records], [_moe_mean(r, stat) for r in records])
                  for i, (row, records) in enumerate(runs)]
        curves = [c for c in curves if any(math.isfinite(v) for v in c[3])]
        if not curves:
            continue
        written.append(out_dir / name)
        with figure(written[-1], figsize=(7, 4)) as (_, ax):
            for i, row, steps, values in curves:
                ax.plot(steps, values, color=f"C{i}", label=row["label"])
            if stat == "max_load":
                ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="balanced")
            ax.set(xlabel="step", ylabel=f"{MOE_STATS[stat]}, mean over MoE layers")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return written


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path = "compare",
                 labels: list[str] | None = None) -> dict[str, Any]:
    """Compare ``run_dirs``: writes ``compare.json`` and the plots into ``out_dir`` and returns
    what ``compare.json`` holds: ``{"runs": [one row per run], "final_intervals", "plots"}``.

    Args:
        run_dirs: run directories of ``mmoe pretrain`` (or ``finetune``), in table order.
        out_dir: folder to write into (made if missing).
        labels: a distinct name per run (default: the folders' names, or their paths where the
            names repeat).

    Raises:
        FileNotFoundError: naming a run directory without ``metrics.jsonl``.
        ValueError: no runs, a label count other than the run count, repeated labels, or an
            unreadable ``metrics.jsonl`` / ``results.json``.
    """
    if not run_dirs:
        raise ValueError("no run directories to compare; give one or more")
    paths = [Path(d) for d in run_dirs]
    runs = []
    for path, label in zip(paths, _labels(paths, labels)):
        records = read_metrics(path)
        runs.append((_row(path, label, records), records))
    out_dir = Path(out_dir)
    plots = _plot(runs, out_dir)
    summary = {"runs": [row for row, _ in runs], "final_intervals": FINAL_INTERVALS,
               "plots": [str(p) for p in plots]}
    (out_dir / "compare.json").write_text(json.dumps(summary, indent=1))
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The rows of :func:`compare_runs`'s summary as aligned plain text, ``-`` for no value."""
    return _table([list(COLUMNS.values()), *([_cell(row[key]) for key in COLUMNS] for row in summary["runs"])])
