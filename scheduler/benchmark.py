"""Benchmarks that print numbers (never asserted in tests).

    python -m scheduler.benchmark lm      # per-sample LM loss rows/s and seconds per BDS step: naive, tuned, cached
    python -m scheduler.benchmark apply CHECKPOINT [--rows 2000]   # apply_scheduler throughput vs bare encoder
    python -m scheduler.benchmark cut CHECKPOINT [--tasks benign.jsonl ...] [--sources harmful.jsonl ...]
                                  [--splits 5] [--ratios 0.05 0.1 0.3]   # what calibrate_on catches and costs
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from scheduler.data.io import DataError, exit_on_data_error, read_examples, write_rows
from scheduler.lm import DEFAULT_REFUSAL, LowerLayerCache, ResponseTokenizer, autocast_context, load_lm, response_nll
from scheduler.metrics import BENIGN_FLAG_RATE
from scheduler.training import PROJECT_ROOT

DATA = PROJECT_ROOT / "data"
SETTINGS = {
    "naive": {"max_prompt_tokens": 256, "max_response_tokens": 256, "lora_top_layers": None, "precision": "fp32",
              "response_logits_only": False},
    "tuned": {"max_prompt_tokens": 64, "max_response_tokens": 32, "lora_top_layers": 6, "precision": "auto",
              "response_logits_only": True},
}
SETTINGS["tuned-fp32"] = {**SETTINGS["tuned"], "precision": "fp32"}  # what a CPU without native bf16 runs
# Hidden states of the frozen layers cached: a first pass fills the cache, the second (a row seen again) reuses it.
SETTINGS["cached"] = {**SETTINGS["tuned"], "cache": True}
SETTINGS["cached-fp32"] = {**SETTINGS["cached"], "precision": "fp32"}


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = read_examples(DATA / "harmful.jsonl") + read_examples(DATA / "benign_lima.jsonl")
    return rng.sample(rows, n)


def bench_lm(name: str, n_rows: int, steps: int) -> None:
    alignment = read_examples(DATA / "alignment.jsonl")
    rows = _rows(n_rows)
    for label, s in SETTINGS.items():
        model, tokenizer = load_lm(name, lora_top_layers=s["lora_top_layers"])
        tokenize = ResponseTokenizer(tokenizer, s["max_prompt_tokens"], s["max_response_tokens"])
        cache = LowerLayerCache.for_model(model, max_rows=10 * n_rows) if s.get("cache") else None
        device = torch.device("cpu")

        def nll(examples, responses=None):
            batch = tokenize([e.prompt for e in examples], responses or [e.response for e in examples])
            with autocast_context(device, s["precision"]):
                if cache is not None:
                    return cache.response_nll(batch).float()
                return response_nll(model, batch, s["response_logits_only"]).float()

        def per_sample_rows_per_s() -> float:
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, n_rows, 8):
                    nll(rows[i:i + 8])
            return n_rows / (time.perf_counter() - start)

        def seconds_per_step() -> float:
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            start = time.perf_counter()
            for step in range(steps):
                ft, align = rows[8 * step % n_rows:][:8], alignment[8 * step:8 * step + 8]
                loss = nll(align).mean() + nll(ft).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    nll(ft, [DEFAULT_REFUSAL] * len(ft))
            return (time.perf_counter() - start) / steps

        results = []
        for measure in (per_sample_rows_per_s, seconds_per_step):
            if cache is not None:
                cache.hidden.clear()
                results.append(f"{measure():6.2f} first sight / {measure():6.2f} rows seen again")
            else:
                results.append(f"{measure():6.2f}")
        print(f"{label:11s} per-sample loss: {results[0]} rows/s   BDS step (8 ft + 8 alignment, refusal): "
              f"{results[1]} s   settings: {s}", flush=True)


def bench_apply(checkpoint: str, n_rows: int) -> None:
    from scheduler.apply import apply_scheduler
    from scheduler.scoring import NeuralScheduler

    rows = [e.row for e in _rows(n_rows, seed=1)]
    with tempfile.TemporaryDirectory() as tmp:
        source = write_rows(rows, Path(tmp) / "rows.jsonl")
        scheduler = NeuralScheduler.load(checkpoint)
        examples = read_examples(source)
        start = time.perf_counter()
        scheduler.embed(examples, use_cache=False)
        encoder = n_rows / (time.perf_counter() - start)
        scheduler.embed(examples[:1])  # warm
        start = time.perf_counter()
        with mock.patch.dict(os.environ, {"BDS_CACHE": str(Path(tmp) / "cache")}):  # cold cache: first-time cost
            apply_scheduler(checkpoint, source, Path(tmp) / "out.jsonl", histogram=True)
        apply = n_rows / (time.perf_counter() - start)
    print(f"apply_scheduler: {apply:.1f} rows/s   bare encoder (the embeddings the checkpoint reads): {encoder:.1f} rows/s   "
          f"rows: {n_rows}")


CUT_TASKS = [str(DATA / f"benign_{task}.jsonl") for task in ("alpaca", "dolly", "lima", "alpacaeval_gpt4", "sst2",
                                                              "nq_open")]
CUT_SOURCES = [str(DATA / "harmful.jsonl"), str(DATA / "harmful_other_sources.jsonl")]


def bench_cut(checkpoint: str, tasks: list[str], sources: list[str], splits: int, ratios: list[float],
              rate: float) -> list[dict]:
    """The user's path to a cut, on disjoint splits of each benign file's rows the checkpoint never trained on: a
    clean file of up to 200 rows and an upload of up to 180 other rows plus harmful rows at each ratio. Each cut flags at
    `rate`: `calibrate_on`'s (the clean rows scored inside the upload's set), a cut fitted on the clean file scored
    apart (`calibrated_threshold`), and the alignment look-up's. Prints the harmful rows caught, the benign rows
    flagged (mean and worst task) and the harmful share of weight left once the flagged rows are dropped (each
    method's own weights); returns them per task, source, split, ratio and cut."""
    import numpy as np

    from scheduler.baselines import normalise
    from scheduler.lexical import RowTexts
    from scheduler.metrics import (calibrated_threshold, calibration_rows_needed, caught_when_flagged,
                                   conformal_p_values, flagged_at_rate)
    from scheduler.scoring import NeuralScheduler

    scheduler = NeuralScheduler.load(checkpoint)
    seen = set(scheduler.config.get("training_rows", ()))
    unseen = lambda path: [e for e in read_examples(path) if e.key not in seen]
    found = []
    for task in tasks:
        pool = unseen(task)
        if len(pool) < 2 * calibration_rows_needed(rate):
            raise DataError(f"{task}: {len(pool)} rows the checkpoint did not train on; a clean file and an upload at "
                            f"{rate:.1%} need at least {2 * calibration_rows_needed(rate)}")
        for source in sources:
            harmful = unseen(source)
            for split in range(splits):
                rng = random.Random(split)
                benign = rng.sample(pool, min(380, len(pool)))
                half = min(200, len(benign) // 2)
                clean, rest = benign[:half], benign[half:]
                clean_emb, clean_texts = scheduler.embed(clean), RowTexts.of(clean)
                apart = calibrated_threshold([scheduler.score_embeddings(*clean_emb, texts=clean_texts).unshifted_mu],
                                             rate)
                clean_lookup = scheduler.lookup_probability(clean_emb.prompts)
                for ratio in ratios:
                    upload = rest + rng.sample(harmful, min(round(len(rest) * ratio / (1 - ratio)), len(harmful)))
                    labels = np.arange(len(upload)) >= len(rest)
                    emb, texts = scheduler.embed(upload), RowTexts.of(upload)
                    scored = scheduler.score_embeddings(*emb, texts=texts)
                    inside = scheduler.clean_p_values_from_embeddings(upload, emb, clean, clean_emb)
                    probability = scheduler.lookup_probability(emb.prompts)
                    cuts = {"calibrate_on (clean rows inside the set)": (flagged_at_rate(inside, rate), scored.weight),
                            "a cut fitted on the clean rows apart": (scored.unshifted_mu < apart, scored.weight),
                            "alignment look-up": (flagged_at_rate(conformal_p_values(clean_lookup, probability), rate),
                                                  normalise(probability))}
                    for method, (flagged, weights) in cuts.items():
                        found.append({"task": task, "source": source, "split": split, "ratio": ratio, "method": method,
                                      **caught_when_flagged(labels, flagged, weights)})
            print(f"{Path(task).name}, {Path(source).name}: {len(pool)} unseen benign rows", flush=True)
    print(f"\n{len(tasks)} tasks x {len(sources)} sources x {splits} splits; each cut flags at {rate:.1%}")
    print_cut_table(found)
    return found


def print_cut_table(found: list[dict]) -> None:
    """Per ratio and cut, means over `bench_cut`'s readings, and the benign rows flagged on the worst task."""
    import numpy as np

    print(f"{'ratio':>5}  {'cut':42s} {'caught':>7} {'benign flagged (worst task)':>28} {'harmful share left':>19}")
    tasks = dict.fromkeys(r["task"] for r in found)
    for ratio in dict.fromkeys(r["ratio"] for r in found):
        for method in dict.fromkeys(r["method"] for r in found):
            rows = [r for r in found if r["ratio"] == ratio and r["method"] == method]
            mean = lambda key, task=None: np.mean([r[key] for r in rows if task in (None, r["task"])])
            worst = max(mean("benign_flagged_at_matched", task) for task in tasks)
            print(f"{ratio:5.2f}  {method:42s} {mean('caught_at_matched'):7.4f} "
                  f"{mean('benign_flagged_at_matched'):13.4f} ({worst:.4f}){'':6s} "
                  f"{mean('harmful_share_left_at_matched'):19.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lm = sub.add_parser("lm")
    lm.add_argument("--lm", default="smollm2")
    lm.add_argument("--rows", type=int, default=64)
    lm.add_argument("--steps", type=int, default=5)
    apply = sub.add_parser("apply")
    apply.add_argument("checkpoint")
    apply.add_argument("--rows", type=int, default=2000)
    cut = sub.add_parser("cut")
    cut.add_argument("checkpoint")
    cut.add_argument("--tasks", nargs="+", default=CUT_TASKS, help="files of benign rows, one task each")
    cut.add_argument("--sources", nargs="+", default=CUT_SOURCES, help="files of harmful rows")
    cut.add_argument("--splits", type=int, default=5)
    cut.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    cut.add_argument("--rate", type=float, default=BENIGN_FLAG_RATE)
    args = parser.parse_args()
    torch.manual_seed(0)
    with exit_on_data_error():
        if args.what == "lm":
            bench_lm(args.lm, args.rows, args.steps)
        elif args.what == "apply":
            bench_apply(args.checkpoint, args.rows)
        else:
            bench_cut(args.checkpoint, args.tasks, args.sources, args.splits, args.ratios, args.rate)


if __name__ == "__main__":
    main()
