"""Markdown tables of validation figures, and the summary file that `scheduler.across_seeds` reads.

Kept apart from `scheduler.validate` so that reading finished runs needs numpy only, not torch or Lightning.
"""

from __future__ import annotations

import math
import re

import numpy as np

SUMMARY_FILE = "validation_summary.json"  # one row of figures per method


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def worst_or_nan(values: list[float]) -> float:
    return float(np.min(values)) if values else float("nan")


def markdown(table: list[dict], digits: int = 3) -> str:
    """Rows of figures as a Markdown table: a column per key, in order of appearance; '-' where a row has no value."""
    keys = list(dict.fromkeys(key for row in table for key in row))
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in table])


def per_fold_table(results: list[dict], methods: list[str], set_name: str = "p=0.1") -> str:
    """AUROC per fold (the folds that scored `set_name`: a task fold's mixed file has no category-fold twin) and method."""
    folds = sorted({r["fold"] for r in results if r["set"] == set_name})
    lines = ["| fold | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for fold in folds:
        cells = [next(r["auroc"] for r in results if r["fold"] == fold and r["method"] == m and r["set"] == set_name)
                 for m in methods]
        lines.append(f"| {fold} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def ratio_sets(results: list[dict]) -> list[str]:
    """The `p=` sets of a run, by harmful ratio."""
    return sorted({r["set"] for r in results if re.fullmatch(r"p=[0-9.]+", r["set"])}, key=lambda name: float(name[2:]))


def per_ratio_table(results: list[dict], methods: list[str]) -> str:
    """Per harmful ratio and method: AUROC mean / worst fold, the mean harmful share of weight, and the benign rows
    kept (weight >= 0.5) on the worst fold: how a design holds up as contamination grows or vanishes."""
    lines = ["| set | method | AUROC mean | AUROC worst | harmful share | benign kept, worst |", "|---|---|---|---|---|---|"]
    cell = lambda value: "-" if np.isnan(value) else f"{value:.4f}"
    for set_name in ratio_sets(results):
        for method in methods:
            rows = [r for r in results if r["set"] == set_name and r["method"] == method]
            column = lambda key: [r[key] for r in rows]
            figures = (mean_or_nan(column("auroc")), worst_or_nan(column("auroc")),
                       mean_or_nan(column("harmful_weight_share")), worst_or_nan(column("benign_kept")))
            lines.append(f"| {set_name} | {method} | " + " | ".join(cell(f) for f in figures) + " |")
    return "\n".join(lines)
