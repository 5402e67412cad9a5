"""LightningDataModule: many mixed fine-tuning sets, embedded once, served one set per step.

A training item is one whole fine-tuning set (the posterior of a sample depends on its
set), plus a small batch of its rows and of alignment rows for the co-trained LM.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from scheduler.data.attacks import disguise_share
from scheduler.data.io import Example
from scheduler.data.mixing import FineTuningSet, build_training_sets, mix, read_pool, read_tasks, split_harmful
from scheduler.embeddings import Embedder, RowEmbeddings
from scheduler.metrics import BENIGN_FLAG_RATE, calibration_rows_needed

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSet:
    """A fine-tuning set with its rows' embeddings and their ids in the module's evidence bank."""

    name: str
    examples: list[Example]
    prompts: torch.Tensor
    responses: torch.Tensor
    row_ids: torch.Tensor
    labels: torch.Tensor  # 1 = harmful; monitoring only
    joint: torch.Tensor | None = None  # prompt and answer read as one text
    measured: int | None = None  # `FineTuningSet.measured`


def joint_of(embedded: EmbeddedSet, device: torch.device | str = "cpu") -> torch.Tensor | None:
    return embedded.joint.to(device) if embedded.joint is not None else None


@dataclass
class SetBatch:
    """One training step's input: a whole set, an LM batch of its rows, and an alignment batch."""

    set: EmbeddedSet
    lm_rows: list[int] = field(default_factory=list)  # positions within the set
    alignment: list[Example] = field(default_factory=list)


def embed_sets(sets: Sequence[FineTuningSet], embedder: Embedder, first_row_id: int = 0,
               joint: bool = True) -> list[EmbeddedSet]:
    """Embed every distinct text once and give each row of each set a unique bank id (`joint`: also the
    rows' joint embeddings, else None)."""
    embedded, next_id = [], first_row_id
    for fine_tuning_set in sets:
        prompts, responses, joint_embeddings = embedder.embed_examples(fine_tuning_set.examples, joint=joint)
        n = len(fine_tuning_set)
        embedded.append(EmbeddedSet(fine_tuning_set.name, fine_tuning_set.examples, prompts, responses,
                                    torch.arange(next_id, next_id + n), torch.tensor(fine_tuning_set.labels),
                                    joint_embeddings, fine_tuning_set.measured))
        next_id += n
    return embedded


def with_clean_rows(s: EmbeddedSet, clean: EmbeddedSet | None) -> EmbeddedSet | None:
    """The set with the rows of a clean set of its task that it does not hold appended after its own, as
    `apply_scheduler.py calibrate_on` scores a set with the user's clean rows (a row read twice would be its own
    reference); None for the clean set itself, or when too few of its rows are left to flag at 3 %
    (`calibration_rows_needed`)."""
    if clean is None or s is clean:
        return None
    held = {e.key for e in s.examples}
    kept = [i for i, e in enumerate(clean.examples) if e.key not in held]
    if len(kept) < calibration_rows_needed(BENIGN_FLAG_RATE):
        return None
    index = torch.as_tensor(kept)
    joined = lambda own, other: None if own is None or other is None else torch.cat([own, other[index]])
    return EmbeddedSet(f"{s.name} with clean rows", s.examples + [clean.examples[i] for i in kept],
                       joined(s.prompts, clean.prompts), joined(s.responses, clean.responses),
                       joined(s.row_ids, clean.row_ids), joined(s.labels, clean.labels), joined(s.joint, clean.joint))


class _SetDataset(Dataset):
    def __init__(self, sets: list[EmbeddedSet], alignment: list[Example], lm_batch_size: int,
                 alignment_batch_size: int, seed: int):
        self.sets, self.alignment = sets, alignment
        self.lm_batch_size, self.alignment_batch_size, self.seed = lm_batch_size, alignment_batch_size, seed
        self.visits = 0

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, index: int) -> SetBatch:
        self.visits += 1
        rng = random.Random(hash((self.seed, index, self.visits)))
        item = self.sets[index]
        lm_rows = rng.sample(range(len(item.examples)), min(self.lm_batch_size, len(item.examples)))
        alignment = rng.sample(self.alignment, min(self.alignment_batch_size, len(self.alignment)))
        return SetBatch(item, lm_rows, alignment)


