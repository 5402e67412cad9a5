"""LM evidence about a sample's safety: the energy E_i in the BDS likelihood exp(-T(z_i) E_i).

`loss` is the paper's choice (the response loss under the co-trained LM). DESIGN.md §7
shows it points the wrong way on a small LM that does not refuse, so alternatives that
stay label-free are offered and chosen by validation:
- `reference`: the loss with the co-trained adapter minus without it (cancels task difficulty);
- `refusal`: how likely the co-trained LM is to refuse the prompt (higher = less safe);
- `refusal_gain`: how much co-training raised that likelihood over the base model;
- `margin`: the sample's own answer against a refusal, log p(refusal) - log p(answer);
- `none`: no LM evidence, the posterior is the prior (plus any embedding evidence).
"""

from __future__ import annotations

import torch
from torch import nn

from scheduler.data.io import Example
from scheduler.lm import DEFAULT_REFUSAL, LowerLayerCache, ResponseTokenizer, autocast_context, response_nll

# Each signal is a function of up to four per-row statistics: token-mean NLL of the row's
# own answer and of a fixed refusal, each with the co-trained adapter (`_lm`) and without it (`_base`).
SIGNAL_FORMULAS = {
    "loss": (("response_lm",), lambda s: s["response_lm"]),
    "reference": (("response_lm", "response_base"), lambda s: s["response_lm"] - s["response_base"]),
    "refusal": (("refusal_lm",), lambda s: -s["refusal_lm"]),
    "refusal_gain": (("refusal_lm", "refusal_base"), lambda s: s["refusal_base"] - s["refusal_lm"]),
    "margin": (("response_lm", "refusal_lm"), lambda s: s["response_lm"] - s["refusal_lm"]),
    "none": ((), None),
}
SIGNALS = tuple(SIGNAL_FORMULAS)
STATISTICS = ("response_lm", "response_base", "refusal_lm", "refusal_base")


def signal_from_stats(stats: dict, signal: str):
    """The energy of `signal` (higher = less safe) from per-row statistics (numpy arrays or tensors)."""
    if signal not in SIGNAL_FORMULAS:
        raise ValueError(f"unknown evidence signal '{signal}'; expected one of {', '.join(SIGNALS)}")
    needed, formula = SIGNAL_FORMULAS[signal]
    return formula(stats) if needed else 0 * next(iter(stats.values()))


class LMEvidence:
    """Per-sample response losses (for co-training) and energies (for the scheduler) from one LM."""

    def __init__(self, model: nn.Module, tokenizer, signal: str = "refusal", refusal: str = DEFAULT_REFUSAL,
                 max_prompt_tokens: int = 64, max_response_tokens: int = 32, precision: str = "auto",
                 hidden_cache_rows: int = 4096):
        if signal not in SIGNALS:
            raise ValueError(f"unknown evidence signal '{signal}'; expected one of {', '.join(SIGNALS)}")
        self.model, self.signal, self.refusal, self.precision = model, signal, refusal, precision
        self.tokenize = ResponseTokenizer(tokenizer, max_prompt_tokens, max_response_tokens)
        self.lower_layers = LowerLayerCache.for_model(model, hidden_cache_rows)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _nll(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        batch = self.tokenize(prompts, responses).to(self.device)
        with autocast_context(self.device, self.precision):
            if self.lower_layers is not None:
                return self.lower_layers.response_nll(batch).float()
            return response_nll(self.model, batch).float()

    def response_loss(self, examples: list[Example]) -> torch.Tensor:
        """Token-mean NLL of each sample's response (differentiable)."""
        return self._nll([e.prompt for e in examples], [e.response for e in examples])

    @torch.no_grad()
    def refusal_loss(self, examples: list[Example]) -> torch.Tensor:
        return self._nll([e.prompt for e in examples], [self.refusal] * len(examples))

    @torch.no_grad()
    def statistics(self, examples: list[Example], needed: tuple[str, ...] = STATISTICS,
                   response_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The `needed` per-row statistics; the `_base` ones run with the adapter disabled."""
        stats = {"response_lm": response_loss if response_loss is not None else self.response_loss(examples)}
        if "refusal_lm" in needed:
            stats["refusal_lm"] = self.refusal_loss(examples)
        if "response_base" in needed or "refusal_base" in needed:
            with self.model.disable_adapter():
                stats["response_base"] = self.response_loss(examples)
                stats["refusal_base"] = self.refusal_loss(examples)
        return stats

    @torch.no_grad()
    def energy(self, examples: list[Example], response_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Higher energy = the LM's evidence says the sample is less safe."""
        needed, _ = SIGNAL_FORMULAS[self.signal]
        return signal_from_stats(self.statistics(examples, needed, response_loss), self.signal).detach()
