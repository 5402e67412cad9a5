"""Amortized Bayesian Data Scheduler: label-free per-sample weights against harmful fine-tuning data."""

from scheduler.scoring import NeuralScheduler, ScoreResult

__all__ = ["NeuralScheduler", "ScoreResult"]
