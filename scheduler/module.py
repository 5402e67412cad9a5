"""LightningModule implementing the Bayesian Data Scheduler with an amortised posterior.

Each step sees one fine-tuning set and alternates two updates (manual optimisation):
- LM (LoRA): mean loss on an alignment batch + mean of w_i * loss_i on a batch of the set,
  with w_i the posterior mean weight, detached;
- scheduler network: E_q[sum_i T(z_i) E_i] / N + KL(q || prior), with reparameterised
  samples z ~ q and the LM's energies E_i detached (optionally with Langevin noise).
Energies are kept in a bank indexed by row id and refreshed whenever the LM visits a row,
so the network learns from every row the LM has judged, not only the current batch. The
network is cheap and the LM is not: after `lm_steps` the LM stops and the network goes on
learning from the bank (all steps when `lm_steps` is None).
Harmful/benign labels are used only to log validation metrics.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from sklearn.metrics import roc_auc_score

from scheduler.data.datamodule import SetBatch, joint_of
from scheduler.evidence import LMEvidence
from scheduler.lexical import RowTexts
from scheduler.network import Posterior, SetPosterior
from scheduler.transforms import get_transform, posterior_weights


def standardise_known(energy: torch.Tensor) -> torch.Tensor:
    """z-score the energies of the rows the LM has judged (NaN = not yet); unknown rows get 0.

    Standardising within the set removes task difficulty and the LM's overall scale, so
    the likelihood temperature means the same thing on every set.
    """
    known = ~torch.isnan(energy)
    out = torch.zeros_like(energy)
    if known.sum() >= 2:
        values = energy[known]
        out[known] = (values - values.mean()) / values.std().clamp(min=1e-6)
    return out


class BDSModule(L.LightningModule):
    def __init__(self, posterior: SetPosterior, evidence: LMEvidence | None, n_rows: int, transform: str = "sigmoid",
                 n_samples: int = 8, likelihood_temperature: float = 8.0, network_lr: float = 5e-3,
                 lm_lr: float = 1e-3, network_updates: int = 2, langevin_noise: float = 0.0, weight_decay: float = 1e-4,
                 lm_steps: int | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen base LM is not stored in checkpoints
        self.posterior = posterior
        self.evidence = evidence
        self.lm = evidence.model if evidence is not None else None
        self.transform = transform
        self.weight_fn = get_transform(transform)
        self.n_samples, self.temperature = n_samples, likelihood_temperature
        self.network_lr, self.lm_lr, self.weight_decay = network_lr, lm_lr, weight_decay
        self.network_updates, self.langevin_noise = network_updates, langevin_noise
        self.lm_steps = lm_steps
        self.register_buffer("energy_bank", torch.full((n_rows,), float("nan")))
        # Lightning's global_step counts every optimizer step under manual optimisation; count LM steps here.
        self.register_buffer("lm_steps_done", torch.tensor(0))
        self.scheduler_config: dict = {}

    def configure_optimizers(self):
        optimizers = [torch.optim.AdamW(self.posterior.network.parameters(), lr=self.network_lr,
                                        weight_decay=self.weight_decay)]
        if self.lm is not None:
            optimizers.append(torch.optim.AdamW([p for p in self.lm.parameters() if p.requires_grad], lr=self.lm_lr))
        return optimizers

    def set_energy(self, row_ids: torch.Tensor, prompts: torch.Tensor, responses: torch.Tensor,
                   relation: torch.Tensor | None = None, joint: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised LM energy of the judged rows plus the set's own embedding evidence (density ratios,
        contrasts, `SetEvidence`): no LM, no label."""
        return standardise_known(self.energy_bank[row_ids]) + self.posterior.set_energy(prompts, responses, relation, joint)

    def transfer_batch_to_device(self, batch: SetBatch, device: torch.device, dataloader_idx: int) -> SetBatch:
        """Tensors are moved where they are used; the batch also holds raw text for the LM."""
        return batch

    def network_loss(self, posterior: Posterior, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected weighted energy, mean KL to the prior), both per sample."""
        weights = self.weight_fn(posterior.sample(self.n_samples))
        data = (weights * energy).mean(0).mean() * self.temperature
        kl = self.posterior.prior.kl(posterior.mu, posterior.sigma, posterior.prior_mean).mean()
        return data, kl

    def _lm_step(self, batch: SetBatch, posterior: Posterior, optimizer) -> None:
        rows = batch.lm_rows
        examples = [batch.set.examples[i] for i in rows]
        weights, _ = posterior_weights(posterior.mu.detach(), posterior.sigma.detach(), self.transform, self.n_samples)
        ft_loss = self.evidence.response_loss(examples)
        align_loss = self.evidence.response_loss(batch.alignment) if batch.alignment else ft_loss.new_zeros(1)
        loss = align_loss.mean() + (weights[rows].to(ft_loss) * ft_loss).mean()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lm_steps_done += 1
        self.energy_bank[batch.set.row_ids[rows].to(self.device)] = self.evidence.energy(examples, ft_loss.detach()).to(self.energy_bank)
        self.log_dict({"train/lm_loss": loss.detach(), "train/alignment_loss": align_loss.mean().detach(),
                       "train/ft_loss": ft_loss.mean().detach()}, batch_size=len(rows))

    def training_step(self, batch: SetBatch, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        prompts, responses = batch.set.prompts.to(self.device), batch.set.responses.to(self.device)
        relation = self.posterior.relation(prompts, responses)  # fixed for the set: once per step, not per update
        if self.lm is not None and batch.lm_rows and (self.lm_steps is None or self.lm_steps_done < self.lm_steps):
            with torch.no_grad():
                current = self.posterior(prompts, responses, relation)
            self._lm_step(batch, current, optimizers[1])
        energy = self.set_energy(batch.set.row_ids.to(self.device), prompts, responses, relation, joint_of(batch.set, self.device))
        for _ in range(self.network_updates):
            data, kl = self.network_loss(self.posterior(prompts, responses, relation), energy)
            optimizers[0].zero_grad()
            self.manual_backward(data + kl)
            optimizers[0].step()
            self._langevin(optimizers[0])
        self.log_dict({"train/energy_term": data.detach(), "train/kl": kl.detach(), "train/lm_steps": self.lm_steps_done.float(),
                       "train/judged_rows": (~torch.isnan(self.energy_bank)).float().sum()}, prog_bar=True, batch_size=1)

    @torch.no_grad()
    def _langevin(self, optimizer) -> None:
        """SGLD-style noise, sqrt(2 lr) * scale, so the network samples rather than only optimises."""
        if self.langevin_noise <= 0:
            return
        lr = optimizer.param_groups[0]["lr"]
        for parameter in self.posterior.network.parameters():
            parameter.add_(torch.randn_like(parameter) * math.sqrt(2 * lr) * self.langevin_noise)

    def validation_step(self, batch: SetBatch, batch_idx: int) -> None:
        posterior = self.posterior.score(batch.set.prompts.to(self.device), batch.set.responses.to(self.device),
                                         joint_of(batch.set, self.device), RowTexts.of(batch.set.examples))
        weights, _ = posterior_weights(posterior.mu, posterior.sigma, self.transform)
        labels = batch.set.labels.to(weights.device)
        metrics = {"val/mean_benign_weight": weights[labels == 0].mean()}
        if 0 < labels.sum() < len(labels):
            metrics["val/auroc"] = torch.tensor(roc_auc_score(labels.cpu().numpy(), -weights.cpu().numpy()))
            metrics["val/harmful_weight_share"] = weights[labels == 1].sum() / weights.sum()
        self.log_dict(metrics, batch_size=1, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the LoRA adapter (for resuming) but not the frozen base LM, and everything scoring needs."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(("lm.", "evidence.")) or "lora_" in k}
        checkpoint["scheduler"] = {**self.scheduler_config, "transform": self.transform}
