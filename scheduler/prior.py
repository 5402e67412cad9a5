"""The prior over a sample's safety logit z: what the defender believes before any LM evidence.

`alignment` makes the prior mean depend on how much the prompt resembles the alignment
set's harmful prompts. It is calibrated without labels, from two reference points: how
similar alignment prompts are to each other (what a harmful request looks like) and how
similar the training fine-tuning rows are to the alignment set (mostly benign, by the
prior belief that most of a user's data is benign). `constant` is the paper's plain prior.

`scoring_shift` is the prior log-odds that a row is benign, added at scoring only. The network learns
on simulated sets with up to half their rows harmful; a user's set is mostly benign, and the shift states
that belief without retraining. It moves every logit of a set by the same amount, so it sets how many
rows fall below a weight of 0.5 and leaves their order (AUROC) as it is. `scoring_shift_taper` makes
that belief depend on the set: a set whose unshifted posterior already calls many rows harmful is not a
mostly benign set, so its shift shrinks to 0 (the set-level harmful rate as evidence about the prior).
`confident_taper` lets the final shift read a sharper statistic: the share of rows the set still calls harmful
once `confident_at` logits of the shift are granted. A clean set of free-form chat holds many rows the unshifted
posterior doubts a little, and few it is sure of; a contaminated set holds a block it is sure of. The shift of the
first pass (`scoring_shift_taper`) still decides how sure the set's second look is of each row (`SetRefinement`).
`withhold_below` applies the same reading row by row: a row whose unshifted logit (after the second look and the
answer's wording) lies below it is one the evidence alone already calls harmful, and the belief that the set is
mostly benign is not granted to it. The confident taper withholds the shift from a set that holds a block of such
rows; a set of free-form chat with a tenth of its rows harmful does not read as such a block, and without this its
harmful rows kept weights near 1 (docs/validation.md, "The shift withheld row by row"). `withhold_block` asks the
set first, as the confident taper does: the lower tail of a clean set of free-form chat also lies below the
threshold, so the shift is withheld only from a set holding more such rows than a clean set does (docs/validation.md,
"Withheld only from a block"). `withhold_spares_refusals` keeps the whole shift for a row whose answer opens with a
refusal, and leaves it out of the block's count: a clean chat set's lower tail holds harmful requests answered with a
refusal (LIMA's safety examples), which are safe to train on. A harmful answer that opens with a refusal gets the
shift as it would without any withholding, never more (docs/validation.md, "Refusals spared by the withholding").
"""

from __future__ import annotations

import torch
from torch import nn


def check_taper(low: float, high: float, name: str = "scoring_shift_taper") -> None:
    """A taper's (or the block's) ends are fractions of the set with 0 <= low < high <= 1."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"{name}: expected 0 <= low < high <= 1; got [{low:g}, {high:g}]")


def tapered(value: float, fraction: float, taper: tuple[float, float]) -> float:
    """All of `value` up to the taper's low end, none from its high end, linear between."""
    low, high = taper
    return value * min(max((high - fraction) / (high - low), 0.0), 1.0)


