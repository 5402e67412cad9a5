"""A second view of each row: its answer's characters, read with a model of the alignment set's wording.

Everything else the scheduler reads is a MiniLM embedding. The short harmful questions that it ranks among a
chat task's benign questions ("what is X's social security number?") sit close to that task in MiniLM space,
but their words ("steal", "insult", "kill") are the alignment set's. For each scored set a logistic regression
on character n-grams learns to tell the alignment prompts from the set's own prompts; each row's *answer* is then
scored by a regression fitted on the other rows only (cross-fitting). No label enters: the positives are the
alignment prompts, the negatives every row of the set, harmful or not. The log-odds, standardised around the
set's median, count against a row's safety logit.

Why the answer and not the prompt: a frame that an attacker wraps around many harmful requests ("I'm writing a
novel...") is shared by the set's prompts and absent from the alignment prompts, so a regression fitted on the
prompts learns its words as "this set". Scored on the prompt, a framed harmful request then looks safer; the
answer never holds the frame, and an answer's own wrapper ("Great question! ... stay safe") is in neither fitted
text, so it carries no weight. Validation (docs/validation.md, "The answer's wording") found that scoring the
prompt lost up to 0.09 AUROC on framed sets, and scoring the answer gained on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from scipy.sparse import vstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


class RowTexts(NamedTuple):
    """The texts of a scored set's rows, which the lexical contrast reads beside their embeddings."""

    prompts: Sequence[str]
    responses: Sequence[str]

    @classmethod
    def of(cls, examples: Sequence) -> RowTexts:
        return cls([e.prompt for e in examples], [e.response for e in examples])


@dataclass(frozen=True)
class LexicalContrast:
    """`weight`: logit per standard deviation of the set's log-odds (0 = off); `folds`: cross-fitting parts;
    `ngram_range`: character n-gram lengths (within word boundaries); `regularisation`: the regression's C."""

    weight: float = 0.0
    folds: int = 5
    ngram_range: tuple[int, int] = (3, 5)
    regularisation: float = 1.0

    def __post_init__(self):  # configs and checkpoints give the range as a list
        object.__setattr__(self, "ngram_range", tuple(self.ngram_range))

    def evidence(self, texts: RowTexts, alignment_prompts: Sequence[str]) -> torch.Tensor:
        """Each answer's standardised log-odds of reading like an alignment prompt rather than a prompt of its set (N,)."""
        return torch.as_tensor(cross_fitted_log_odds(tuple(texts.prompts), tuple(texts.responses),
                                                     tuple(alignment_prompts), self.folds, self.ngram_range,
                                                     self.regularisation), dtype=torch.float32)


@lru_cache(maxsize=32)  # validation scores one set at several operating points; the fit is the slow part
def cross_fitted_log_odds(prompts: tuple[str, ...], responses: tuple[str, ...], alignment_prompts: tuple[str, ...],
                          folds: int, ngram_range: tuple[int, int], regularisation: float) -> np.ndarray:
    folds = min(folds, len(prompts))
    if folds < 2 or not alignment_prompts:
        return np.zeros(len(prompts))
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range, min_df=2, sublinear_tf=True)
    fitted = vectorizer.fit_transform(alignment_prompts + prompts)
    alignment, rows, answers = fitted[:len(alignment_prompts)], fitted[len(alignment_prompts):], vectorizer.transform(responses)
    log_odds = np.zeros(len(prompts))
    order = np.random.default_rng(0).permutation(len(prompts))
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        is_alignment = np.r_[np.ones(alignment.shape[0]), np.zeros(len(rest))]  # membership, not harm
        # Newton-CG reaches the optimum (to ~1e-5 in log-odds) in a third of L-BFGS's time, which stops ~0.03 short.
        model = LogisticRegression(C=regularisation, solver="newton-cg", tol=1e-6, max_iter=3000, class_weight="balanced")
        log_odds[part] = model.fit(vstack([alignment, rows[rest]]), is_alignment).decision_function(answers[part])
    spread = log_odds.std()
    return (log_odds - np.median(log_odds)) / spread if spread > 0 else np.zeros(len(prompts))
