"""LM statistics per sample, computed once and cached on disk (keyed by model, adapter and text).

Validation compares signal designs on thousands of rows and many folds; re-running a
135M-parameter LM for each would take hours on 2 cores. The LM is an adapter trained on
the alignment set only (so no held-out row ever reaches it), and for every row we keep:
- `response_lm`, `response_base`: token-mean NLL of the row's own answer with/without the adapter;
- `refusal_lm`, `refusal_base`: the same for a fixed refusal given the row's prompt.
Every evidence signal of `scheduler.evidence` is a function of these four numbers
(`signal_from_stats`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch
from tqdm import tqdm

from scheduler.cache import cache_root
from scheduler.data.io import Example
from scheduler.evidence import STATISTICS, LMEvidence
from scheduler.lm import DEFAULT_REFUSAL, load_lm


class AlignedLMStats:
    """An LM with a LoRA adapter trained on the alignment set, and a disk cache of its per-row statistics."""

    def __init__(self, lm: str, alignment: list[Example], steps: int = 60, batch_size: int = 8, lr: float = 1e-3,
                 lora_rank: int = 8, lora_top_layers: int | None = 6, max_prompt_tokens: int = 64,
                 max_response_tokens: int = 32, refusal: str = DEFAULT_REFUSAL, precision: str = "auto", seed: int = 0,
                 device: str = "cpu"):
        self.model, tokenizer = load_lm(lm, lora_rank=lora_rank, lora_alpha=2 * lora_rank, lora_top_layers=lora_top_layers)
        self.model.to(device)
        self.evidence = LMEvidence(self.model, tokenizer, "none", refusal, max_prompt_tokens, max_response_tokens, precision)
        recipe = json.dumps([lm, [(e.prompt, e.response) for e in alignment], steps, batch_size, lr, lora_rank,
                             lora_top_layers, max_prompt_tokens, max_response_tokens, refusal, seed])
        self.key = hashlib.sha1(recipe.encode()).hexdigest()[:16]
        self.folder = cache_root() / "lm_stats" / self.key
        self._train_or_load(alignment, steps, batch_size, lr, seed)
        self.cache = self._load_cache()

    def _train_or_load(self, alignment: list[Example], steps: int, batch_size: int, lr: float, seed: int) -> None:
        from peft import set_peft_model_state_dict

        adapter_file = self.folder / "adapter.pt"
        if adapter_file.exists():
            set_peft_model_state_dict(self.model, torch.load(adapter_file, map_location=self.evidence.device))
            return
        from peft import get_peft_model_state_dict

        rng = random.Random(seed)
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.model.train()
        for _ in tqdm(range(steps), desc="training the alignment adapter"):
            batch = rng.sample(alignment, batch_size)
            loss = self.evidence.response_loss(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.model.eval()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(get_peft_model_state_dict(self.model), adapter_file.with_suffix(".tmp"))
        os.replace(adapter_file.with_suffix(".tmp"), adapter_file)

    def _load_cache(self) -> dict[str, list[float]]:
        file = self.folder / "stats.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def _save_cache(self) -> None:
        file = self.folder / "stats.json"
        file.with_suffix(".tmp").write_text(json.dumps(self.cache))
        os.replace(file.with_suffix(".tmp"), file)

    @torch.no_grad()
    def stats(self, examples: list[Example], batch_size: int = 16) -> dict[str, np.ndarray]:
        """The four statistics for each example, computing only rows not yet in the cache."""
        missing = list({e.key: e for e in examples if e.key not in self.cache}.items())
        self.model.eval()
        for start in tqdm(range(0, len(missing), batch_size), desc="LM statistics", disable=not missing):
            chunk = missing[start:start + batch_size]
            stats = self.evidence.statistics([e for _, e in chunk])
            for row, (key, _) in enumerate(chunk):
                self.cache[key] = [float(stats[name][row]) for name in STATISTICS]
            if (start // batch_size) % 20 == 19:
                self._save_cache()
        if missing:
            self._save_cache()
        table = np.array([self.cache[e.key] for e in examples], dtype=np.float64).reshape(-1, len(STATISTICS))
        return {name: table[:, i] for i, name in enumerate(STATISTICS)}