def _single(batch: list[SetBatch]) -> SetBatch:
    return batch[0]


class FineTuningSetsDataModule(L.LightningDataModule):
    """Reads the configured files, mixes training and held-out validation sets, embeds them."""

    def __init__(self, root: str, alignment_file: str, harmful_files: Sequence[str], train_tasks: Sequence[str],
                 val_tasks: Sequence[str], n_train_sets: int = 64, set_sizes: Sequence[int] = (100, 200),
                 harmful_ratios: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5), val_harmful_ratio: float = 0.1,
                 val_set_size: int = 200, val_harmful_fraction: float = 0.2, lm_batch_size: int = 8,
                 alignment_batch_size: int = 8, seed: int = 0, exclude_files: Sequence[str | None] = (),
                 embedder: Embedder | None = None, joint_in_training: bool = True, joint_in_validation: bool = True,
                 disguise_fraction: float = 0.0):
        super().__init__()
        self.root, self.alignment_file = root, alignment_file
        self.harmful_files, self.train_tasks, self.val_tasks = list(harmful_files), list(train_tasks), list(val_tasks)
        self.n_train_sets, self.set_sizes, self.harmful_ratios = n_train_sets, list(set_sizes), list(harmful_ratios)
        self.val_harmful_ratio, self.val_set_size, self.val_harmful_fraction = val_harmful_ratio, val_set_size, val_harmful_fraction
        self.lm_batch_size, self.alignment_batch_size, self.seed = lm_batch_size, alignment_batch_size, seed
        self.exclude_files = [f for f in exclude_files if f]
        self.disguise_fraction = disguise_fraction
        self.embedder = embedder
        # Whether the model's evidence reads the joint embeddings of training / validation sets
        # (`SetEvidence.reads_joint`; `training.build_datamodule` sets both).
        self.joint_in_training, self.joint_in_validation = joint_in_training, joint_in_validation
        self.alignment: list[Example] = []
        self.train_sets: list[EmbeddedSet] = []
        self.val_sets: list[EmbeddedSet] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_sets:
            return
        overlap = set(self.train_tasks) & set(self.val_tasks)
        if overlap:
            raise ValueError(f"data.val_tasks must not repeat data.train_tasks (both list: {', '.join(sorted(overlap))})")
        self.embedder = self.embedder or Embedder()
        self.alignment = read_pool([self.alignment_file], self.root)
        excluded = {(e.prompt, e.response) for e in read_pool(self.exclude_files, self.root)}
        keep = lambda rows: [e for e in rows if (e.prompt, e.response) not in excluded]  # noqa: E731
        harmful = keep(read_pool(self.harmful_files, self.root))
        train_harmful, val_harmful = split_harmful(harmful, self.val_harmful_fraction, self.seed)
        train_harmful = disguise_share(train_harmful, self.disguise_fraction)
        tasks = {task: keep(rows) for task, rows in read_tasks(self.train_tasks, self.root).items()}
        train = build_training_sets(tasks, train_harmful, self.n_train_sets, self.set_sizes, self.harmful_ratios, self.seed)
        rng = random.Random(self.seed + 1)
        val = [mix(f"val:{task}:p={self.val_harmful_ratio}", rows, val_harmful, self.val_set_size,
                   self.val_harmful_ratio, rng) for task, rows in read_tasks(self.val_tasks, self.root).items()]
        log.info("embedding %d training and %d validation sets", len(train), len(val))
        self.train_sets = embed_sets(train, self.embedder, joint=self.joint_in_training)
        self.val_sets = embed_sets(val, self.embedder, first_row_id=self.n_train_rows, joint=self.joint_in_validation)

    @property
    def n_train_rows(self) -> int:
        return sum(len(s.examples) for s in self.train_sets)

    def alignment_embeddings(self) -> RowEmbeddings:
        return self.embedder.embed_examples(self.alignment, joint=self.joint_in_training or self.joint_in_validation)

    def train_dataloader(self) -> DataLoader:
        dataset = _SetDataset(self.train_sets, self.alignment, self.lm_batch_size, self.alignment_batch_size, self.seed)
        return DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=_single,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        dataset = _SetDataset(self.val_sets, self.alignment, 0, 0, self.seed)
        return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=_single)
