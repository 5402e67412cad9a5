"""What the scheduler network sees of a sample: its embeddings, its relation to the
alignment set, and a summary of the fine-tuning set it arrived in.

The relation to the alignment set is the defender's knowledge (harmful prompts with safe
answers); the set summary lets the posterior adapt to the dataset, which is the paper's
point: the same row may deserve a different weight in a different set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from scheduler.data.io import Example, exchange_examples

SMALL_SET = 50  # rows: validation measured sets of 50 to 1,000 rows; the set's own evidence is thin below

if TYPE_CHECKING:
    from scheduler.embeddings import Embedder

N_RELATION_FEATURES = 4


@dataclass
class AlignmentBank:
    """Unit-norm embeddings of the alignment set's prompts, answers and whole rows, stored in the checkpoint
    (`joint` is None in checkpoints written before it)."""

    prompts: torch.Tensor
    responses: torch.Tensor
    joint: torch.Tensor | None = None

    def to(self, device: torch.device) -> AlignmentBank:
        joint = self.joint.to(device) if self.joint is not None else None
        return AlignmentBank(self.prompts.to(device), self.responses.to(device), joint)


def chunked_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False, chunk: int = 4096,
                 excluded: torch.Tensor | None = None):
    """Each chunk of queries' k most similar keys by cosine (inputs are unit-norm; `exclude_self`: queries are the
    keys, a row is not its own neighbour; `excluded`: a (queries, keys) mask of pairs that are not neighbours either,
    with k lowered to what every query has left), as `torch.topk` results: a chunk's similarities fit in memory."""
    left = keys.shape[0] - int(exclude_self)
    if excluded is not None:  # summed in blocks: a sum over a bool mask counts in int64, 8 bytes per pair
        left -= max(int(excluded[i:i + 512].sum(-1).max()) for i in range(0, len(excluded), 512))
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ keys.T
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = -2.0
        if excluded is not None:
            sims.masked_fill_(excluded[start:start + chunk].to(sims.device), -2.0)
        yield sims.topk(max(1, min(k, left)), dim=-1)


