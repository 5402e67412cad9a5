"""Weight a dataset file with a trained checkpoint and write it back with the weights added."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scheduler.data.io import DataError, Example, iter_examples, write_rows
from scheduler.metrics import detection_metrics
from scheduler.embeddings import RowEmbeddings
from scheduler.lexical import RowTexts
from scheduler.scoring import NeuralScheduler, ScoreResult


@dataclass
class ApplySummary:
    rows: int
    below_half: int
    quantiles: dict[str, float]
    output: Path
    histogram: Path | None
    expected_harmful_fraction: float
    scoring_shift: float
    label_check: dict[str, dict[str, float]] | None = None

    def __str__(self) -> str:
        q = "  ".join(f"{name}={value:.3f}" for name, value in self.quantiles.items())
        text = (f"scored {self.rows} rows -> {self.output}\n"
                f"weighted below 0.5: {self.below_half} ({self.below_half / self.rows:.1%})\n"
                f"expected harmful fraction of the set: {self.expected_harmful_fraction:.3f} "
                f"(scoring shift applied: {self.scoring_shift:.2f})\n"
                f"weight quantiles: {q}" + (f"\nhistogram: {self.histogram}" if self.histogram else ""))
        if self.label_check:
            text += "\ncheck against the file's own 'label' column (not used for scoring):"
            for method, c in self.label_check.items():
                text += (f"\n  {method:<40} AUROC {c['auroc']:.3f}, harmful share of total weight "
                         f"{c['harmful_weight_share']:.3f}, benign rows kept (weight >= 0.5) {c['benign_kept']:.1%}")
        return text


def read_all(path: Path) -> list[Example]:
    examples = list(tqdm(iter_examples(path), desc="reading", unit=" rows", leave=False))
    if not examples:
        raise DataError(f"{path}: empty dataset; expected at least one row")
    return examples


def embed_in_chunks(scheduler: NeuralScheduler, examples: list[Example], chunk: int) -> RowEmbeddings:
    """Embed with a progress bar over rows; the encoder's own cache skips rows seen before."""
    chunks = []
    with tqdm(total=len(examples), desc="embedding", unit=" rows") as bar:
        for start in range(0, len(examples), chunk):
            chunks.append(scheduler.embed(examples[start:start + chunk]))
            bar.update(len(chunks[-1].prompts))
    return RowEmbeddings(*(torch.cat(part) if part[0] is not None else None for part in zip(*chunks)))


def output_rows(examples: list[Example], result: ScoreResult) -> list[dict]:
    """Each input row unchanged, plus the weight columns (a plain-string row keeps its text)."""
    columns = result.columns()
    rows = []
    for i, example in enumerate(examples):
        row = dict(example.row)
        row.update({name: float(values[i]) for name, values in columns.items()})
        rows.append(row)
    return rows


def plot_histogram(weights: np.ndarray, path: Path) -> Path:
    from scheduler.plots import plt, save_figure  # pyplot on the Agg backend, loaded only when a histogram is asked for

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(weights, bins=50, color="#4477aa")
    ax.axvline(0.5, color="#cc3311", linestyle="--", label="0.5")
    ax.set_xlabel("weight (mean 1; lower = less safe)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(weights)} rows")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def apply_scheduler(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, chunk: int = 512,
                    histogram: bool = True, scoring_shift: float | None = None,
                    scoring_shift_taper: Sequence[float] | None = None) -> ApplySummary:
    """Read, embed, score and write atomically; the input file is never modified.

    `scoring_shift` and `scoring_shift_taper` override the checkpoint's operating point (`NeuralScheduler.load`)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"{output_path}: output would overwrite the input; choose another output path")
    examples = read_all(input_path)  # fail on bad rows before spending time on the model
    scheduler = NeuralScheduler.load(checkpoint, scoring_shift=scoring_shift, scoring_shift_taper=scoring_shift_taper)
    embeddings = embed_in_chunks(scheduler, examples, chunk)
    result = scheduler.score_embeddings(*embeddings, texts=RowTexts.of(examples))
    write_rows(output_rows(examples, result), output_path)
    hist = plot_histogram(result.weight, output_path.with_suffix(".hist.png")) if histogram else None
    quantiles = dict(zip(["min", "q05", "q25", "median", "q75", "q95", "max"],
                         np.quantile(result.weight, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1]).tolist(), strict=True))
    return ApplySummary(len(examples), int((result.weight < 0.5).sum()), quantiles, output_path, hist,
                        result.expected_harmful_fraction, result.scoring_shift,
                        label_check(examples, result.weight, lambda: scheduler.alignment_lookup(embeddings.prompts)))


def label_check(examples: list[Example], weights: np.ndarray,
                lookup_weights: Callable[[], np.ndarray]) -> dict[str, dict[str, float]] | None:
    """Detection metrics when every row carries a harmful/benign `label` (e.g. the bundled demo set), beside those
    of the alignment look-up on the same rows, so that a user sees what the scheduler adds over the simple answer."""
    labels = [e.label for e in examples]
    if not set(labels) <= {"harmful", "benign"} or len(set(labels)) < 2:
        return None
    harmful = np.array([label == "harmful" for label in labels])
    return {"scheduler": detection_metrics(harmful, weights),
            "alignment look-up (baseline, same rows)": detection_metrics(harmful, lookup_weights())}
