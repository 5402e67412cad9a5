"""Score a new fine-tuning set with a trained checkpoint: embeddings -> posterior -> weights.

No LM is loaded and nothing is trained: the amortised network is the whole scheduler here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scheduler.baselines import lookup_probability
from scheduler.data.encodings import reads_as_english
from scheduler.data.io import DataError, Example, examples_from_rows
from scheduler.embeddings import Embedder, RowEmbeddings
from scheduler.features import (AlignmentBank, SetEvidence, chats_read_by_last_exchange, exchange_places,
                                most_alignment_like_readings)
from scheduler.lexical import LexicalContrast, RowTexts
from scheduler.metrics import conformal_p_values
from scheduler.network import SetPosterior, build_network
from scheduler.prior import SafetyPrior, check_taper
from scheduler.refinement import SetRefinement
from scheduler.transforms import posterior_weights

CHECKPOINT_KEY = "scheduler"
# What `NeuralScheduler.load` lets a caller change about how a checkpoint scores: its operating point.
OPERATING_POINT_OPTIONS = ("scoring_shift", "scoring_shift_taper", "withhold_below", "withhold_block",
                           "withhold_spares_refusals", "score_unreadable", "score_by_exchange", "exchange_margin",
                           "exchange_margin_cap", "short_answer_words")


@dataclass
class ScoreResult:
    """One value per row. `weight` has mean 1 over the scored set; lower means less safe."""

    weight: np.ndarray
    weight_std: np.ndarray
    mu: np.ndarray  # posterior mean of the safety logit
    sigma: np.ndarray  # posterior standard deviation of the safety logit
    prior_mean: np.ndarray
    expected_harmful_fraction: float = float("nan")  # of the whole set, before the scoring shift
    scoring_shift: float = 0.0  # added to the rows' logits (the prior log-odds of a benign row, tapered)
    withheld: int = 0  # rows that got less of the shift: the evidence alone calls them harmful (`SafetyPrior.row_shift`)
    # The posterior mean logit without the scoring shift (`ScoredSet.unshifted_mu`): the score a cut reads. The shift
    # is tapered away on sets that hold harmful rows, so a cut on `mu` fitted on clean rows would flag most benign
    # rows of such a set.
    unshifted_mu: np.ndarray | None = None
    # Rows that read as no English (`reads_as_english`; None when scored without their texts). Unless the scheduler
    # scores them (`NeuralScheduler.score_unreadable`), their weight is 0.
    unreadable: np.ndarray | None = None
    # Scored by exchange (`NeuralScheduler.score_by_exchanges`): the exchange each row's logit came from, counted from
    # its chat's end (0: the last, which a row of one exchange is); None when the rows were read whole.
    exchange_from_end: np.ndarray | None = None

    def columns(self) -> dict[str, np.ndarray]:
        columns = {"weight": self.weight, "weight_std": self.weight_std, "posterior_mu": self.mu,
                   "posterior_sigma": self.sigma, "prior_mean": self.prior_mean, "unshifted_mu": self.unshifted_mu}
        return columns if self.exchange_from_end is None else columns | {"exchange_from_end": self.exchange_from_end}


def build_posterior(config: dict[str, Any], bank: AlignmentBank) -> SetPosterior:
    """The SetPosterior described by a checkpoint's `scheduler` entry (also used at training time)."""
    network = build_network(config["embed_dim"], **config["network"])
    prior = SafetyPrior(**config["prior"])
    # checkpoints written before the set's evidence (or the refinement, or the lexical contrast) was stored score without it
    return SetPosterior(network, prior, bank, k=config["k"], evidence=SetEvidence(**config.get("evidence", {})),
                        refinement=SetRefinement(**config.get("refinement", {})),
                        lexical=LexicalContrast(**config.get("lexical", {})),
                        alignment_prompts=tuple(config.get("alignment_prompts", ())))


def checked_taper(taper: Any, name: str = "scoring_shift_taper") -> list[float]:
    """Two fractions of the set 0 <= low < high <= 1 (harmful fractions for a taper, shares of rows below
    `withhold_below` for the block), or a one-line error naming the option."""
    try:
        low, high = (float(end) for end in taper)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected two fractions of the set [low, high]; got {taper!r}") from None
    try:
        check_taper(low, high, name)
    except ValueError as error:
        raise DataError(str(error)) from None
    return [low, high]


