"""A second look at a scored set as a whole: rows that read alike share their safety attribute.

The first pass (the network, the set's own evidence and the scoring shift: `SetPosterior.score_set`) judges
each row against the alignment set. Two label-free corrections then read the rows against each other:

- *neighbour support*: a row's logit rises toward the mean logit of the rows with the k most similar prompts
  in its set, when they are safer than it (never the other way). A benign question on a sensitive topic sits
  among its task's rows; a harmful row of a contaminated set sits among the other harmful rows, whose
  logits are as low as its own, so it gains little.
- *the set's harmful component*: the first pass's probabilities of harm weight two centroids of the rows'
  joint (prompt with answer) embeddings, one harmful and one benign; a row's projection on the direction
  between them, centred on the set's median, counts against it. This is one EM step of a two-component
  model of the set: the harmful rows a user hid in a set resemble each other more than any alignment row.
  A set whose rows carry less harm than `component_min_mass` rows' worth gets a proportionally weaker
  component: in a clean set the harmful centroid is made of a few sensitive benign rows, and the rows like
  them would be pushed down for nothing.

Validation chose both (docs/validation.md, "A second look at the set"): on held-out tasks and categories they
single out disguised requests and harmful rows from other sources better, and keep more benign rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scheduler.features import chunked_topk


@dataclass(frozen=True)
class SetRefinement:
    """Weights of the two corrections (0 = off); `neighbour_weight` is a fraction of the gap to the neighbours,
    `component_weight` is logit per unit of cosine similarity, at full strength once the first pass's
    probabilities of harm sum to `component_min_mass` rows (0 = always full)."""

    neighbour_k: int = 10
    neighbour_weight: float = 0.0
    component_weight: float = 0.0
    component_min_mass: float = 0.0

    @property
    def reads_joint(self) -> bool:
        return bool(self.component_weight)

    def correction(self, logit: torch.Tensor, shift: float, prompts: torch.Tensor,
                   joint: torch.Tensor | None = None) -> torch.Tensor:
        """What to add to every member's unshifted logit, given the rows' unshifted posterior mean `logit` (N,)
        (an ensemble's mixture mean, `Posterior.moments`); `shift` is the set's scoring shift, which decides how
        sure the first pass is that a row is harmful."""
        return self.corrections(logit, (shift,), prompts, joint)[0]

    def corrections(self, logit: torch.Tensor, shifts: Sequence[float], prompts: torch.Tensor,
                    joint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`correction` at each of `shifts`. Only the harmful component reads the shift, so the neighbour support (a
        search over every pair of the set's prompts) is computed once."""
        shared = torch.zeros_like(logit)
        if self.neighbour_weight:
            shared = shared + self.neighbour_weight * neighbour_support(logit, prompts, self.neighbour_k)
        if not self.component_weight:
            return [shared for _ in shifts]
        if joint is None:
            raise ValueError("component_weight needs the rows' joint embeddings")
        harmful = [torch.sigmoid(-(logit + shift)) for shift in shifts]
        return [shared - self.component_strength(h) * component_projection(h, joint) for h in harmful]

    def component_strength(self, harmful: torch.Tensor) -> float:
        """`component_weight`, scaled down in proportion when the rows' probabilities of harm `harmful` sum to
        fewer than `component_min_mass` rows."""
        if not self.component_min_mass:
            return self.component_weight
        return self.component_weight * min(1.0, float(harmful.sum()) / self.component_min_mass)


def neighbour_support(logit: torch.Tensor, prompts: torch.Tensor, k: int) -> torch.Tensor:
    """How far the mean logit of each row's k most similar prompts (unit-norm, same set) lies above its own; 0 if below."""
    if len(prompts) < 2:
        return torch.zeros_like(logit)
    neighbours = torch.cat([top.indices for top in chunked_topk(prompts, prompts, k, exclude_self=True)])
    return torch.relu(logit[neighbours].mean(-1) - logit)


def component_projection(harmful: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
    """Each row's projection on the direction from the set's benign centroid to its harmful one (rows weighted
    by their probability of harm `harmful`, and of none), centred on the set's median."""
    harmful_centroid = (harmful[:, None] * joint).sum(0) / harmful.sum().clamp(min=1e-9)
    benign_centroid = ((1 - harmful)[:, None] * joint).sum(0) / (1 - harmful).sum().clamp(min=1e-9)
    projection = joint @ (harmful_centroid - benign_centroid)
    return projection - projection.median()