def topk_mean_similarity(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False,
                         chunk: int = 4096, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity of each query to its k most similar keys (inputs are unit-norm)."""
    return torch.cat([top.values.mean(-1) for top in chunked_topk(queries, keys, k, exclude_self, chunk, excluded)])


def template_mates(prompts: Sequence[str], responses: Sequence[str], run: int) -> torch.Tensor:
    """(N, N) mask of rows that share a run of `run` words (lowercased) in their prompts or in their answers, where
    at most half of the rows hold that run: more is the task's own template.

    Rows written to one template by an attacker (a persona before each request, an opener before each answer) are
    each other's nearest neighbours, so a row's similarity to its own set counted them as the set vouching for it:
    the identity-shifting opener's answer density ratio read 0.4050 against 0.9082 for its similarity to the
    alignment answers alone (docs/validation.md, "Identity shifting")."""
    n = len(prompts)
    mates = torch.zeros(n, n, dtype=torch.bool)
    for texts in (prompts, responses):
        for group in _rows_sharing_a_run(texts, run):
            if len(group) <= n / 2:
                members, member = torch.tensor(group), torch.zeros(n, dtype=torch.bool)
                member[members] = True
                mates[members] |= member  # row by row: a (group, group) index would take 16 bytes per pair
    return mates.fill_diagonal_(False)


def _rows_sharing_a_run(texts: Sequence[str], run: int) -> set[tuple[int, ...]]:
    """Each distinct group of two or more rows that hold one run of `run` words. The runs are kept as 64-bit hashes in
    one sorted array, not as strings: a file of 18,000 long rows holds millions of runs."""
    hashes, rows = [], []
    for row, text in enumerate(texts):
        words = text.lower().split()
        runs = {hash(" ".join(words[start:start + run])) for start in range(len(words) - run + 1)}
        hashes += runs
        rows += [row] * len(runs)
    if not hashes:
        return set()
    hashes, rows = np.asarray(hashes, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    hashes, rows = hashes[order], rows[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    sizes = np.diff(np.r_[starts, len(hashes)])
    return {tuple(rows[start:start + size].tolist()) for start, size in zip(starts, sizes) if size >= 2}


def alignment_similarity(prompts: torch.Tensor, bank: AlignmentBank, k: int) -> torch.Tensor:
    """How much a prompt looks like the harmful prompts the alignment set answers safely."""
    return topk_mean_similarity(prompts, bank.prompts, k)


def readings(examples: Sequence[Example]) -> list[tuple[str, ...]]:
    """Each row's readings of its prompt: the prompt; the decoded and the plain part of a prompt read decoded beside
    plain text (`Example.prompt_parts`); the prompt after a chat's system turn, unless more than half of the rows
    share that system turn (a service's template says nothing about a row); and an exchange's request after the
    requests its chat sent before it unanswered (`Example.earlier_requests`, `chat_exchanges`).

    A harmful request in the system turn, left out, was ranked at AUROC 0.7732 on Dolly sets; a long template read
    into every prompt fills the embedder's window and hid every request (0.6812; docs/validation.md, "A request in the
    system turn")."""
    shared = Counter(example.system for example in examples)
    template = {system for system, count in shared.items() if count > len(examples) / 2}

    def with_system(example: Example) -> tuple[str, ...]:
        read_with = example.system and example.system not in template
        return (f"{example.system}\n{example.prompt}",) if read_with else ()

    def with_earlier(example: Example) -> tuple[str, ...]:
        return (f"{example.earlier_requests}\n{example.prompt}",) if example.earlier_requests else ()

    return [(example.prompt, *example.prompt_parts, *with_system(example), *with_earlier(example))
            for example in examples]


def most_alignment_like_readings(examples: Sequence[Example], embedder: Embedder, bank: AlignmentBank,
                                 k: int) -> list[Example]:
    """The rows, each prompt with other `readings` replaced by whichever reading is most like the alignment prompts:
    a row is as harmful as its most harmful reading, whatever plain text a cipher sits in, whatever cipher text a
    plain request sits beside, and whatever a chat's system turn asks."""
    every = readings(examples)
    split = [i for i, row in enumerate(every) if len(row) > 1]
    if not split:
        return list(examples)
    flat = [reading for i in split for reading in every[i]]
    similarity = alignment_similarity(torch.from_numpy(embedder.encode(flat)).to(bank.prompts), bank, k)
    read, start = list(examples), 0
    for i in split:
        row = every[i]
        best = row[int(similarity[start:start + len(row)].argmax())]
        read[i], start = (replace(examples[i], prompt=best, prompt_parts=(), system=None, earlier_requests=None),
                          start + len(row))
    return read


def chats_read_by_last_exchange(examples: Sequence[Example], embedder: Embedder,
                                chosen: bool | None = None) -> list[Example]:
    """The rows, each chat's joint text reading its last request with its answer, when more than half of the rows are
    chats whose earlier turns fill the prompt window before that request (the prompt embedding cannot read it); else
    unchanged. Chosen for the rows read together, as a system turn most rows share is the template: a set never mixes
    the two kinds of joint text, and a minority of rows cannot choose it (docs/validation.md, "A harmful request in a
    conversation"). `chosen` imposes another reading's choice: rows scored in one set with rows read before them (a
    user's clean rows, `calibrate_on`) are read as those were."""
    if chosen is None:
        chosen = sum(embedder.requests_past_window(examples)) > len(examples) / 2
    if not chosen:
        return list(examples)
    return [replace(e, joint_prompt=e.last_request) if e.last_request else e for e in examples]


@dataclass(frozen=True)
class ExchangeSet:
    """Exchanges scored as one set: each as a row (keeping its chat's row), the index of the chat it came from, and
    its place in that chat counted from the end (0 = the last exchange)."""

    rows: list[Example]
    owners: np.ndarray
    from_end: np.ndarray


def chat_exchanges(example: Example, short_answer_words: int = 0) -> list[tuple[Example, int]]:
    """A chat's exchanges as rows of their own (`exchange_examples`), each with its place counted from the chat's end.
    An exchange whose answer has at most `short_answer_words` words (an acknowledgement: "Understood. Please send part
    2.") teaches nothing of its own and is not scored: its request is read before the next exchange's, as another
    reading of that one (`readings`), so that a request split across turns is read whole (docs/validation.md, "A
    request split across turns"). The last exchange is always scored."""
    exchanges = exchange_examples(example)
    read: list[tuple[Example, int]] = []
    carried: list[str] = []
    for place, exchange in enumerate(exchanges):
        last = place == len(exchanges) - 1
        if not last and short_answer_words and len(exchange.response.split()) <= short_answer_words:
            carried.append(exchange.prompt)
            continue
        read.append((replace(exchange, earlier_requests="\n".join(carried) or None), len(exchanges) - 1 - place))
        carried = []
    return read


def exchange_places(examples: Sequence[Example], smallest: int = SMALL_SET,
                    short_answer_words: int = 0) -> list[ExchangeSet]:
    """The rows' exchanges grouped by their place in their chats, counted from the end. A row that is not a chat of
    several exchanges is its own exchange at place 0. Each exchange is read as a row of one exchange is
    (`exchange_examples`); one answered in at most `short_answer_words` words is read with the next
    (`chat_exchanges`). A place that only a file's few longest chats reach is pooled with the places beyond it until
    the set holds `smallest` rows, or as many as the file, and a short remainder joins the set before it: a set of a
    few exchanges is read against itself, and four clean chats of twenty exchanges in a file of two-exchange chats
    were each flagged when every place was its own set (docs/validation.md, "A margin that grows with a chat's
    exchanges")."""
    places: dict[int, list[tuple[Example, int, int]]] = {}
    for i, example in enumerate(examples):
        for exchange, place in chat_exchanges(example, short_answer_words):
            places.setdefault(place, []).append((exchange, i, place))
    enough = min(smallest, len(examples))
    groups: list[list[tuple[Example, int, int]]] = []
    for place in sorted(places):
        if groups and len(groups[-1]) < enough:
            groups[-1].extend(places[place])
        else:
            groups.append(list(places[place]))
    if len(groups) > 1 and len(groups[-1]) < enough:
        groups[-2].extend(groups.pop())
    return [ExchangeSet([row for row, _, _ in group], np.array([i for _, i, _ in group]),
                        np.array([place for _, _, place in group])) for group in groups]


def relation_features(prompts: torch.Tensor, responses: torch.Tensor, bank: AlignmentBank, k: int,
                      mates: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample scalars relating a row to the alignment set and to the rest of its own set.

    Columns: similarity of the prompt to alignment prompts; of the response to alignment
    answers; of the prompt to the other prompts of the set (its `template_mates` left out); the first minus the set's
    mean of it.
    """
    to_alignment = alignment_similarity(prompts, bank, k)
    response_to_alignment = topk_mean_similarity(responses, bank.responses, k)
    to_set = (topk_mean_similarity(prompts, prompts, k, exclude_self=True, excluded=mates) if len(prompts) > 1
              else torch.ones_like(to_alignment))
    centred = to_alignment - to_alignment.mean()
    return torch.stack([to_alignment, response_to_alignment, to_set, centred], dim=-1)


@dataclass(frozen=True)
class SetEvidence:
    """What a set's own rows say about each row, without an LM or a label: density ratios and mean contrasts.

    A row that resembles the alignment set (k-NN similarity) more than it resembles the other rows
    of its set conflicts with the alignment set: for the prompt, and, which still sees a harmful
    answer behind a disguised request, for the answer against the alignment set's answers. Each
    ratio is centred on the set's median and put in the prior's similarity units (not the set's
    spread, so a clean set keeps a small spread). The prompt's `mean_contrast` counts only where a
    row stands out from its set (`beyond_upper_fence`). The joint contrast is the mean contrast of the
    prompt and answer read as one text against the alignment set's rows read the same way: a compliant
    answer to a harmful request reads unlike a safe one, which the two halves embedded apart do not show.
    It is centred on the set's median (`joint_at_scoring_only`: only when a set is scored, not in training).
    `scoring_weight` adds this evidence to the amortised posterior's logit when a set is scored (0 = the
    network alone).
    """

    prompt_weight: float = 0.0
    response_weight: float = 0.0
    scoring_weight: float = 0.0
    prompt_contrast_weight: float = 0.0
    joint_contrast_weight: float = 0.0
    joint_at_scoring_only: bool = False
    # When a set is scored with its texts: a row's similarity to its own set leaves out the rows that share a run of
    # this many words with it (`template_mates`); 0 = every row counts.
    template_run: int = 0

    def joint_enters(self, scoring: bool) -> bool:
        """Whether `energy` adds the joint contrast: when a set is scored (`scoring`) or in training."""
        return bool(self.joint_contrast_weight) and (scoring or not self.joint_at_scoring_only)

    def reads_joint(self, scoring: bool) -> bool:
        """Whether the rows' joint embeddings are needed: in training, or when a set is scored (which adds the
        evidence only with a `scoring_weight`). They cost a second, longer encoder pass, so callers embed them
        only where they are read."""
        return self.joint_enters(scoring) and (not scoring or bool(self.scoring_weight))

    def energy(self, prompts: torch.Tensor, responses: torch.Tensor, relation: torch.Tensor, bank: AlignmentBank,
               k: int, spread: torch.Tensor, joint: torch.Tensor | None = None, scoring: bool = False,
               mates: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row energy (higher = more in conflict with the alignment set); zeros when every weight is 0.

        `relation` holds the set's `relation_features`, which the posterior computes anyway; `joint` the rows'
        joint embeddings, needed when `joint_contrast_weight` is not 0; `mates` the rows' `template_mates`."""
        energy = torch.zeros(len(responses), device=responses.device)
        if self.prompt_weight or self.response_weight:
            ratios = density_ratios(responses, relation, k, mates)
            for weight, ratio in zip((self.prompt_weight, self.response_weight), ratios):
                energy = energy + weight * (ratio - ratio.median()) / spread
        if self.prompt_contrast_weight:
            outlying = beyond_upper_fence(mean_contrast(prompts, bank.prompts))
            energy = energy + self.prompt_contrast_weight * outlying / spread
        if self.joint_enters(scoring):
            if joint is None or bank.joint is None:
                raise ValueError("joint_contrast_weight needs the rows' joint embeddings and the alignment bank's")
            contrast = mean_contrast(joint, bank.joint)
            energy = energy + self.joint_contrast_weight * (contrast - contrast.median()) / spread
        return energy


def density_ratios(responses: torch.Tensor, relation: torch.Tensor, k: int,
                   mates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer): k-NN similarity to the alignment set minus k-NN similarity to the row's own set,
    from the set's `relation_features` and, for the answer, its answers' similarity to each other (`template_mates`
    left out)."""
    response_to_set = (topk_mean_similarity(responses, responses, k, exclude_self=True, excluded=mates)
                       if len(responses) > 1
                       else torch.ones_like(relation[:, 1]))
    return relation[:, 0] - relation[:, 2], relation[:, 1] - response_to_set


def mean_contrast(rows: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """Mean similarity of each row to the alignment set minus its mean similarity to the other rows of its set.

    The density ratio with every row as a neighbour instead of the k nearest: a projection on the direction
    from the set's mean embedding to the alignment set's. It ranks rows by the topic that the set and the
    alignment set do not share, where the k-NN ratio looks at a row's closest matches."""
    others = (rows.sum(0) - rows) / max(len(rows) - 1, 1)
    return rows @ alignment.mean(0) - (rows * others).sum(-1)


def beyond_upper_fence(values: torch.Tensor) -> torch.Tensor:
    """How far each value lies above Tukey's upper fence of its set (q75 + 1.5 IQR); 0 at or below it.

    Every set, clean or not, has an upper half; only rows that stand out from the rest of their own set are
    evidence. Centred on the median instead, the mean contrast pushed the upper half of clean sets down
    (benign rows kept on the worst clean set 0.743 instead of 0.867, docs/validation.md)."""
    q25, q75 = values.quantile(0.25), values.quantile(0.75)
    return torch.relu(values - q75 - 1.5 * (q75 - q25))


def set_summary(prompts: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
    """A fixed-size description of the whole set: mean prompt embedding and mean/spread of the relations."""
    spread = relation.std(0) if len(relation) > 1 else torch.zeros(relation.shape[-1], device=relation.device)
    return torch.cat([prompts.mean(0), relation.mean(0), spread])
