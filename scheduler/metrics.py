"""Detection metrics of a weighting (harmful = positive, lower weight = flagged)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def detection_metrics(labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """AUROC/AUPRC of -weight, harmful share of total weight, and the fractions below 0.5.

    AUROC, AUPRC and the harmful share are NaN on a set with one class only (p = 0).
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
    }
