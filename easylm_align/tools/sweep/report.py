"""The sweep's results: one row per value in `sweep.csv`, `sweep.md` and `sweep.png`."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from easylm_align.tools.sweep.state import METRICS

CSV_COLUMNS = ("param", "value", "status", "final_step", "final_loss", "task", "num_examples", *METRICS,
               "run_dir", "note")


@dataclass
class Result:
    """What became of one value: status is pending, ok, train_failed or eval_failed."""
    value: str
    run_dir: Path
    status: str = "pending"
    final_step: Optional[int] = None
    final_loss: Optional[float] = None
    aggregate: dict = field(default_factory=dict)
    note: str = ""


def _row(param: str, r: Result) -> dict[str, Any]:
    agg = r.aggregate
    return dict(param=param, value=r.value, status=r.status, final_step=r.final_step, final_loss=r.final_loss,
                task=agg.get("task", ""), num_examples=agg.get("num_examples"),
                **{k: agg.get(k) for k in METRICS}, run_dir=str(r.run_dir), note=r.note)


def write_summary(sweep_dir: Path, param: str, results: Sequence[Result], task: str) -> None:
    rows = [_row(param, r) for r in results]
    with open(sweep_dir / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    (sweep_dir / "sweep.md").write_text(markdown_table(param, rows, task), encoding="utf-8")
    write_plot(sweep_dir / "sweep.png", param, results, task)


def markdown_table(param: str, rows: Sequence[dict], task: str) -> str:
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    header = [f"`{param}`", "status", "final step", "final loss"]
    if task:
        header += ["EM", "F1", "EM (multilingual)", "F1 (multilingual)", "n"]
    lines = [f"Sweep of `--{param}`" + (f", evaluated on `{task}`" if task else " (not evaluated)") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["value"], row["status"], fmt(row["final_step"], "d"), fmt(row["final_loss"], ".4f")]
        if task:
            cells += [fmt(row[k], ".2f") for k in METRICS] + [fmt(row["num_examples"], "d")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    notes = [f"* `{row['value']}`: {row['note']}" for row in rows if row["status"] != "ok" and row["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _x_positions(values: Sequence[str]) -> tuple[list[float], bool]:
    """Numeric values are plotted at their value; anything else at 0, 1, 2, ... in the given order."""
    try:
        xs = [float(v) for v in values]
        if all(math.isfinite(x) for x in xs):
            return xs, True
    except ValueError:
        pass
    return [float(i) for i in range(len(values))], False


def write_plot(path: Path, param: str, results: Sequence[Result], task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    xs, numeric = _x_positions([r.value for r in results])
    order = sorted(range(len(results)), key=lambda i: xs[i])
    x = [xs[i] for i in order]
    nan = float("nan")
    series = lambda get: [nan if (v := get(results[i])) is None else v for i in order]
    fig = Figure(figsize=(11, 4.2))
    ax_metric, ax_loss = fig.subplots(1, 2)
    if task and any(r.aggregate for r in results):
        for key, label, style in (("exact_match", "EM", "o-"), ("f1", "F1", "s-"),
                                  ("multilingual_exact_match", "EM (multilingual)", "o--"),
                                  ("multilingual_f1", "F1 (multilingual)", "s--")):
            ax_metric.plot(x, series(lambda r: r.aggregate.get(key)), style, label=label,
                           alpha=0.6 if key.startswith("multilingual") else 1.0)
        top = max([v for r in results for k, v in r.aggregate.items() if k in METRICS] + [0.0])
        ax_metric.set_ylim(0, max(1.1 * top, 1.0))
        ax_metric.set_ylabel(f"{task} (%)")
        ax_metric.legend(fontsize="small")
        ax_metric.set_title(f"{task} against {param.rsplit('.', 1)[-1]}")
    else:
        ax_metric.text(0.5, 0.5, "not evaluated" if not task else "no evaluation results yet",
                       ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.set_title("QA metrics")
    ax_loss.plot(x, series(lambda r: r.final_loss), "o-", color="tab:red")
    ax_loss.set_ylabel("final train loss")
    ax_loss.set_title(f"final train loss against {param.rsplit('.', 1)[-1]}")
    positive = numeric and all(v > 0 for v in x)
    for ax in (ax_metric, ax_loss):
        ax.set_xlabel(param)
        ax.grid(True, alpha=0.3)
        if positive and len(x) > 1 and max(x) / min(x) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, [results[i].value for i in order], rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
