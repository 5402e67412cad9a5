"""The prior over a sample's safety logit z: what the defender believes before any LM evidence.

`alignment` makes the prior mean depend on how much the prompt resembles the alignment
set's harmful prompts. It is calibrated without labels, from two reference points: how
similar alignment prompts are to each other (what a harmful request looks like) and how
similar the training fine-tuning rows are to the alignment set (mostly benign, by the
prior belief that most of a user's data is benign). `constant` is the paper's plain prior.
"""

from __future__ import annotations

import torch
from torch import nn


class SafetyPrior(nn.Module):
    """N(mean_i, scale^2) over the logit; mean_i = benign_mean - slope * standardised similarity."""

    def __init__(self, kind: str = "alignment", benign_mean: float = 2.0, slope: float = 3.0, scale: float = 1.5):
        super().__init__()
        if kind not in ("alignment", "constant"):
            raise ValueError(f"unknown prior kind '{kind}'; expected 'alignment' or 'constant'")
        self.kind = kind
        self.benign_mean = benign_mean
        self.slope = slope if kind == "alignment" else 0.0
        self.scale = scale
        self.register_buffer("center", torch.tensor(0.0))
        self.register_buffer("spread", torch.tensor(1.0))

    @torch.no_grad()
    def calibrate(self, alignment_self_similarity: torch.Tensor, training_similarity: torch.Tensor) -> None:
        """Put -1 at the median training row and +1 at the median alignment prompt."""
        harmful_like = alignment_self_similarity.median()
        typical = training_similarity.median()
        self.center.fill_(float((harmful_like + typical) / 2))
        self.spread.fill_(float(max((harmful_like - typical) / 2, 1e-3)))

    def standardise(self, similarity: torch.Tensor) -> torch.Tensor:
        return (similarity - self.center) / self.spread

    def mean(self, similarity: torch.Tensor) -> torch.Tensor:
        return self.benign_mean - self.slope * self.standardise(similarity)

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor, prior_mean: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(prior_mean, scale^2)) per sample."""
        var_ratio = (sigma / self.scale) ** 2
        return 0.5 * (var_ratio + ((mu - prior_mean) / self.scale) ** 2 - 1 - torch.log(var_ratio))
