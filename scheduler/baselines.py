"""What a user would do instead of the scheduler, as weightings on the same rows.

- `alignment_lookup`: similarity of the prompt to its k nearest alignment prompts (label-free),
  turned into a weight through the same label-free calibration as the alignment prior;
- `SupervisedFilter`: a moderation-style logistic regression trained WITH harmful/benign labels
  (the "attack simulation" approach BDS argues against). A baseline, never part of the scheduler.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from scheduler.features import AlignmentBank, alignment_similarity
from scheduler.prior import SafetyPrior


def normalise(raw: np.ndarray) -> np.ndarray:
    """Mean weight 1 over the set, like the scheduler's weights."""
    return raw / max(float(raw.mean()), 1e-12)


def lookup_probability(prompts: torch.Tensor, bank: AlignmentBank, k: int, prior: SafetyPrior) -> np.ndarray:
    """Each prompt's probability of being benign under the calibrated prior, before the set's normalisation: a row's
    value does not depend on the rest of its set. In float64, like the scheduler's weights: in float32 the sigmoid
    ties the least similar prompts at exactly 1."""
    similarity = alignment_similarity(prompts, bank, k)
    return torch.sigmoid(prior.mean(similarity).double()).numpy()


def alignment_lookup(prompts: torch.Tensor, bank: AlignmentBank, k: int, prior: SafetyPrior) -> np.ndarray:
    return normalise(lookup_probability(prompts, bank, k, prior))


class SupervisedFilter:
    """Logistic regression on [prompt, response] embeddings, trained with labels (1 = harmful)."""

    def __init__(self, C: float = 1.0):
        self.model = LogisticRegression(C=C, max_iter=3000)

    @staticmethod
    def _features(prompts: torch.Tensor, responses: torch.Tensor) -> np.ndarray:
        return torch.cat([prompts, responses], dim=-1).numpy()

    def fit(self, prompts: torch.Tensor, responses: torch.Tensor, labels: np.ndarray) -> SupervisedFilter:
        self.model.fit(self._features(prompts, responses), labels)
        return self

    def benign_probability(self, prompts: torch.Tensor, responses: torch.Tensor) -> np.ndarray:
        return self.model.predict_proba(self._features(prompts, responses))[:, 0]

    def weights(self, prompts: torch.Tensor, responses: torch.Tensor) -> np.ndarray:
        return normalise(self.benign_probability(prompts, responses))
