"""Downstream defence: LoRA fine-tune the LM on a user's set with a method's weights, then
measure what the user cares about: does it still refuse harmful prompts (harmful score), and
did it learn the task (fine-tune accuracy on the task's own held-out rows)?

Every method gets the same steps, seed, batches and hyper-parameters; only the weights differ.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from scheduler.data.io import Example
from scheduler.evidence import LMEvidence
from scheduler.training import build_evidence


def finetune(lm_cfg, examples: Sequence[Example], weights: np.ndarray, steps: int, batch_size: int, lr: float,
             seed: int, alignment: Sequence[Example] = (), desc: str = "fine-tuning", device: str = "cpu") -> LMEvidence:
    """A fresh LoRA adapter trained as BDS trains the LM: alignment loss + mean(w_i * nll_i) over a user batch."""
    torch.manual_seed(seed)
    lm = build_evidence(lm_cfg)
    model = lm.model.to(device)
    rng = random.Random(seed)
    weights_t = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        rows = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        loss = (weights_t[rows] * lm.response_loss([examples[i] for i in rows])).mean()
        if alignment:
            loss = loss + lm.response_loss(rng.sample(list(alignment), min(batch_size, len(alignment)))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return lm


@torch.no_grad()
def generate(lm: LMEvidence, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers, with the same chat template and prompt truncation as training."""
    tokenizer, answers = lm.tokenize.tokenizer, []
    pad = lm.tokenize.pad_id
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", leave=False):
        encoded = [lm.tokenize.prompt_ids(p) for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "").rstrip(".") for n in re.findall(r"-?\d[\d,]*\.?\d*", text)]


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def is_correct(gold: str, answer: str, category: str | None) -> bool:
    """Task-aware match: final number for math, the label word for classification, else gold contained."""
    if category == "math":
        gold_numbers, answer_numbers = _numbers(gold), _numbers(answer)
        return bool(gold_numbers and answer_numbers) and gold_numbers[-1] == answer_numbers[-1]
    if category in ("sentiment", "topic_classification"):
        words = _normalise(answer).split()
        return bool(words) and " ".join(words[:len(_normalise(gold).split())]) == _normalise(gold)
    return bool(_normalise(gold)) and _normalise(gold) in _normalise(answer)


def accuracy(examples: Sequence[Example], answers: Sequence[str]) -> float:
    return float(np.mean([is_correct(e.response, a, e.row.get("category")) for e, a in zip(examples, answers)]))
