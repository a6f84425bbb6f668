"""The per-round table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _auroc(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    console = Console()
    rounds = summary.get("rounds")
    if not rounds:
        console.print({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
        console.print(f"artifacts: {run_dir}")
        return
    val = summary.get("num_val") or 0
    title = (
        f"{summary['stage']} on {summary.get('dataset')}: {summary.get('num_labelled')} labelled, "
        + (f"{val} val, " if val else "")
        + f"{summary.get('num_unlabelled')} unlabelled"
    )
    table = Table(title=title)
    # The architecture per round, where the rounds differ (a student larger than its teacher).
    networks = [r.get("model") for r in rounds]
    show_networks = len({n for n in networks if n}) > 1
    columns = ["round", "model", *(["network"] if show_networks else []), "val acc"]
    columns += ["test acc", "bal acc", "pseudo-labels", "pseudo acc"]
    if not val:
        columns.remove("val acc")
    columns.insert(columns.index("pseudo acc") + 1, "class coverage min/max")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rounds:
        cov = [c for c in (r.get("per_class_coverage") or []) if c is not None]
        role = (
            "teacher"
            if r["round"] == 0 and summary["stage"] == "selftrain"
            else ("student" if summary["stage"] == "selftrain" else summary["stage"])
        )
        row = [
            str(r["round"]),
            role,
            *([str(r.get("model") or "–")] if show_networks else []),
            *([_pct(r.get("val_accuracy"))] if val else []),
            _pct(r.get("test_accuracy")),
            _pct(r.get("balanced_accuracy")),
            str(r.get("num_pseudo", 0)),
            _pct(r.get("pseudo_accuracy")),
            f"{_pct(min(cov))} / {_pct(max(cov))}" if cov else "–",
        ]
        table.add_row(*row)
    console.print(table)
    # Open-set pools (data.open_set), below the table to keep it narrow: what each merge let
    # in, and how well the OOD score told the foreign images apart.
    for r in rounds:
        if r.get("merged_foreign_fraction") is not None or r.get("ood_auroc") is not None:
            console.print(
                f"round {r['round']}: foreign images {_pct(r.get('merged_foreign_fraction'))} "
                f"of the merged pseudo-labels, OOD AUROC {_auroc(r.get('ood_auroc'))}"
            )
    chosen = (
        "the best val epoch (train.select=best_val)"
        if summary.get("selected_by") == "val"
        else "the last epoch"
    )
    console.print(
        f"final test accuracy {_pct(summary.get('final_test_accuracy'))}"
        + (f", val accuracy {_pct(summary.get('val_accuracy'))}" if val else "")
        + f" in {summary.get('wall_time_s')} s; each round kept {chosen}; artifacts: {run_dir}"
    )
