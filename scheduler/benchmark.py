"""Speed benchmarks that print numbers (never asserted in tests).

    python -m scheduler.benchmark lm      # per-sample LM loss rows/s and seconds per BDS step: naive, tuned, cached
    python -m scheduler.benchmark apply CHECKPOINT [--rows 2000]   # apply_scheduler throughput vs bare encoder
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

from scheduler.data.io import read_examples, write_rows
from scheduler.lm import DEFAULT_REFUSAL, LowerLayerCache, ResponseTokenizer, autocast_context, load_lm, response_nll
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
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what == "lm":
        bench_lm(args.lm, args.rows, args.steps)
    else:
        bench_apply(args.checkpoint, args.rows)


if __name__ == "__main__":
    main()
