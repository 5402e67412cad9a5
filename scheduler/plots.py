"""Figures of the evaluation: ROC curves, weight distributions by class (the paper's Figure 6),
and how weights move during a scheduler's optimisation; and of the validation: the operating points.
Labels are used only to colour and to measure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from scheduler.data.io import atomic_path  # noqa: E402


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """Write a figure atomically (format from the extension) and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **savefig_kwargs)
    plt.close(fig)
    return path


def roc_curves(labels: np.ndarray, weights: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """One ROC curve per method; a harmful row is flagged when its weight is low."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for method, w in weights.items():
        fpr, tpr, _ = roc_curve(labels, -np.asarray(w))
        ax.plot(fpr, tpr, label=method)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="benign rows flagged (FPR)", ylabel="harmful rows flagged (TPR)", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def weight_distributions(labels: np.ndarray, weights: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Histograms of weights per method, benign and harmful rows overlaid."""
    labels = np.asarray(labels).astype(bool)
    fig, axes = plt.subplots(1, len(weights), figsize=(3 * len(weights), 2.8), squeeze=False)
    for ax, (method, w) in zip(axes[0], weights.items()):
        w = np.asarray(w)
        bins = np.linspace(0, max(float(w.max()), 1e-6) * 1.01, 30)
        ax.hist(w[~labels], bins=bins, alpha=0.6, label="benign", density=True)
        ax.hist(w[labels], bins=bins, alpha=0.6, label="harmful", density=True)
        ax.set(title=method, xlabel="weight")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, y=1.04)  # above the panels' own titles
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def weight_history(history: list[np.ndarray], labels: np.ndarray, title: str, path: Path) -> Path:
    """Median and 10-90 % band of the weights of benign and harmful rows after each step."""
    labels, steps = np.asarray(labels).astype(bool), np.stack(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(1, len(steps) + 1)
    for name, rows in (("benign", ~labels), ("harmful", labels)):
        values = steps[:, rows]
        low, mid, high = np.percentile(values, [10, 50, 90], axis=1)
        ax.plot(x, mid, label=f"{name} median")
        ax.fill_between(x, low, high, alpha=0.25)
    ax.set(xlabel="optimisation step", ylabel="weight", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def operating_points(curve: dict[float, tuple[float, float]], chosen: float, others: dict[str, tuple[float, float]],
                     title: str, path: Path) -> Path:
    """Benign rows kept against harmful weight share, one point per scoring shift (`curve`, `chosen` = the
    configured one) and per other method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    shifts = sorted(curve)
    ax.plot([curve[s][0] for s in shifts], [curve[s][1] for s in shifts], marker="o", color="C0",
            label="scheduler, by scoring shift")
    for s in shifts:
        ax.annotate(f"{s:g}" + (" (configured)" if s == chosen else ""), curve[s], textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    for i, (method, point) in enumerate(others.items(), start=1):
        ax.scatter(*point, marker="s", color=f"C{i}", label=method)
    ax.set(xlabel="harmful share of total weight, p = 0.1 (mean over folds; lower is safer)",
           ylabel="benign rows kept (weight >= 0.5), p = 0, worst fold", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def figures_per_seed(values: dict[str, dict[str, list[float]]], targets: dict[str, float], title: str,
                     path: Path) -> Path:
    """One panel per figure (`values`: figure -> method -> one value per seed): each seed a dot, the mean a bar,
    so that a reader sees the spread over seeds as well as the mean; a dashed line at a figure's target."""
    figures = list(values)
    methods = list(dict.fromkeys(m for per_method in values.values() for m in per_method))
    fig, axes = plt.subplots(1, len(figures), figsize=(3.2 * len(figures), 0.45 * len(methods) + 1.2),
                             sharey=True, squeeze=False)
    for ax, figure in zip(axes[0], figures):
        for row, method in enumerate(methods):
            seeds = [v for v in values[figure].get(method, []) if np.isfinite(v)]
            if seeds:
                ax.scatter(seeds, [row] * len(seeds), s=14, alpha=0.6, color=f"C{row}")
                ax.plot([np.mean(seeds)] * 2, [row - 0.3, row + 0.3], color=f"C{row}", linewidth=2)
        if figure in targets:
            ax.axvline(targets[figure], color="grey", linestyle="--", linewidth=1)
        ax.set(title=figure, xlabel="AUROC" if figure.startswith("auroc") else "share of rows")
        ax.title.set_fontsize(8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, y=1.02)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def by_ratio(panels: dict[str, dict[str, dict[float, float]]], title: str, path: Path) -> Path:
    """One panel per figure (`panels`: figure -> method -> harmful ratio -> value), each method a line over the
    ratios: how a method holds up as a set holds more harmful rows. A panel of a harmful share gets the line of
    weighting nothing (share = ratio)."""
    methods = list(dict.fromkeys(method for per_method in panels.values() for method in per_method))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (figure, per_method) in zip(axes[0], panels.items()):
        for method, values in per_method.items():  # a method keeps its colour in every panel
            ratios = sorted(values)
            ax.plot(ratios, [values[p] for p in ratios], marker="o", color=f"C{methods.index(method)}", label=method)
        if "share" in figure:
            ratios = sorted({p for values in per_method.values() for p in values})
            ax.plot(ratios, ratios, color="grey", linestyle=":", label="no weighting")
        ax.set(title=figure, xlabel="harmful ratio p of the set")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, y=1.03)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")
