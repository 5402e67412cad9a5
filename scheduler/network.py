"""The amortised scheduler: a small network from sample embeddings to a posterior over
the sample's safety logit z ~ N(mu, sigma^2), given the alignment set and the sample's set.

`SchedulerNetwork` is the plain MLP; `NetworkEnsemble` trains several side by side, so the
posterior is a mixture that also carries the amortisation's own uncertainty; `SetPosterior`
wraps either with the feature computation and the prior, so training and scoring share one
code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scheduler.features import (N_RELATION_FEATURES, AlignmentBank, SetEvidence, relation_features, set_summary,
                               template_mates)
from scheduler.lexical import LexicalContrast, RowTexts
from scheduler.prior import SafetyPrior
from scheduler.refinement import SetRefinement
from scheduler.refusals import is_refusal


class SchedulerNetwork(nn.Module):
    """MLP mapping per-sample (and optionally per-set) features to (offset from prior mean, log sigma)."""

    def __init__(self, embed_dim: int, hidden: int = 128, use_response: bool = True, use_set_summary: bool = True,
                 dropout: float = 0.1, init_sigma: float = 1.0):
        super().__init__()
        self.use_response = use_response
        self.use_set_summary = use_set_summary
        n_in = embed_dim + N_RELATION_FEATURES
        n_in += embed_dim if use_response else 0
        n_in += embed_dim + 2 * N_RELATION_FEATURES if use_set_summary else 0
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, 2)
        nn.init.zeros_(self.head.weight)  # start exactly at the prior mean with sigma = init_sigma
        nn.init.constant_(self.head.bias, 0.0)
        self.log_init_sigma = math.log(init_sigma)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor,
                summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [prompts, relation]
        if self.use_response:
            parts.append(responses)
        if self.use_set_summary:
            parts.append(summary.expand(len(prompts), -1))
        out = self.head(self.body(torch.cat(parts, dim=-1)))
        return out[:, 0], torch.exp(out[:, 1].clamp(-6, 3) + self.log_init_sigma)


class NetworkEnsemble(nn.Module):
    """`members` independently initialised SchedulerNetworks: outputs gain a leading member dimension.

    Each member is trained on the same objective (the loss averages over members), so together they
    form a deep ensemble: where members disagree, on rows unlike any training set, the mixture
    posterior is wider than the members' and its mean lies between theirs, so one member's
    accident of initialisation does not decide a row's weight.
    """

    def __init__(self, members: int, embed_dim: int, **network_kwargs):
        super().__init__()
        self.members = nn.ModuleList(SchedulerNetwork(embed_dim, **network_kwargs) for _ in range(members))

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor,
                summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets, sigmas = zip(*(member(prompts, responses, relation, summary) for member in self.members))
        return torch.stack(offsets), torch.stack(sigmas)


def build_network(embed_dim: int, members: int = 1, **network_kwargs) -> nn.Module:
    """One SchedulerNetwork, or an ensemble of them (checkpoints without `members` hold one network)."""
    if members == 1:
        return SchedulerNetwork(embed_dim, **network_kwargs)
    return NetworkEnsemble(members, embed_dim, **network_kwargs)


class ScalarNetwork(nn.Module):
    """The paper's non-amortised scheduler: one free (offset, log sigma) per row of one fixed set.

    Same interface as `SchedulerNetwork`, so the same BDS module optimises it; the rows must
    always come in the set's order. A per-dataset reference, retrained for every new dataset.
    """

    def __init__(self, n_rows: int, init_sigma: float = 1.0):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(n_rows))
        self.log_sigma = nn.Parameter(torch.full((n_rows,), math.log(init_sigma)))

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor,
                summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(prompts) != len(self.offset):
            raise ValueError(f"a scalar scheduler holds {len(self.offset)} rows; got a set of {len(prompts)}")
        return self.offset, torch.exp(self.log_sigma.clamp(-6, 3))


@dataclass
class Posterior:
    """Per-sample posterior N(mu, sigma^2) of the safety logit, and the prior mean it started from.

    `mu` and `sigma` have shape (N,), or (members, N) for an ensemble: an equal mixture of the members.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    prior_mean: torch.Tensor

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised samples, shape (n, *mu.shape): gradients flow to mu and sigma."""
        noise = torch.randn((n, *self.mu.shape), generator=generator, device=self.mu.device)
        return self.mu + self.sigma * noise

    def moments(self) -> Posterior:
        """The same posterior as one Gaussian per sample (the mixture's mean and standard deviation)."""
        if self.mu.dim() == 1:
            return self
        variance = (self.sigma ** 2).mean(0) + self.mu.var(0, unbiased=False)
        return Posterior(self.mu.mean(0), variance.sqrt(), self.prior_mean)


def scoring_reads_joint(evidence: SetEvidence, refinement: SetRefinement) -> bool:
    """Whether scoring a set with this evidence and refinement needs the rows' joint embeddings (a second, longer
    encoder pass): asked of a trained posterior and of a config before any posterior exists."""
    return evidence.reads_joint(scoring=True) or refinement.reads_joint


def expected_harmful_fraction(posterior: Posterior) -> float:
    """The share of a set's rows that the posterior expects to be harmful: the mean of 1 - sigmoid(mu)."""
    return float(torch.sigmoid(-posterior.moments().mu.detach()).mean())


@dataclass
class ScoredSet:
    """A scored set's posterior, the share of its rows expected harmful before the scoring shift (a set that
    is mostly harmful may deserve refusing outright, whatever its weights), the shift it received, and how many
    rows got less of it (`SafetyPrior.row_shift`)."""

    posterior: Posterior
    expected_harmful_fraction: float
    scoring_shift: float
    withheld: int = 0
    # Each row's posterior mean logit had the set got no scoring shift (the second look then reads the set unshifted
    # too): what one cut across sets reads, since the shift is tapered away on a set that holds harmful rows.
    unshifted_mu: torch.Tensor | None = None


class SetPosterior(nn.Module):
    """Everything needed to turn one fine-tuning set's embeddings into per-sample posteriors."""

    def __init__(self, network: SchedulerNetwork, prior: SafetyPrior, bank: AlignmentBank, k: int = 10,
                 evidence: SetEvidence = SetEvidence(), refinement: SetRefinement = SetRefinement(),
                 lexical: LexicalContrast = LexicalContrast(), alignment_prompts: tuple[str, ...] = ()):
        super().__init__()
        self.network = network
        self.prior = prior
        self.k = k
        self.evidence = evidence
        self.refinement = refinement
        self.lexical = lexical
        self.alignment_prompts = tuple(alignment_prompts)  # the texts behind bank_prompts, for `lexical`
        if lexical.weight and not self.alignment_prompts:
            raise ValueError("a lexical contrast needs the alignment prompts' texts")
        self.register_buffer("bank_prompts", bank.prompts)
        self.register_buffer("bank_responses", bank.responses)
        self.register_buffer("bank_joint", bank.joint)  # None (not in the state dict) in checkpoints older than it

    @property
    def bank(self) -> AlignmentBank:
        return AlignmentBank(self.bank_prompts, self.bank_responses, self.bank_joint)

    @property
    def reads_texts_at_scoring(self) -> bool:
        """Whether `score_set` needs the rows' prompt and answer texts (the lexical contrast, the withholding's
        refusals spared, or the template-mates left out of the set's readings)."""
        return bool(self.lexical.weight) or self.prior.withhold_spares_refusals or bool(self.evidence.template_run)

    @property
    def reads_joint_at_scoring(self) -> bool:
        """Whether `score_set` needs the rows' joint embeddings."""
        return scoring_reads_joint(self.evidence, self.refinement)

    def relation(self, prompts: torch.Tensor, responses: torch.Tensor, mates: torch.Tensor | None = None) -> torch.Tensor:
        """The set's `relation_features`: fixed for a set, so a caller that needs them twice computes them once."""
        return relation_features(prompts, responses, self.bank, self.k, mates)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor | None = None) -> Posterior:
        """The amortised posterior, as the BDS objective trains it (`relation`: the set's, if already computed)."""
        relation = self.relation(prompts, responses) if relation is None else relation
        prior_mean = self.prior.mean(relation[:, 0])
        offset, sigma = self.network(prompts, responses, relation, set_summary(prompts, relation))
        return Posterior(prior_mean + offset, sigma, prior_mean)

    def set_energy(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor | None = None,
                   joint: torch.Tensor | None = None, scoring: bool = False,
                   mates: torch.Tensor | None = None) -> torch.Tensor:
        """The set's own embedding evidence about each row (`SetEvidence`), in the prior's units (`scoring`: as a
        scored set gets it, rather than the BDS objective; `mates`: the rows' `template_mates`)."""
        relation = self.relation(prompts, responses, mates) if relation is None else relation
        return self.evidence.energy(prompts, responses, relation, self.bank, self.k, self.prior.spread, joint, scoring,
                                    mates)

    def score(self, prompts: torch.Tensor, responses: torch.Tensor, joint: torch.Tensor | None = None,
              texts: RowTexts | None = None) -> Posterior:
        """The posterior a scored set gets: the network's, with the set's own evidence added to the logit.

        The network learned to predict the evidence of sets like its training sets; on a new set the
        evidence can be computed exactly, and validation found that adding it again (a product of the
        amortised posterior and the set's density-ratio likelihood) singles out harmful rows of unseen
        tasks, disguised requests and other sources better, at some cost in benign rows kept. The prior's
        scoring shift (a user's set is mostly benign, unless the set itself says otherwise: `SafetyPrior`)
        is then added to every row's prior mean and logit, after the rows are read against each other
        (`SetRefinement`), and each answer's wording, read by a model of the alignment prompts' wording
        (`LexicalContrast`), counts against its row.
        """
        return self.score_set(prompts, responses, joint, texts).posterior

    def score_set(self, prompts: torch.Tensor, responses: torch.Tensor, joint: torch.Tensor | None = None,
                  texts: RowTexts | None = None) -> ScoredSet:
        """`score`, with what it concluded about the whole set (`joint`: the rows' joint embeddings, when the
        evidence uses them; `texts`: the rows' prompts and answers, when the lexical contrast is on)."""
        has_texts = texts is not None and len(texts.prompts) == len(texts.responses) == len(prompts)
        if self.reads_texts_at_scoring and not has_texts:
            raise ValueError("scoring needs one prompt and one answer text per row (read by the lexical contrast, by "
                             "withhold_spares_refusals or by the template-mates)")
        mates = (template_mates(texts.prompts, texts.responses, self.evidence.template_run).to(prompts.device)
                 if self.evidence.template_run else None)
        relation = self.relation(prompts, responses, mates)
        posterior = self(prompts, responses, relation)
        if self.evidence.scoring_weight:
            energy = self.evidence.scoring_weight * self.set_energy(prompts, responses, relation, joint, scoring=True,
                                                                    mates=mates)
            posterior = Posterior(posterior.mu - energy, posterior.sigma, posterior.prior_mean)
        harmful_fraction = expected_harmful_fraction(posterior)
        first_shift = self.prior.set_shift(harmful_fraction)
        logit = posterior.moments().mu
        shift = self.prior.final_shift(logit, first_shift)
        wording = (self.lexical.weight * self.lexical.evidence(texts, self.alignment_prompts).to(logit)
                   if self.lexical.weight else torch.zeros_like(logit))
        correction, unshifted = (part - wording for part in
                                 self.refinement.corrections(logit, (first_shift, 0.0), prompts, joint))
        unshifted_mu = Posterior(posterior.mu + unshifted, posterior.sigma, posterior.prior_mean).moments().mu
        posterior = Posterior(posterior.mu + correction, posterior.sigma, posterior.prior_mean)
        spared = None
        if self.prior.withhold_spares_refusals:
            spared = torch.tensor([is_refusal(answer) for answer in texts.responses], dtype=torch.bool,
                                  device=correction.device)
        row_shift = self.prior.row_shift(posterior.moments().mu, shift, spared)
        return ScoredSet(Posterior(posterior.mu + row_shift, posterior.sigma, posterior.prior_mean + row_shift),
                         harmful_fraction, shift, int((row_shift < shift).sum()), unshifted_mu)
