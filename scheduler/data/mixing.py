"""Build the fine-tuning sets the scheduler is trained and validated on.

A service sees one user dataset at a time, of unknown size and harmful ratio. The
amortised network must work across all of them, so training draws *many* sets from
benign task pools mixed with harmful rows at varied ratios (0 included) and sizes.
Labels decide only how rows are mixed and how results are monitored, never a loss.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.data.io import Example, read_examples

HARMFUL = "harmful"


@dataclass
class FineTuningSet:
    """One simulated user dataset; `labels` (1 = harmful) are for monitoring only. `measured`: how many of the first
    rows validation reads its figures on (None = all); the rows after them are context, scored with the set."""

    name: str
    examples: list[Example]
    measured: int | None = None

    @property
    def labels(self) -> list[int]:
        return [int(example.label == HARMFUL) for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)


def resolve_path(file: str | Path, root: str | Path) -> Path:
    """A user's path as given when it exists from the working directory, else relative to `root` (bundled data)."""
    path = Path(file)
    return path if path.is_absolute() or path.exists() else Path(root) / path


def read_pool(files: Sequence[str | Path], root: str | Path = ".") -> list[Example]:
    """Concatenate dataset files (paths relative to `root` unless absolute)."""
    return [example for file in files for example in read_examples(resolve_path(file, root))]


def read_tasks(files: Sequence[str | Path], root: str | Path = ".") -> dict[str, list[Example]]:
    """One benign task per file, named by the file's stem (`benign_sst2.jsonl` -> `sst2`)."""
    return {Path(file).stem.removeprefix("benign_"): read_examples(resolve_path(file, root)) for file in files}


def categories_of(example: Example) -> set[str]:
    """Harm categories of a row; BeaverTails joins several with commas."""
    return {c.strip() for c in str(example.row.get("category") or "").split(",") if c.strip()}


def split_by_category(harmful: Sequence[Example], held_out: Sequence[str]) -> tuple[list[Example], list[Example]]:
    """(rows touching none of `held_out`, rows touching any): a category never leaks into training."""
    held = set(held_out)
    train = [example for example in harmful if not categories_of(example) & held]
    test = [example for example in harmful if categories_of(example) & held]
    return train, test


def mix(name: str, benign: Sequence[Example], harmful: Sequence[Example], size: int, harmful_ratio: float,
        rng: random.Random) -> FineTuningSet:
    """A set of `size` rows, round(size * ratio) of them harmful, shuffled."""
    n_harmful = min(round(size * harmful_ratio), len(harmful))
    n_benign = min(size - n_harmful, len(benign))
    rows = rng.sample(list(benign), n_benign) + rng.sample(list(harmful), n_harmful)
    rng.shuffle(rows)
    return FineTuningSet(name, rows)


def build_training_sets(benign_tasks: dict[str, Sequence[Example]], harmful: Sequence[Example], n_sets: int,
                        sizes: Sequence[int], harmful_ratios: Sequence[float], seed: int) -> list[FineTuningSet]:
    """Many sets, each one benign task mixed with harmful rows at a ratio and size drawn from the lists."""
    rng = random.Random(seed)
    tasks = sorted(benign_tasks)
    sets = []
    for index in range(n_sets):
        task = tasks[index % len(tasks)]
        ratio = rng.choice(list(harmful_ratios))
        size = rng.choice(list(sizes))
        sets.append(mix(f"train{index}:{task}:p={ratio}", benign_tasks[task], harmful, size, ratio, rng))
    return sets


def split_harmful(harmful: Sequence[Example], held_out_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint harmful rows for training sets and for held-out validation sets."""
    rows = list(harmful)
    random.Random(seed).shuffle(rows)
    cut = round(len(rows) * (1 - held_out_fraction))
    return rows[:cut], rows[cut:]