class NeuralScheduler:
    """A trained amortised scheduler, ready to weight any dataset."""

    # False: a row that reads as no English gets weight 0 in a set that holds rows that do. The evidence comes from
    # English text; a harmful row in a cipher no simple decoding undoes read as the safest row of its set (AUROC
    # 0.0010 on Dolly sets, docs/validation.md, "Rows in a cipher"), and the benign rows that teach the cipher are
    # as unreadable. True scores them as any row.
    score_unreadable: bool = False
    # True: a chat of several exchanges is scored by its exchanges (`score_examples`). It reads a harmful exchange
    # wherever it sits: chats of 2-6 exchanges with the row's own anywhere, 0.8984-0.9183 at p = 0.1 on three fresh
    # tasks where the whole chat's reading gave 0.7072-0.7737 and both baselines 0.5892-0.7764; the middle of three
    # 0.8917-1.0000 on nine tasks (read as one row 0.42-0.82, both baselines 0.43-0.85). False reads a chat as one row
    # (docs/validation.md, "A margin that grows with a chat's exchanges").
    score_by_exchange: bool = True
    # A chat of n exchanges scored by them is raised by exchange_margin * ln(n) logits: each exchange is a chance to
    # flag a benign chat, and the lowest of n logits with a logistic tail lies about ln(n) scales below one. Clean sets
    # of chats of 2-20 exchanges on eleven tasks kept 0.980-1.000 of their benign rows (lowest draw 0.955); a flat
    # margin of 6 kept 0.965 on a draw of chats of five, no margin 0.885. The margin is also cover: harmful exchanges
    # padded into chats of 20 were read near chance (0.55-0.60 at p = 0.1) before the cap below.
    exchange_margin: float = 6.0
    # The margin stops growing past this many exchanges (None: it grows with every one), so padding a harmful exchange
    # with benign ones buys no more cover than a chat of five has. Harmful chats padded to 8-20 exchanges read
    # 0.8432 / 0.9023 at p = 0.1 on a fresh round (cap 6: 0.8186 / 0.8822; uncapped 0.61-0.73 on another), chats of
    # natural lengths within 0.0032 of cap 6, clean sets within 0.005. Cap 4 cost clean chats of five
    # (docs/validation.md, "Padding: a margin that stops growing").
    exchange_margin_cap: int | None = 5
    # An exchange whose answer has at most this many words (an acknowledgement) is read with the next exchange, its
    # request before that one's (0, the default: every exchange is read on its own; `features.chat_exchanges`). At 8
    # it read harmful requests split across turns in Dolly sets at 0.8867 / 0.9296 where the default read 0.8356 /
    # 0.8091 (fresh round), but cost chats of one-word answers: a clean SST-2 chat set kept 0.865 of its rows on one
    # draw (default 0.985), and MMLU chats fell 0.0138 (docs/validation.md, "A request split across turns").
    short_answer_words: int = 0

    def __init__(self, posterior: SetPosterior, config: dict[str, Any], embedder: Embedder | None = None):
        self.posterior = posterior.eval()
        self.config = config
        self.transform = config["transform"]
        self.embedder = embedder or Embedder(config["embedder"], max_seq_length=config["embedder_max_seq_length"],
                                             joint_max_seq_length=config.get("embedder_joint_max_seq_length", 256))
        if self.embedder.dim != config["embed_dim"]:
            raise DataError(f"embedder '{self.embedder.name}' gives {self.embedder.dim}-d embeddings; the checkpoint "
                            f"was trained with '{config['embedder']}' ({config['embed_dim']}-d)")

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: Embedder | None = None, scoring_shift: float | None = None,
             scoring_shift_taper: Sequence[float] | None = None,
             withhold_below: float | None = None,
             withhold_block: Sequence[float] | None = None,
             withhold_spares_refusals: bool | None = None, score_unreadable: bool = False,
             score_by_exchange: bool = True, exchange_margin: float | None = None,
             exchange_margin_cap: int | None = None, short_answer_words: int | None = None) -> NeuralScheduler:
        """Load a checkpoint written by train_scheduler.py (or any BDSModule checkpoint).

        `scoring_shift` replaces the checkpoint's prior log-odds of a benign row at scoring (`SafetyPrior`):
        higher keeps more rows at weight >= 0.5, lower flags more. `scoring_shift_taper` replaces the ends of the
        taper that sets the final shift (`SafetyPrior`: the confident taper when the checkpoint has one), the
        harmful fractions over which that shift shrinks to 0: higher ends keep more benign rows of sets that
        hold harmful rows, and let more harmful weight through. `withhold_below` withholds the set's shift from rows
        whose unshifted logit lies below it (`SafetyPrior.row_shift`; -6 was measured): less harmful weight let
        through, fewer benign rows kept. `withhold_block` withholds it only from a set whose share of such rows exceeds
        its low end ([0.06, 0.07] was measured). `withhold_spares_refusals` keeps the whole shift for rows whose answer
        opens with a refusal, and leaves them out of the block's count. None keeps the checkpoint's.
        `score_unreadable` scores rows that read as no English as any row (`NeuralScheduler.score_unreadable`).
        `score_by_exchange` scores a chat of several exchanges by its exchanges (`NeuralScheduler.score_by_exchange`);
        False reads it as one row. A chat of n exchanges is raised by `exchange_margin` * ln(n) logits
        (`NeuralScheduler.exchange_margin`; None keeps 6); past `exchange_margin_cap` exchanges it stops growing
        (None keeps 5; a large number lets it grow with every exchange). An exchange answered in at most
        `short_answer_words` words is read with the next (`NeuralScheduler.short_answer_words`; None keeps the
        scheduler's)."""
        path = Path(path)
        for name, value in (("scoring_shift", scoring_shift), ("withhold_below", withhold_below),
                            ("exchange_margin", exchange_margin)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DataError(f"{name}: expected a number (a logit, e.g. 0 or -6); got {value!r}")
        for name, value, least, expected in (
                ("exchange_margin_cap", exchange_margin_cap, 1, "a whole number of exchanges >= 1 (e.g. 6)"),
                ("short_answer_words", short_answer_words, 0, "a whole number of words >= 0 (0: off)")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise DataError(f"{name}: expected {expected} or null; got {value!r}")
        taper = None if scoring_shift_taper is None else checked_taper(scoring_shift_taper)
        block = None if withhold_block is None else checked_taper(withhold_block, "withhold_block")
        for name, value in (("withhold_spares_refusals", withhold_spares_refusals),
                            ("score_unreadable", score_unreadable), ("score_by_exchange", score_by_exchange)):
            if value is not None and not isinstance(value, bool):
                raise DataError(f"{name}: expected true or false; got {value!r}")
        if not path.is_file():
            raise DataError(f"{path}: checkpoint not found")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises many types for a damaged file
            raise DataError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
        if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
            raise DataError(f"{path}: not a scheduler checkpoint (no '{CHECKPOINT_KEY}' entry); expected a file "
                            "written by train_scheduler.py")
        config = checkpoint[CHECKPOINT_KEY]
        prior = dict(config["prior"])  # the operating point's overrides; the checkpoint's config is left as it is
        if scoring_shift is not None:
            prior["scoring_shift"] = float(scoring_shift)
        if taper is not None:
            prior["confident_taper" if prior.get("confident_taper") else "scoring_shift_taper"] = taper
        if withhold_below is not None:
            prior["withhold_below"] = float(withhold_below)
        if block is not None:
            prior["withhold_block"] = block
        if withhold_spares_refusals is not None:
            prior["withhold_spares_refusals"] = withhold_spares_refusals
        config = {**config, "prior": prior}
        prefix = "posterior."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        bank = AlignmentBank(state["bank_prompts"], state["bank_responses"], state.get("bank_joint"))
        try:  # the prior checks how the operating point's options fit together (withhold_block needs withhold_below)
            posterior = build_posterior(config, bank)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None
        posterior.load_state_dict(state)
        scheduler = cls(posterior, config, embedder)
        scheduler.score_unreadable = bool(score_unreadable)
        scheduler.score_by_exchange = bool(score_by_exchange)
        if exchange_margin is not None:
            scheduler.exchange_margin = float(exchange_margin)
        if exchange_margin_cap is not None:
            scheduler.exchange_margin_cap = exchange_margin_cap
        if short_answer_words is not None:
            scheduler.short_answer_words = short_answer_words
        return scheduler

    @property
    def needs_joint(self) -> bool:
        """Whether scoring reads the joint embeddings (checkpoints older than them, or designs without, do not)."""
        return self.posterior.reads_joint_at_scoring

    @property
    def needs_texts(self) -> bool:
        """Whether scoring reads the rows' prompt and answer texts as well as their embeddings (the lexical contrast)."""
        return self.posterior.reads_texts_at_scoring

    def read(self, examples: Sequence[Example], like: Sequence[Example] | None = None) -> list[Example]:
        """The rows as the scheduler reads them: a prompt with other readings (a decoded part beside plain text, a
        chat's own system turn; `scheduler.features.readings`) is read as the reading most like the checkpoint's
        alignment prompts (`most_alignment_like_readings`); in rows mostly made of chats whose last request lies past
        the prompt window, each chat's joint text reads its last exchange (`chats_read_by_last_exchange`). `like`:
        rows already read, whose choice of joint text these rows take, since the two are scored in one set."""
        read = most_alignment_like_readings(examples, self.embedder, self.posterior.bank, self.posterior.k)
        chosen = None if like is None else any(e.joint_prompt for e in like)
        return chats_read_by_last_exchange(read, self.embedder, chosen)

    def embed(self, examples: Sequence[Example], use_cache: bool = True) -> RowEmbeddings:
        return self.embedder.embed_examples(examples, use_cache, joint=self.needs_joint)

    @torch.no_grad()
    def score_embeddings(self, prompts: torch.Tensor, responses: torch.Tensor, joint: torch.Tensor | None = None,
                         texts: RowTexts | None = None) -> ScoreResult:
        """Weights for one set from its rows' embeddings (`texts`: the rows' prompts and answers, which the lexical
        contrast reads; `needs_texts`)."""
        scored = self.posterior.score_set(prompts, responses, joint, texts)
        posterior = scored.posterior
        unreadable = None if texts is None else unreadable_rows(texts)
        weight, std = self._weights(posterior.mu, posterior.sigma, unreadable)
        moments = posterior.moments()
        return ScoreResult(weight, std, moments.mu.numpy(), moments.sigma.numpy(), posterior.prior_mean.numpy(),
                           scored.expected_harmful_fraction, scored.scoring_shift, scored.withheld,
                           scored.unshifted_mu.numpy(), unreadable)

    def _weights(self, mu: torch.Tensor, sigma: torch.Tensor,
                 unreadable: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The transform's weights and their spread, mean 1 over the set; rows that read as no English (`unreadable`,
        None when unknown) get 0 unless `score_unreadable`, and the rest mean 1 again."""
        weight, std = (values.numpy() for values in posterior_weights(mu, sigma, self.transform))
        if unreadable is not None and not self.score_unreadable and 0 < unreadable.sum() < len(weight):
            scale = len(weight) / weight[~unreadable].sum()
            weight, std = np.where(unreadable, 0.0, weight * scale), np.where(unreadable, 0.0, std * scale)
        return weight, std

    def score_examples(self, examples: Sequence[Example], embeddings: RowEmbeddings) -> ScoreResult:
        """Weights for one set of rows as `read` gives them, from their embeddings; by their exchanges where
        `score_by_exchange` is on and the set holds chats of several exchanges (the row embeddings are not read then)."""
        if self.score_by_exchange and any(e.exchanges for e in examples):
            return self.score_by_exchanges(examples)
        return self.score_embeddings(*embeddings, texts=RowTexts.of(examples))

    def score_by_exchanges(self, examples: Sequence[Example]) -> ScoreResult:
        """Each chat as harmful as its most harmful exchange: the exchanges at one place in their chats (counted from
        the end; rows that are not such chats are their own last exchange; places few chats reach pooled,
        `exchange_places`) are read and scored as one set, and a chat takes the exchange with the lowest posterior
        mean logit, its set's shift included, raised by `exchange_margin` * ln(`margin_exchanges`). Scored as one set,
        a harmful exchange in the middle of a chat is read as a plain row would be; a clean place's set keeps its own
        shift, so its exchanges keep their weight (docs/validation.md, "A harmful exchange in the middle of a chat",
        "A margin that grows with a chat's exchanges")."""
        lowest = {name: np.full(len(examples), np.inf) for name in ("mu", "sigma", "prior_mean", "unshifted_mu")}
        from_end = np.zeros(len(examples), dtype=int)
        fractions, shifts, withheld = [], [], 0
        for exchanges in exchange_places(examples, short_answer_words=self.short_answer_words):
            read = self.read(exchanges.rows)
            result = self.score_embeddings(*self.embed(read), texts=RowTexts.of(read))
            pick = lowest_per_owner(exchanges.owners, result.mu)
            owners = exchanges.owners[pick]
            lower = result.mu[pick] < lowest["mu"][owners]
            for name in lowest:
                lowest[name][owners] = np.where(lower, getattr(result, name)[pick], lowest[name][owners])
            from_end[owners] = np.where(lower, exchanges.from_end[pick], from_end[owners])
            fractions.append(result.expected_harmful_fraction)
            shifts.append(result.scoring_shift)
            withheld += result.withheld
        margin = self.exchange_margin * np.log(self.margin_exchanges(examples))
        lowest["mu"], lowest["unshifted_mu"] = lowest["mu"] + margin, lowest["unshifted_mu"] + margin
        unreadable = unreadable_rows(RowTexts.of(examples))
        weight, std = self._weights(torch.as_tensor(lowest["mu"]), torch.as_tensor(lowest["sigma"]), unreadable)
        most = int(np.argmax(fractions))  # the set's summary is its most harmful place's: fraction and shift
        return ScoreResult(weight, std, lowest["mu"], lowest["sigma"], lowest["prior_mean"], fractions[most],
                           shifts[most], withheld, lowest["unshifted_mu"], unreadable, from_end)

    def margin_exchanges(self, examples: Sequence[Example]) -> np.ndarray:
        """How many of each row's exchanges its margin counts: all of them (a plain row is one), up to
        `exchange_margin_cap`. Exchanges read with the next (`short_answer_words`) count too: counted only as scored,
        chats of short-answer tasks lost their margin and were read as less safe (MMLU 0.9435 -> 0.9068 at p = 0.1;
        docs/validation.md, "A request split across turns")."""
        counted = np.array([max(len(e.exchanges), 1) for e in examples])
        return counted if self.exchange_margin_cap is None else np.minimum(counted, self.exchange_margin_cap)

    @torch.no_grad()
    def lookup_probability(self, prompts: torch.Tensor) -> np.ndarray:
        """The label-free baseline on the same rows: each prompt's similarity to the checkpoint's alignment prompts,
        through the checkpoint's calibrated prior, as a probability of benign (before any normalisation over the set).
        What a user would do without the scheduler."""
        return lookup_probability(prompts, self.posterior.bank, self.config["k"], self.posterior.prior)

    def score(self, rows: Iterable[Any]) -> ScoreResult:
        """Weights for rows given as dicts of any supported schema or as plain strings; the rows form one set."""
        examples = self.read(as_examples(rows))
        return self.score_examples(examples, self.embed(examples))

    def clean_p_values(self, rows: Iterable[Any], clean_rows: Iterable[Any]) -> np.ndarray:
        """Each row's conformal p-value among the user's clean rows, scored in one set with them
        (`clean_p_values_from_embeddings`): flag p <= rate to drop at most `rate` of new clean rows like them."""
        examples = self.read(as_examples(rows))
        clean = self.read(as_examples(clean_rows), like=examples)
        return self.clean_p_values_from_embeddings(examples, self.embed(examples), clean, self.embed(clean))

    def clean_p_values_from_embeddings(self, examples: Sequence[Example], embeddings: RowEmbeddings,
                                       clean: Sequence[Example], clean_embeddings: RowEmbeddings) -> np.ndarray:
        """The set's rows and the clean rows are scored as one set (`score_examples`), and each row's `unshifted_mu`
        is read against the clean rows' (`conformal_p_values`). Scored in one set, a clean row and a benign row of the
        set are read against the same rows, so they are exchangeable however many harmful rows the set holds: the cost
        in benign rows holds on a contaminated set, where a cut fitted on the clean rows scored apart flags fewer
        benign rows than it was fitted to, and catches fewer harmful ones (docs/validation.md, "Clean rows scored
        inside the set")."""
        pooled = RowEmbeddings(*(None if rows is None else torch.cat([rows, clean_rows])
                                 for rows, clean_rows in zip(embeddings, clean_embeddings, strict=True)))
        mu = self.score_examples([*examples, *clean], pooled).unshifted_mu
        return conformal_p_values(mu[len(examples):], mu[:len(examples)])


def lowest_per_owner(owners: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The index of each owner's lowest `mu`, one per owner: a set of pooled places can hold two exchanges of a chat."""
    order = np.lexsort((mu, owners))
    return order[np.r_[True, owners[order][1:] != owners[order][:-1]]]


def unreadable_rows(texts: RowTexts) -> np.ndarray:
    """Whether each row reads as no English (`reads_as_english`)."""
    return np.array([not reads_as_english(prompt, response) for prompt, response in zip(texts.prompts, texts.responses)])


def as_examples(rows: Iterable[Any]) -> list[Example]:
    """Rows as `Example`s: given so, or dicts of any supported schema, or plain strings."""
    return rows if isinstance(rows, list) and rows and isinstance(rows[0], Example) else examples_from_rows(list(rows))