class SafetyPrior(nn.Module):
    """N(mean_i, scale^2) over the logit; mean_i = benign_mean - slope * standardised similarity."""

    def __init__(self, kind: str = "alignment", benign_mean: float = 2.0, slope: float = 3.0, scale: float = 1.5,
                 scoring_shift: float = 0.0, scoring_shift_taper: tuple[float, float] | None = None,
                 confident_at: float = 0.0, confident_taper: tuple[float, float] | None = None,
                 withhold_below: float | None = None, withhold_ramp: float = 1.0,
                 withhold_block: tuple[float, float] | None = None, withhold_spares_refusals: bool = False):
        super().__init__()
        if kind not in ("alignment", "constant"):
            raise ValueError(f"unknown prior kind '{kind}'; expected 'alignment' or 'constant'")
        self.kind = kind
        self.benign_mean = benign_mean
        self.slope = slope if kind == "alignment" else 0.0
        self.scale = scale
        self.scoring_shift = scoring_shift
        if scoring_shift_taper is not None:
            check_taper(*scoring_shift_taper)
        self.scoring_shift_taper = scoring_shift_taper
        if confident_taper is not None:
            check_taper(*confident_taper, name="confident_taper")
        self.confident_at = confident_at
        self.confident_taper = confident_taper
        if withhold_ramp <= 0:
            raise ValueError(f"withhold_ramp: expected a positive number of logits; got {withhold_ramp:g}")
        self.withhold_below, self.withhold_ramp = withhold_below, withhold_ramp
        if withhold_block is not None:
            check_taper(*withhold_block, name="withhold_block")
            if withhold_below is None:  # the block counts rows below that threshold; without one it would do nothing
                raise ValueError(f"withhold_block: needs withhold_below, the logit below which a row counts "
                                 f"(-6 was measured); got withhold_block={list(withhold_block)} alone")
        self.withhold_block = withhold_block
        if withhold_spares_refusals and withhold_below is None:  # it spares rows from a withholding that is not there
            raise ValueError("withhold_spares_refusals: needs withhold_below, the logit below which the shift is "
                             "withheld (-6 was measured)")
        self.withhold_spares_refusals = withhold_spares_refusals
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

    def set_shift(self, harmful_fraction: float) -> float:
        """The scoring shift of a set whose unshifted posterior expects `harmful_fraction` of its rows harmful:
        all of it up to the taper's low end, none from its high end, linear between."""
        if self.scoring_shift_taper is None:
            return self.scoring_shift
        return tapered(self.scoring_shift, harmful_fraction, self.scoring_shift_taper)

    def final_shift(self, logit: torch.Tensor, first_shift: float) -> float:
        """The shift a scored set finally gets, from its rows' unshifted logits `logit` (N,): tapered by the share
        of rows still expected harmful after `confident_at` logits of the shift (`confident_taper`), or the
        first pass's `first_shift` without that taper."""
        if self.confident_taper is None:
            return first_shift
        confident_fraction = float(torch.sigmoid(-(logit.double() + self.confident_at)).mean())
        return tapered(self.scoring_shift, confident_fraction, self.confident_taper)

    def row_shift(self, logit: torch.Tensor, set_shift: float, spared: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's share of the set's shift, from its unshifted logit `logit` (N,): all of it at or above
        `withhold_below`, none `withhold_ramp` logits below it, linear between (monotone in the logit, so the rows'
        order is kept). With `withhold_block`, only as much of that is withheld as `block_strength` grants. Rows
        marked in `spared` (N,) keep all of it, so they may pass rows above them that lose some. The whole shift for
        every row without `withhold_below`."""
        if self.withhold_below is None:
            return torch.full_like(logit, set_shift)
        share = ((logit - self.withhold_below + self.withhold_ramp) / self.withhold_ramp).clamp(0, 1)
        if spared is not None:
            share = torch.where(spared, torch.ones_like(share), share)
        return set_shift * (1 - self.block_strength(logit, spared) * (1 - share))

    def block_strength(self, logit: torch.Tensor, spared: torch.Tensor | None = None) -> float:
        """How much of the withholding a set gets: none while its share of rows below `withhold_below` (soft, as the
        confident taper's share; rows in `spared` do not count) is at most `withhold_block`'s low end, all of it from
        the high end, linear between; all of it without `withhold_block`."""
        if self.withhold_block is None:
            return 1.0
        below = torch.sigmoid(self.withhold_below - logit.double())
        if spared is not None:
            below = torch.where(spared, torch.zeros_like(below), below)
        return 1.0 - tapered(1.0, float(below.mean()), self.withhold_block)

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor, prior_mean: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(prior_mean, scale^2)) per sample."""
        var_ratio = (sigma / self.scale) ** 2
        return 0.5 * (var_ratio + ((mu - prior_mean) / self.scale) ** 2 - 1 - torch.log(var_ratio))
