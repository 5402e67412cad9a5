"""Assemble data, embedder, LM, scheduler network and Trainer from a Hydra config, and train."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from scheduler.data.datamodule import FineTuningSetsDataModule
from scheduler.embeddings import Embedder
from scheduler.evidence import LMEvidence
from scheduler.features import AlignmentBank, SetEvidence, alignment_similarity, topk_mean_similarity
from scheduler.lm import DEFAULT_REFUSAL, load_lm
from scheduler.module import BDSModule
from scheduler.network import SetPosterior, scoring_reads_joint
from scheduler.prior import SafetyPrior
from scheduler.refinement import SetRefinement
from scheduler.scoring import build_posterior

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "scheduler.ckpt"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """`${project_root:}` in configs: bundled data paths work from any working directory."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def scheduler_config(model_cfg: DictConfig, embedder: Embedder, alignment_prompts: Sequence[str],
                     full_cfg: DictConfig | None = None) -> dict[str, Any]:
    """What the checkpoint must carry to rebuild and use the network without the training config (the alignment
    prompts' texts only when the lexical contrast reads them)."""
    lexical = optional_section(model_cfg, "lexical")
    return {"embedder": embedder.name, "embedder_max_seq_length": embedder.max_seq_length,
            "embedder_joint_max_seq_length": embedder.joint_max_seq_length, "embed_dim": embedder.dim,
            "k": model_cfg.k, "network": OmegaConf.to_container(model_cfg.network),
            "prior": OmegaConf.to_container(model_cfg.prior), "evidence": evidence_config(model_cfg),
            "refinement": optional_section(model_cfg, "refinement"), "lexical": lexical,
            "alignment_prompts": list(alignment_prompts) if lexical.get("weight") else [], "signal": model_cfg.signal,
            "transform": model_cfg.transform, "family": "gaussian-logit",
            "config": OmegaConf.to_container(full_cfg, resolve=True) if full_cfg is not None else None}


def evidence_config(model_cfg: DictConfig) -> dict[str, float | int | bool]:
    """The `SetEvidence` weights of a model config (keys absent from configs older than them mean 0)."""
    return {"prompt_weight": model_cfg.density_ratio_weight,
            "response_weight": model_cfg.get("response_density_ratio_weight", 0.0),
            "scoring_weight": model_cfg.get("scoring_evidence_weight", 0.0),
            "prompt_contrast_weight": model_cfg.get("prompt_contrast_weight", 0.0),
            "joint_contrast_weight": model_cfg.get("joint_contrast_weight", 0.0),
            "joint_at_scoring_only": bool(model_cfg.get("joint_contrast_at_scoring_only", False)),
            "template_run": int(model_cfg.get("template_run", 0))}


def optional_section(model_cfg: DictConfig, key: str) -> dict[str, Any]:
    """A scoring-only section of a model config (`refinement`, `lexical`); absent from configs older than it: {}
    (its defaults, which are off)."""
    return OmegaConf.to_container(model_cfg[key]) if model_cfg.get(key) else {}


def reads_joint_in_training(model_cfg: DictConfig) -> bool:
    """Whether a training set needs its rows' joint embeddings (only for the joint contrast in the BDS objective)."""
    return SetEvidence(**evidence_config(model_cfg)).reads_joint(scoring=False)


def reads_joint_at_scoring(model_cfg: DictConfig) -> bool:
    """Whether a scored set needs its rows' joint embeddings (a second, longer encoder pass)."""
    return scoring_reads_joint(SetEvidence(**evidence_config(model_cfg)),
                               SetRefinement(**optional_section(model_cfg, "refinement")))


def calibrate_prior(prior: SafetyPrior, bank: AlignmentBank, training_prompts: torch.Tensor, k: int) -> SafetyPrior:
    """Calibrate (label-free) on the alignment set's self-similarity and the training rows' similarity to it."""
    prior.calibrate(topk_mean_similarity(bank.prompts, bank.prompts, k, exclude_self=True),
                    alignment_similarity(training_prompts, bank, k))
    return prior


