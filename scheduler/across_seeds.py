"""What validation runs of several seeds say together, and on how many seeds each target of issue #5 is met.

A seed's worst fold moves with the draw of its sets by more than most design changes (the default's, at p = 0.1, from
0.9142 to 0.9825 over the twenty-three package runs in docs/validation/answer_lexical/), so a design is read over seeds.
Each run directory is what `python -m scheduler.validate seed=S output_dir=DIR` wrote; its `validation_summary.json`
holds one row of figures per method.

    python -m scheduler.across_seeds docs/validation/answer_lexical/seed*
    python -m scheduler.across_seeds RUN_DIR ... --output docs/across_seeds.md --plot docs/across_seeds.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scheduler.data.io import DataError, exit_on_data_error, write_text
from scheduler.tables import SUMMARY_FILE, markdown

Runs = dict[str, dict[str, dict[str, float]]]  # run name -> method -> figure -> value
PLOT_FORMATS = (".png", ".svg", ".pdf")
# The targets, as (figure, lowest value that meets it); the audited worst fold reads the same target on the
# labels that survive the reading audit (data/harmful_label_audit.jsonl).
TARGETS = (("auroc_p0.1_worst", 0.95), ("auroc_p0.1_mean", 0.98), ("benign_kept_p0_worst", 0.97),
           ("auroc_p0.1_audited_worst", 0.95))


def read_summaries(run_dirs: Sequence[str | Path]) -> Runs:
    """{run name: {method: figures}} from each run's summary, or a DataError naming the file and what is wrong."""
    runs = {}
    for run_dir in sorted(map(Path, run_dirs), key=natural_order):
        path = run_dir / SUMMARY_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found; expected a directory written by `python -m scheduler.validate`")
        try:
            table = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(table, list) or not all(isinstance(row, dict) and "method" in row for row in table):
            raise DataError(f"{path}: expected a list of rows, each with a 'method' field")
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[name] = {row["method"]: {k: float(v) for k, v in row.items() if k != "method"} for row in table}
    if not runs:
        raise DataError("no run directories given")
    return runs


def natural_order(path: Path) -> list:
    """seed9 before seed10, whatever order the shell's glob gave."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def mean_over_seeds(runs: Runs) -> list[dict]:
    """Per method, the mean over seeds of each seed's figure; a seed without a figure (NaN, or a set its run did not
    build) leaves that mean, and `seeds` counts the runs that scored the method. Sorted by the mean worst fold."""
    table = []
    for method in dict.fromkeys(method for run in runs.values() for method in run):
        rows = scored(runs, method)
        keys = list(dict.fromkeys(key for row in rows for key in row))
        table.append({"method": method, "seeds": len(rows)}
                     | {key: finite_mean([row.get(key, math.nan) for row in rows]) for key in keys})
    return sorted(table, key=lambda row: -np.nan_to_num(row.get("auroc_p0.1_worst", math.nan), nan=-1.0))


def ranked_methods(runs: Runs) -> list[str]:
    """Every method of the runs, best mean worst fold first."""
    return [row["method"] for row in mean_over_seeds(runs)]


def scored(runs: Runs, method: str) -> list[dict[str, float]]:
    """The figures of `method` in each run that scored it."""
    return [run[method] for run in runs.values() if method in run]


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def targets_met(runs: Runs) -> list[dict]:
    """Per method and target, 'met / seeds that measured it' (a NaN figure, e.g. no audited set, is not counted)."""
    table = []
    for method in ranked_methods(runs):
        rows = scored(runs, method)
        row = {"method": method}
        for key, lowest in TARGETS:
            measured = [r[key] for r in rows if math.isfinite(r.get(key, math.nan))]
            row[f"{key} >= {lowest}"] = f"{sum(v >= lowest for v in measured)} / {len(measured)}"
        table.append(row)
    return table


def per_seed(runs: Runs, key: str = "auroc_p0.1_worst") -> list[dict]:
    """One row per run: each method's `key`."""
    methods = ranked_methods(runs)
    return [{"run": name} | {m: run[m].get(key, math.nan) if m in run else math.nan for m in methods}
            for name, run in runs.items()]


def report(runs: Runs) -> str:
    return (f"# Across {len(runs)} seeds: {', '.join(runs)}\n\n"
            f"## Mean over seeds of each seed's figure (sorted by worst-fold AUROC at p = 0.1)\n\n"
            f"{markdown(mean_over_seeds(runs), digits=4)}\n\n"
            f"## Seeds that meet each target\n\n{markdown(targets_met(runs))}\n\n"
            f"## Worst-fold AUROC at p = 0.1, per seed\n\n{markdown(per_seed(runs), digits=4)}\n\n"
            f"## Worst-fold AUROC at p = 0.1 on audited labels, per seed\n\n"
            f"{markdown(per_seed(runs, 'auroc_p0.1_audited_worst'), digits=4)}\n")


PLOTTED = ("auroc_p0.1_worst", "auroc_p0.1_audited_worst", "auroc_disguised_worst", "auroc_unseen_frames_worst",
           "auroc_other_sources_worst", "benign_kept_p0_worst")


def plot(runs: Runs, path: str | Path, figures: Sequence[str] = PLOTTED) -> Path:
    """Each seed's figure per method for the figures that decide a design, beside the mean and the target."""
    from scheduler.plots import figures_per_seed  # matplotlib only when a plot is asked for

    methods = ranked_methods(runs)
    values = {figure: {m: [row.get(figure, math.nan) for row in scored(runs, m)] for m in methods}
              for figure in figures}
    title = f"{len(runs)} seeds: one dot per seed, the bar is the mean"
    return figures_per_seed(values, dict(TARGETS), title, Path(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="directories written by python -m scheduler.validate")
    parser.add_argument("--output", help="also write the report to this markdown file")
    parser.add_argument("--plot", help="also draw each seed's figures per method to this image (.png, .svg, .pdf)")
    args = parser.parse_args(argv)
    with exit_on_data_error():
        if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
            raise DataError(f"--plot {args.plot}: expected a file ending in {', '.join(PLOT_FORMATS)}")
        runs = read_summaries(args.runs)
        text = report(runs)
        if args.output:
            write_text(text, args.output)
        if args.plot:
            plot(runs, args.plot)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
