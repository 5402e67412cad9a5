"""Amortized Bayesian Data Scheduler: label-free per-sample weights against harmful fine-tuning data."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.scoring import NeuralScheduler, ScoreResult

__all__ = ["NeuralScheduler", "ScoreResult"]


def __getattr__(name: str):
    """Import the scorer (and torch) on first use, so that light commands such as `scheduler.across_seeds` start fast."""
    if name in __all__:
        from scheduler import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
