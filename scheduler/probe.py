"""How well does each LM signal alone single out harmful rows, task by task, and does a stronger adapter help?

The validation protocol trains its alignment adapter for 60 steps on the top 6 layers because a 2-core CPU
affords no more. This probe trains adapters of any strength (on a GPU, thousands of steps on all layers), scores
the same fixed rows with each LM signal of `scheduler.evidence`, and prints AUROC (harmful = positive) per benign
task against three kinds of harmful rows, next to the alignment look-up on the same rows. No label reaches an
adapter: it learns the alignment set only.

    python -m scheduler.probe --adapters 60:6 2000:all --device cuda   # LM signals, on a GPU
    python -m scheduler.probe --adapters lookup                        # the look-up, on a CPU
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from scheduler.data.attacks import BLIND_FRAMES, DISGUISES, FRESH_FRAMES, UNSEEN_FRAMES, disguise
from scheduler.data.io import Example, exit_on_data_error, read_examples, write_text
from scheduler.embeddings import DEFAULT_EMBEDDER
from scheduler.evidence import signal_from_stats
from scheduler.training import PROJECT_ROOT

DATA = PROJECT_ROOT / "data"
LM_SIGNALS = ("refusal", "refusal_gain", "margin", "loss", "reference")
LOOKUP = "lookup"


@dataclass(frozen=True)
class ProbeRows:
    """A fixed sample of each benign task and three harmful groups: plain, from other sources, and framed."""

    tasks: dict[str, list[Example]]
    harmful: dict[str, list[Example]]

    @classmethod
    def sample(cls, data: Path, benign_per_task: int, harmful_per_group: int) -> ProbeRows:
        """From `data`'s layout: `benign_*.jsonl`, `harmful.jsonl` and, where present, `harmful_other_sources.jsonl`."""
        tasks = {path.stem.removeprefix("benign_"): random.Random(1).sample(read_examples(path), benign_per_task)
                 for path in sorted(data.glob("benign_*.jsonl"))}
        plain = random.Random(0).sample(read_examples(data / "harmful.jsonl"), harmful_per_group)
        harmful = {"beavertails": plain, "framed": disguise(plain, DISGUISES + UNSEEN_FRAMES + FRESH_FRAMES + BLIND_FRAMES)}
        if (data / "harmful_other_sources.jsonl").exists():
            harmful["other_sources"] = random.Random(0).sample(read_examples(data / "harmful_other_sources.jsonl"),
                                                               harmful_per_group)
        return cls(tasks, harmful)

    def all(self) -> list[Example]:
        return [e for rows in (*self.tasks.values(), *self.harmful.values()) for e in rows]


def parse_adapter(spec: str) -> dict:
    """`STEPS:LAYERS`, LAYERS a number of top layers or `all`: e.g. `60:6` (validation's), `2000:all`."""
    steps, layers = spec.split(":")
    return {"steps": int(steps), "lora_top_layers": None if layers == "all" else int(layers)}


def adapter_spec(spec: str) -> str:
    """An argparse type: the spec, checked before any model loads."""
    try:
        if spec != LOOKUP:
            parse_adapter(spec)
        return spec
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}': expected STEPS:LAYERS such as 60:6 or 2000:all, "
                                         f"or '{LOOKUP}'") from None


def per_task_auroc(rows: ProbeRows, score: dict[str, float]) -> dict[str, dict[str, float]]:
    """AUROC of `score` (higher = less safe) for each harmful group against each task's benign rows."""
    result = {}
    for group, harmful in rows.harmful.items():
        bad = [score[e.key] for e in harmful]
        result[group] = {task: float(roc_auc_score([0] * len(benign) + [1] * len(bad),
                                                   [score[e.key] for e in benign] + bad))
                         for task, benign in rows.tasks.items()}
    return result


def lm_scores(rows: ProbeRows, alignment: list[Example], lm: str, adapter: dict, batch_size: int,
              device: str) -> dict[str, dict[str, float]]:
    from scheduler.lm_stats import AlignedLMStats

    examples = rows.all()
    stats = AlignedLMStats(lm, alignment, batch_size=batch_size, device=device, **adapter).stats(examples)
    return {signal: dict(zip((e.key for e in examples), signal_from_stats(stats, signal).tolist()))
            for signal in LM_SIGNALS}


def lookup_scores(rows: ProbeRows, alignment: list[Example], embedder: str, k: int) -> dict[str, dict[str, float]]:
    from scheduler.embeddings import Embedder
    from scheduler.features import AlignmentBank, alignment_similarity

    embedder = Embedder(embedder)
    bank = AlignmentBank(*embedder.embed_examples(alignment))
    examples = rows.all()
    similarity = alignment_similarity(embedder.embed_examples(examples, joint=False).prompts, bank, k)
    return {LOOKUP: dict(zip((e.key for e in examples), similarity.tolist()))}


def table(results: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """One line per adapter and signal: mean / worst task AUROC for each harmful group."""
    groups = next(iter(next(iter(results.values())).values()))
    lines = [f"{'adapter':10s} {'signal':13s} " + " ".join(f"{g + ' mean / worst':>28s}" for g in groups)]
    for adapter, signals in results.items():
        for signal, by_group in signals.items():
            cells = [f"{np.mean(list(t.values())):.3f} / {min(t.values()):.3f} ({min(t, key=t.get)})"
                     for t in by_group.values()]
            lines.append(f"{adapter:10s} {signal:13s} " + " ".join(f"{c:>28s}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", default=["60:6"], type=adapter_spec,
                        help=f"STEPS:LAYERS per adapter (e.g. 60:6 2000:all), or '{LOOKUP}' for the look-up")
    parser.add_argument("--data", type=Path, default=DATA, help="a folder laid out like the bundled data/")
    parser.add_argument("--lm", default="smollm2", help="'smollm2' (packaged) or a local Hugging Face path")
    parser.add_argument("--device", default="cpu", help="where the LM trains and scores: cpu, cuda, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="alignment rows per adapter step")
    parser.add_argument("--benign-per-task", type=int, default=100)
    parser.add_argument("--harmful-per-group", type=int, default=300)
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="the look-up's sentence-transformers model")
    parser.add_argument("--k", type=int, default=10, help="nearest alignment prompts of the look-up")
    parser.add_argument("--out", type=Path, help="also write the per-task AUROCs as JSON")
    args = parser.parse_args(argv)
    with exit_on_data_error():
        rows = ProbeRows.sample(args.data, args.benign_per_task, args.harmful_per_group)
        alignment = read_examples(args.data / "alignment.jsonl")
    results = {}
    for spec in args.adapters:
        scores = (lookup_scores(rows, alignment, args.embedder, args.k) if spec == LOOKUP
                  else lm_scores(rows, alignment, args.lm, parse_adapter(spec), args.batch_size, args.device))
        results[spec] = {signal: per_task_auroc(rows, score) for signal, score in scores.items()}
        print(table({spec: results[spec]}), flush=True)
        if args.out:  # after each adapter: a run stopped at a time limit keeps what it finished
            write_text(json.dumps(results, indent=1), args.out)
    print("\nAUROC (harmful = positive), mean / worst over the benign tasks:\n" + table(results))


if __name__ == "__main__":
    main()
