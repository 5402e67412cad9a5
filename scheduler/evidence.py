"""LM evidence about a sample's safety: the energy E_i in the BDS likelihood exp(-T(z_i) E_i).

`loss` is the paper's choice (the response loss under the co-trained LM). DESIGN.md §7
shows it points the wrong way on a small LM that does not refuse, so alternatives that
stay label-free are offered and chosen by validation:
- `refusal`: how likely the co-trained LM is to refuse the prompt (higher = less safe);
- `margin`: the sample's own answer against a refusal, log p(refusal) - log p(answer);
- `none`: no LM evidence, the posterior is the alignment-informed prior.
"""

from __future__ import annotations

import torch
from torch import nn

from scheduler.data.io import Example
from scheduler.lm import DEFAULT_REFUSAL, ResponseTokenizer, autocast_context, response_nll

SIGNALS = ("loss", "refusal", "margin", "none")


class LMEvidence:
    """Per-sample response losses (for co-training) and energies (for the scheduler) from one LM."""

    def __init__(self, model: nn.Module, tokenizer, signal: str = "refusal", refusal: str = DEFAULT_REFUSAL,
                 max_prompt_tokens: int = 64, max_response_tokens: int = 32, precision: str = "auto"):
        if signal not in SIGNALS:
            raise ValueError(f"unknown evidence signal '{signal}'; expected one of {', '.join(SIGNALS)}")
        self.model, self.signal, self.refusal, self.precision = model, signal, refusal, precision
        self.tokenize = ResponseTokenizer(tokenizer, max_prompt_tokens, max_response_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def response_loss(self, examples: list[Example]) -> torch.Tensor:
        """Token-mean NLL of each sample's response (differentiable)."""
        batch = self.tokenize([e.prompt for e in examples], [e.response for e in examples]).to(self.device)
        with autocast_context(self.device, self.precision):
            return response_nll(self.model, batch).float()

    @torch.no_grad()
    def refusal_loss(self, examples: list[Example]) -> torch.Tensor:
        batch = self.tokenize([e.prompt for e in examples], [self.refusal] * len(examples)).to(self.device)
        with autocast_context(self.device, self.precision):
            return response_nll(self.model, batch).float()

    @torch.no_grad()
    def energy(self, examples: list[Example], response_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Higher energy = the LM's evidence says the sample is less safe."""
        if self.signal == "none":
            return torch.zeros(len(examples), device=self.device)
        if response_loss is None and self.signal in ("loss", "margin"):
            response_loss = self.response_loss(examples)
        if self.signal == "loss":
            return response_loss.detach()
        refusal = self.refusal_loss(examples)
        if self.signal == "refusal":
            return -refusal
        return response_loss.detach() - refusal
