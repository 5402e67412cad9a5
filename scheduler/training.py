"""Assemble data, embedder, LM, scheduler network and Trainer from a Hydra config, and train."""

from __future__ import annotations

import logging
import os
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
from scheduler.features import AlignmentBank, alignment_similarity, topk_mean_similarity
from scheduler.lm import load_lm
from scheduler.module import BDSModule
from scheduler.scoring import build_posterior

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "scheduler.ckpt"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """`${project_root:}` in configs: bundled data paths work from any working directory."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def scheduler_config(cfg: DictConfig, embedder: Embedder) -> dict[str, Any]:
    """What the checkpoint must carry to rebuild and use the network without the training config."""
    return {"embedder": embedder.name, "embedder_max_seq_length": embedder.max_seq_length, "embed_dim": embedder.dim,
            "k": cfg.model.k, "network": OmegaConf.to_container(cfg.model.network),
            "prior": OmegaConf.to_container(cfg.model.prior), "signal": cfg.model.signal,
            "transform": cfg.model.transform, "family": "gaussian-logit",
            "config": OmegaConf.to_container(cfg, resolve=True)}


def build_module(cfg: DictConfig, datamodule: FineTuningSetsDataModule) -> BDSModule:
    """The BDSModule with a prior calibrated (label-free) on the alignment set and the training rows."""
    bank = AlignmentBank(*datamodule.alignment_embeddings())
    config = scheduler_config(cfg, datamodule.embedder)
    posterior = build_posterior(config, bank)
    training_prompts = torch.cat([s.prompts for s in datamodule.train_sets])
    posterior.prior.calibrate(topk_mean_similarity(bank.prompts, bank.prompts, cfg.model.k, exclude_self=True),
                              alignment_similarity(training_prompts, bank, cfg.model.k))
    evidence = None
    if cfg.lm.get("name_or_path") and cfg.model.signal != "none":
        model, tokenizer = load_lm(cfg.lm.name_or_path, cfg.lm.lora_rank, cfg.lm.lora_alpha, cfg.lm.lora_top_layers,
                                   tuple(cfg.lm.target_modules))
        evidence = LMEvidence(model, tokenizer, cfg.model.signal, cfg.model.refusal, cfg.lm.max_prompt_tokens,
                              cfg.lm.max_response_tokens, cfg.lm.precision)
    module = BDSModule(posterior, evidence, n_rows=datamodule.n_train_rows, transform=cfg.model.transform,
                       n_samples=cfg.model.n_samples, likelihood_temperature=cfg.model.likelihood_temperature,
                       network_lr=cfg.model.network_lr, lm_lr=cfg.model.lm_lr, network_updates=cfg.model.network_updates,
                       langevin_noise=cfg.model.langevin_noise)
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


def train(cfg: DictConfig) -> Path:
    """Train and return the path of the final scoring checkpoint, `<out_dir>/scheduler.ckpt`."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embedder = hydra.utils.instantiate(cfg.embedder)
    datamodule = hydra.utils.instantiate(cfg.data, embedder=embedder)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=build_logger(cfg), callbacks=[checkpoints])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    path = save_atomically(trainer, out_dir / CHECKPOINT_NAME)
    log.info("checkpoint: %s", path)
    return path
