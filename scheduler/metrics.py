"""Detection metrics of a weighting (harmful = positive, lower weight = flagged).

Each method puts its weights on its own scale (the scheduler's scoring shift keeps most rows near 1; the supervised
filter's probabilities spread wider), so "weight < 0.5" compares methods at different costs in benign rows. Two
figures compare them at the same cost, #5's bar of 97 % of benign rows kept:
- `harmful_caught_at_3pct`, per set: the harmful rows flagged by the threshold, fitted to that set, that flags at
  most 3 % of its benign rows (a point on its ROC curve; the ranking near the top, where a user cuts);
- `matched_threshold` and `caught_at_threshold`: one threshold per method for every set, the highest that keeps
  97 % of the benign rows of every clean set, and what it flags on the others: what a user who calibrated each
  method on clean data would get. It reads a per-row score that no normalisation over the set has moved (the
  scheduler's posterior mean logit without the scoring shift, a baseline's probability of benign): weights have mean
  1 in every set, so a set whose harmful rows were pushed down has every other row lifted, and one threshold on
  weights would not mean the same in two sets. The shift is tapered away on sets that hold harmful rows, so a
  threshold on the shifted logit would not either.
- `calibrated_threshold`: a cut fitted on clean rows scored apart, for new rows (split conformal) rather than
  in-sample; `conformal_p_values`: the same reading row by row, which `apply_scheduler.py calibrate_on` takes with
  the user's clean rows scored inside each set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

BENIGN_FLAG_RATE = 0.03  # the share of a clean set's benign rows a method may flag (#5: 97 % kept)


def detection_metrics(labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """AUROC/AUPRC of -weight, harmful share of total weight, the fractions below 0.5, and the harmful rows caught
    when at most 3 % of benign rows are flagged.

    AUROC, AUPRC, the harmful share and the rows caught are NaN on a set with one class only (p = 0).
    """
    labels, weights = np.asarray(labels).astype(bool), np.asarray(weights, dtype=float)
    both = 0 < labels.sum() < len(labels)
    nan = float("nan")
    return {
        "auroc": float(roc_auc_score(labels, -weights)) if both else nan,
        "auprc": float(average_precision_score(labels, -weights)) if both else nan,
        "harmful_weight_share": float(weights[labels].sum() / weights.sum()) if labels.any() else nan,
        "benign_kept": float((weights[~labels] >= 0.5).mean()) if (~labels).any() else nan,
        "harmful_below_half": float((weights[labels] < 0.5).mean()) if labels.any() else nan,
        "mean_benign_weight": float(weights[~labels].mean()) if (~labels).any() else nan,
        "harmful_caught_at_3pct": caught_at_flag_rate(labels, weights) if both else nan,
    }


def caught_at_flag_rate(labels: np.ndarray, weights: np.ndarray, rate: float = BENIGN_FLAG_RATE) -> float:
    """The share of harmful rows below the strictest threshold that flags at most `rate` of the benign rows (rows
    tied at a weight are flagged together or not at all). Needs both classes."""
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(bool), -np.asarray(weights, dtype=float), drop_intermediate=False)
    return float(tpr[fpr <= rate + 1e-12].max())


def matched_threshold(clean_scores: Iterable[np.ndarray], rate: float = BENIGN_FLAG_RATE) -> float:
    """The highest threshold (flagged: score below it) that flags at most `rate` of the rows of every set in
    `clean_scores` (per-row scores of sets without harmful rows; higher = safer)."""
    def highest(scores: np.ndarray) -> float:
        ordered = np.sort(np.asarray(scores, dtype=float))
        return float(ordered[min(math.floor(rate * len(ordered) + 1e-9), len(ordered) - 1)])
    thresholds = [highest(scores) for scores in clean_scores if len(scores)]
    if not thresholds:
        raise ValueError("matched_threshold needs at least one non-empty clean set")
    return min(thresholds)


def calibration_rows_needed(rate: float) -> int:
    """The fewest clean rows in a set that `calibrated_threshold` can fit a cut on at this rate."""
    return math.ceil(1 / rate - 1 - 1e-9)


def calibrated_threshold(clean_scores: Iterable[np.ndarray], rate: float = BENIGN_FLAG_RATE) -> float:
    """A cut for new rows (flagged: score below it), fitted on sets of clean rows: on each set of n rows, its k-th
    lowest score with k = floor(rate * (n + 1)), and the lowest of those. A new row exchangeable with a set's rows
    lies below that set's cut with probability k / (n + 1) <= rate (split conformal), so the cut flags at most `rate`
    of such rows in expectation; `matched_threshold`, fitted in-sample, would flag up to 1 / (n + 1) more. Needs
    n >= 1 / rate - 1 rows in every set."""
    thresholds = []
    for scores in clean_scores:
        ordered = np.sort(np.asarray(scores, dtype=float))
        k = math.floor(rate * (len(ordered) + 1) + 1e-9)
        if k < 1:
            raise ValueError(f"a clean set of {len(ordered)} rows cannot fit a cut that flags at most {rate:.1%} of new "
                             f"rows; it needs at least {calibration_rows_needed(rate)} rows")
        thresholds.append(float(ordered[k - 1]))
    if not thresholds:
        raise ValueError("calibrated_threshold needs at least one clean set")
    return min(thresholds)


def conformal_p_values(clean_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each score's conformal p-value among clean rows' scores (higher = safer): (1 + the clean scores at or below
    it) / (clean rows + 1). A new clean row exchangeable with the clean rows gets p <= rate with probability at most
    rate, so flagging p <= rate flags at most `rate` of such rows in expectation: the rows below
    `calibrated_threshold`'s cut on the same clean scores (scores tied with a clean row are not flagged)."""
    ordered = np.sort(np.asarray(clean_scores, dtype=float))
    return (1 + np.searchsorted(ordered, np.asarray(scores, dtype=float), side="right")) / (len(ordered) + 1)


def flagged_at_rate(p_values: np.ndarray, rate: float = BENIGN_FLAG_RATE) -> np.ndarray:
    """Rows whose `conformal_p_values` are at most `rate` (one equal to it, up to float rounding, is flagged)."""
    return np.asarray(p_values, dtype=float) <= rate + 1e-12


def caught_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float, weights: np.ndarray,
                        reading: str = "matched") -> dict[str, float]:
    """`caught_when_flagged` with the rows whose score lies below `threshold` flagged: on a set with harmful rows the
    benign rows flagged need not be the rate the threshold was fitted to, since a scheduler's scores read each row
    against its set."""
    return caught_when_flagged(labels, np.asarray(scores, dtype=float) < threshold, weights, reading)


def caught_when_flagged(labels: np.ndarray, flagged: np.ndarray, weights: np.ndarray,
                        reading: str = "matched") -> dict[str, float]:
    """The harmful rows flagged, the share of the set's `weights` still on harmful rows once the flagged rows are
    dropped (both NaN without harmful rows), and the benign rows flagged (NaN without benign rows). Keys end in
    `_at_{reading}`."""
    labels, weights = np.asarray(labels).astype(bool), np.asarray(weights, dtype=float)
    kept = ~np.asarray(flagged, dtype=bool)
    left = weights[kept].sum()
    nan = float("nan")
    return {f"caught_at_{reading}": float((~kept[labels]).mean()) if labels.any() else nan,
            f"harmful_share_left_at_{reading}": (float(weights[kept & labels].sum() / left) if left > 0 else 0.0)
            if labels.any() else nan,
            f"benign_flagged_at_{reading}": float((~kept[~labels]).mean()) if (~labels).any() else nan}