def calibrated_posterior(config: dict[str, Any], bank: AlignmentBank, training_prompts: torch.Tensor) -> SetPosterior:
    """A fresh SetPosterior whose prior is calibrated on the alignment set and the training rows."""
    posterior = build_posterior(config, bank)
    calibrate_prior(posterior.prior, bank, training_prompts, config["k"])
    return posterior


def make_module(model_cfg: DictConfig, posterior: SetPosterior, evidence: LMEvidence | None, n_rows: int) -> BDSModule:
    return BDSModule(posterior, evidence, n_rows=n_rows, transform=model_cfg.transform, n_samples=model_cfg.n_samples,
                     likelihood_temperature=model_cfg.likelihood_temperature, network_lr=model_cfg.network_lr,
                     lm_lr=model_cfg.lm_lr, network_updates=model_cfg.network_updates,
                     langevin_noise=model_cfg.langevin_noise, lm_steps=model_cfg.get("lm_steps"))


def build_evidence(lm_cfg: DictConfig, signal: str = "none", refusal: str = DEFAULT_REFUSAL) -> LMEvidence:
    """The LM described by an `lm` config group, with a fresh LoRA adapter, wrapped for per-sample losses."""
    model, tokenizer = load_lm(lm_cfg.name_or_path, lm_cfg.lora_rank, lm_cfg.lora_alpha, lm_cfg.lora_top_layers,
                               tuple(lm_cfg.target_modules))
    return LMEvidence(model, tokenizer, signal, refusal, lm_cfg.max_prompt_tokens, lm_cfg.max_response_tokens,
                      lm_cfg.precision, lm_cfg.hidden_cache_rows)


def build_datamodule(cfg: DictConfig, embedder: Embedder) -> FineTuningSetsDataModule:
    """The configured data module, embedding the rows' joint text only for the sets whose evidence reads it."""
    return hydra.utils.instantiate(cfg.data, embedder=embedder, joint_in_training=reads_joint_in_training(cfg.model),
                                   joint_in_validation=reads_joint_at_scoring(cfg.model))


def build_module(cfg: DictConfig, datamodule: FineTuningSetsDataModule) -> BDSModule:
    """The BDSModule for a training run: calibrated posterior plus, unless disabled, the co-trained LM."""
    config = scheduler_config(cfg.model, datamodule.embedder, [e.prompt for e in datamodule.alignment], cfg)
    training_prompts = torch.cat([s.prompts for s in datamodule.train_sets])
    posterior = calibrated_posterior(config, AlignmentBank(*datamodule.alignment_embeddings()), training_prompts)
    evidence = None
    if cfg.lm.get("name_or_path") and cfg.model.signal != "none":
        evidence = build_evidence(cfg.lm, cfg.model.signal, cfg.model.refusal)
    module = make_module(cfg.model, posterior, evidence, datamodule.n_train_rows)
    # Which rows trained this checkpoint, so an evaluation can prove its data unseen (keys, not text).
    config["training_rows"] = sorted({e.key for s in datamodule.train_sets for e in s.examples})
    module.scheduler_config = config
    return module


def build_logger(cfg: DictConfig):
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    return hydra.utils.instantiate(cfg.logger)


def save_atomically(trainer: L.Trainer, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)
    os.replace(tmp, path)
    return path


def command_line_overrides() -> str:
    """The Hydra overrides this run was started with, to print the command that reproduces a report."""
    from hydra.core.hydra_config import HydraConfig

    return " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""


def run_dir(cfg: DictConfig) -> Path:
    """`out_dir`, or under a `-m` sweep the job's own folder `<out_dir>/<job number>`."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.out_dir)


def train(cfg: DictConfig) -> Path:
    """Train and return the path of the final scoring checkpoint, `<out_dir>/scheduler.ckpt`."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = build_datamodule(cfg, hydra.utils.instantiate(cfg.embedder))
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_logger(cfg), callbacks=[checkpoints])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    path = save_atomically(trainer, out_dir / CHECKPOINT_NAME)
    log.info("checkpoint: %s", path)
    return path
