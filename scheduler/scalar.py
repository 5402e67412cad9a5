"""The paper's scalar BDS: one free posterior per row, optimised on one dataset with the LM in the loop.

It is the per-dataset reference the amortised network must approach, and the cost it saves:
every new dataset needs a fresh run with the co-trained LM, where the amortised scheduler
only embeds the rows. The objective, prior, LM and evidence are the amortised training's own
(`BDSModule` with a `ScalarNetwork` in place of the MLP); the LoRA adapter starts fresh per dataset.
"""

from __future__ import annotations

import copy
import random

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from scheduler.data.datamodule import EmbeddedSet, SetBatch
from scheduler.data.io import Example
from scheduler.evidence import LMEvidence
from scheduler.features import SetEvidence
from scheduler.network import ScalarNetwork, SetPosterior
from scheduler.training import evidence_config, make_module
from scheduler.transforms import posterior_weights


class WeightHistory(L.Callback):
    """The posterior weights of every row after each training step (for the weight-evolution plot)."""

    def __init__(self, embedded: EmbeddedSet):
        self.embedded, self.steps = embedded, []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        posterior = module.posterior(self.embedded.prompts.to(module.device), self.embedded.responses.to(module.device))
        self.steps.append(posterior_weights(posterior.mu, posterior.sigma, module.transform)[0].cpu().numpy())


class ScalarBDS:
    """Runs scalar BDS on one dataset at a time, resetting the LM's adapter between datasets."""

    def __init__(self, model_cfg: DictConfig, reference: SetPosterior, evidence: LMEvidence | None,
                 alignment: list[Example], lm_batch_size: int = 8, network_lr: float = 0.05,
                 network_updates: int = 4, network_only_steps: int = 100, seed: int = 0, accelerator: str = "cpu"):
        self.model_cfg = OmegaConf.merge(model_cfg, {"network_lr": network_lr, "network_updates": network_updates,
                                                     "lm_steps": None})
        self.reference, self.evidence, self.alignment = reference, evidence, alignment
        self.lm_batch_size, self.network_only_steps, self.seed = lm_batch_size, network_only_steps, seed
        self.accelerator = accelerator
        self.initial_adapter = None
        if evidence is not None:
            from peft import get_peft_model_state_dict

            self.initial_adapter = copy.deepcopy(get_peft_model_state_dict(evidence.model))

    def _reset_lm(self) -> None:
        if self.initial_adapter is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.evidence.model, self.initial_adapter)

    def _batches(self, embedded: EmbeddedSet) -> list[SetBatch]:
        """One pass of LM batches over the rows (each judged once), then network-only steps."""
        rng = random.Random(self.seed)
        order = rng.sample(range(len(embedded.examples)), len(embedded.examples))
        batches = []
        if self.evidence is not None:
            for start in range(0, len(order), self.lm_batch_size):
                alignment = rng.sample(self.alignment, min(self.lm_batch_size, len(self.alignment)))
                batches.append(SetBatch(embedded, order[start:start + self.lm_batch_size], alignment))
        return batches + [SetBatch(embedded)] * self.network_only_steps

    def run(self, embedded: EmbeddedSet) -> tuple[np.ndarray, list[np.ndarray]]:
        """(final weights, weights after every step) for one dataset."""
        L.seed_everything(self.seed, workers=True, verbose=False)
        self._reset_lm()
        n = len(embedded.examples)
        local = EmbeddedSet(embedded.name, embedded.examples, embedded.prompts, embedded.responses,
                            torch.arange(n), embedded.labels, embedded.joint)
        # the scalar posterior weighs the set's evidence in its own optimisation, not again at scoring
        evidence = SetEvidence(**{**evidence_config(self.model_cfg), "scoring_weight": 0.0})
        posterior = SetPosterior(ScalarNetwork(n, self.model_cfg.network.init_sigma), copy.deepcopy(self.reference.prior),
                                 self.reference.bank, self.reference.k, evidence)
        module = make_module(self.model_cfg, posterior, self.evidence, n_rows=n)
        history = WeightHistory(local)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator=self.accelerator, devices=1, callbacks=[history],
                            limit_val_batches=0)
        trainer.fit(module, train_dataloaders=DataLoader(self._batches(local), batch_size=1, collate_fn=lambda b: b[0]))
        return history.steps[-1], history.steps
