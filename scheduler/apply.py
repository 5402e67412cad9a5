"""Weight a dataset file with a trained checkpoint and write it back with the weights added."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scheduler.baselines import normalise
from scheduler.data.io import DataError, Example, iter_rows, to_example, write_rows
from scheduler.embeddings import RowEmbeddings
from scheduler.features import SMALL_SET
from scheduler.metrics import (BENIGN_FLAG_RATE, calibration_rows_needed, caught_when_flagged, conformal_p_values,
                               detection_metrics, flagged_at_rate)
from scheduler.scoring import NeuralScheduler


GROUPS_SHOWN = 20
UNREADABLE_SHOWN = 10  # row numbers listed in the warning about rows that read as no English
LOOKUP = "alignment look-up (baseline, same rows)"
PROMPT_SHOWN = 80  # characters of a flagged row's prompt in the summary
# A set whose expected harmful fraction reaches this reads mostly harmful. Weights have mean 1 within a set, so they
# cannot make such a set safe to train on. With the default checkpoint, clean sets read 0.01-0.19 and sets of 200
# rows read 0.30-0.37 at a harmful ratio of 0.3, 0.47-0.49 at 0.5 and 0.64-0.83 when wholly harmful; on held-out
# validation folds clean sets read at most 0.238 (docs/validation.md, "Sets that read mostly harmful").
MOSTLY_HARMFUL = 0.4


@dataclass
class SetSummary:
    """One scored set: the whole file, or one group of it (`group_by`)."""

    name: str
    rows: int
    below_half: int
    expected_harmful_fraction: float
    scoring_shift: float
    withheld: int = 0

    @property
    def shift_text(self) -> str:
        withheld = f", withheld from {self.withheld} row{'s' * (self.withheld != 1)}" if self.withheld else ""
        return f"scoring shift applied: {self.scoring_shift:.2f}{withheld}"

    @property
    def reads_mostly_harmful(self) -> bool:
        return self.expected_harmful_fraction >= MOSTLY_HARMFUL

    def __str__(self) -> str:
        rows = f"{self.rows} row{'s' * (self.rows != 1)}"
        return (f"{self.name}: {rows}, {self.below_half} below 0.5, expected harmful fraction "
                f"{self.expected_harmful_fraction:.3f} ({self.shift_text})")


@dataclass
class FlaggedRow:
    """One of the rows with the lowest weights, shown so that a user sees what the scheduler singled out."""

    number: int  # 1-based, in the file's row order
    weight: float
    prompt: str

    def __str__(self) -> str:
        text = " ".join(self.prompt.split())
        return f"row {self.number}: weight {self.weight:.3f}  {text[:PROMPT_SHOWN]}{'...' * (len(text) > PROMPT_SHOWN)}"


@dataclass
class Cut:
    """How the `flagged` column was set, for the summary: a given cut on `unshifted_mu` (`flag_below`), or each
    row's `clean_p_value` at most `flag_rate` (`calibrate_on`). With clean files, `lookup_flagged` holds the rows the
    alignment look-up flags at the same rate, read against the same clean rows (the label check)."""

    description: str
    lookup_flagged: np.ndarray | None = None


@dataclass
class ApplySummary:
    quantiles: dict[str, float]
    output: Path
    histogram: Path | None
    sets: list[SetSummary]
    label_check: dict[str, dict[str, float]] | None = None
    lowest: list[FlaggedRow] = field(default_factory=list)
    cut: Cut | None = None
    flagged: int = 0
    decoded: dict[str, int] = field(default_factory=dict)  # rows read decoded, per encoding
    unreadable: list[int] = field(default_factory=list)  # row numbers (from 1) of rows that read as no English
    score_unreadable: bool = False
    read_apart: int = 0  # rows read as another reading than their whole prompt (`scheduler.features.readings`)
    requests_past_window: int = 0  # chat rows whose last request the prompt embedder never reaches
    read_by_last_exchange: bool = False  # whether chats were read jointly by their last exchange
    inner_exchanges_past_window: int = 0  # chat rows with an exchange between first and last that nothing reads
    scored_by_exchange: int = 0  # chats of several exchanges scored by their exchanges (`score_by_exchange`)
    lowered_by_earlier_exchange: int = 0  # of the rows below 0.5, those whose weight came from an exchange before the last
    margin_cap: int | None = None  # the exchanges past which a chat's margin stops growing (`exchange_margin_cap`)
    past_margin_cap: int = 0  # chats scored by their exchanges that hold more exchanges than `margin_cap`

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sets)

    @property
    def below_half(self) -> int:
        return sum(s.below_half for s in self.sets)

    @property
    def expected_harmful_fraction(self) -> float:
        """Of the one scored set; NaN when the file was scored in groups (see `sets`)."""
        return self.sets[0].expected_harmful_fraction if len(self.sets) == 1 else float("nan")

    @property
    def scoring_shift(self) -> float:
        return self.sets[0].scoring_shift if len(self.sets) == 1 else float("nan")

    def __str__(self) -> str:
        q = "  ".join(f"{name}={value:.3f}" for name, value in self.quantiles.items())
        text = (f"scored {self.rows} rows -> {self.output}\n"
                f"weighted below 0.5: {self.below_half} ({self.below_half / self.rows:.1%})\n")
        if len(self.sets) == 1:
            text += (f"expected harmful fraction of the set: {self.expected_harmful_fraction:.3f} "
                     f"({self.sets[0].shift_text})\n")
        else:
            text += f"scored as {len(self.sets)} sets, one per group (each has mean weight 1):\n"
            text += "".join(f"  {s}\n" for s in self.sets[:GROUPS_SHOWN])
            if len(self.sets) > GROUPS_SHOWN:
                text += f"  ... and {len(self.sets) - GROUPS_SHOWN} more groups\n"
        for s in filter(lambda s: s.reads_mostly_harmful, self.sets):
            name = s.name if len(self.sets) == 1 else f"group '{s.name}'"
            text += (f"warning: {name} reads mostly harmful (expected harmful fraction {s.expected_harmful_fraction:.3f} "
                     f">= {MOSTLY_HARMFUL}); weights have mean 1 within a set, so they cannot make it safe to train on: "
                     "review or reject it\n")
        if small := sum(s.rows < SMALL_SET for s in self.sets):
            text += (f"note: {small} set(s) have fewer than {SMALL_SET} rows; the set's own evidence is thin there "
                     f"(validated on sets of 50 to 1,000 rows)\n")
        if self.decoded:
            text += (f"read decoded (column 'decoded_from'): {sum(self.decoded.values())} rows written in an encoding ("
                     + ", ".join(f"{name}: {count}" for name, count in self.decoded.items()) + "); a service that does "
                     "not expect encoded text should review them\n")
        if self.read_apart:
            text += (f"read apart: {self.read_apart} rows were read as another reading than their whole prompt, the "
                     "one most like the alignment prompts (a part beside encoded text; with a chat's system turn)\n")
        if self.requests_past_window and not self.scored_by_exchange:  # else no chat is read whole
            text += (f"note: {self.requests_past_window} chat rows ask their last request after earlier turns that fill "
                     "the prompt embedder's window: the request is not read in the prompt; "
                     + ("they are most of the rows, so each chat was read with its last exchange as its joint text"
                        if self.read_by_last_exchange else
                        "they are a minority, so it is read only in the chat's joint text, as far as that reaches")
                     + " (docs/validation.md, \"A harmful request in a conversation\")\n")
        if self.scored_by_exchange:
            text += (f"scored by exchange: {self.scored_by_exchange} chats of several exchanges, each as harmful as its "
                     "most harmful exchange (score_by_exchange; docs/validation.md, \"A margin that grows with a chat's "
                     f"exchanges\"); {self.lowered_by_earlier_exchange} of the rows below 0.5 took their weight from "
                     "an exchange before the last (column exchange_from_end counts from a chat's end)\n")
            if self.past_margin_cap:
                text += (f"long chats: {self.past_margin_cap} hold more than {self.margin_cap} exchanges, where the "
                         "margin stops growing; a harmful exchange padded into such a chat is read less well than in "
                         "a short one (docs/validation.md, \"Padding: a margin that stops growing\"), so "
                         "review them\n")
        elif self.inner_exchanges_past_window:
            text += (f"warning: {self.inner_exchanges_past_window} chat rows hold an exchange between their first and "
                     "last that begins past the prompt embedder's window: no reading reaches it, and a harmful exchange "
                     "there was ranked near chance by the scheduler and both baselines; a trainer that learns from "
                     "every answer learns from it, so review such rows, or score them by their exchanges "
                     "(score_by_exchange=true, the default; docs/validation.md, \"A margin that grows with a chat's "
                     "exchanges\")\n")
        if self.unreadable:
            shown = ", ".join(map(str, self.unreadable[:UNREADABLE_SHOWN]))
            treated = ("scored as any row (score_unreadable), so their weights say nothing about them"
                       if self.score_unreadable else "given weight 0 where their set holds English rows, and flagged "
                       "by a cut (score_unreadable=true scores them)")
            text += (f"warning: {len(self.unreadable)} rows read as no English (rows {shown}"
                     f"{', ...' if len(self.unreadable) > UNREADABLE_SHOWN else ''}): the scheduler's evidence comes "
                     f"from English text (a cipher it cannot decode reads like this); {treated}\n")
        if self.cut:
            text += (f"flagged for removal (column 'flagged'): {self.flagged} rows ({self.flagged / self.rows:.1%}) "
                     f"{self.cut.description}\n")
        text += f"weight quantiles: {q}" + (f"\nhistogram: {self.histogram}" if self.histogram else "")
        if self.lowest:
            text += f"\nlowest weights (the {len(self.lowest)} rows the scheduler trusts least):"
            text += "".join(f"\n  {row}" for row in self.lowest)
        if self.label_check:
            text += "\ncheck against the file's own 'label' column (not used for scoring):"
            for method, c in self.label_check.items():
                text += (f"\n  {method:<40} AUROC {c['auroc']:.3f}, harmful share of total weight "
                         f"{c['harmful_weight_share']:.3f}, benign rows kept (weight >= 0.5) {c['benign_kept']:.1%}, "
                         f"harmful rows caught when at most 3 % of benign rows are flagged "
                         f"{c['harmful_caught_at_3pct']:.1%}")
                if "caught_at_matched" in c:
                    text += (f"\n  {'':<40} at its cut: harmful rows flagged {c['caught_at_matched']:.1%}, benign "
                             f"rows flagged {c['benign_flagged_at_matched']:.1%}")
        return text


def read_all(path: Path, group_by: str | None = None,
             clean: bool = False) -> tuple[list[Example], list[str] | None]:
    """The file's rows, and with `group_by` each row's group: the value of that field, which every row must have.
    `clean`: the file calibrates a cut, so no row may carry the label harmful."""
    examples, groups = [], []
    for where, row in tqdm(iter_rows(path), desc="reading", unit=" rows", leave=False):
        examples.append(to_example(row, where))
        if clean and examples[-1].label == "harmful":
            raise DataError(f"{where}: field 'label': 'harmful' in a file given to calibrate_on, which expects clean "
                            "data (benign rows only)")
        if group_by is not None:
            groups.append(group_of(row, group_by, where))
    if not examples:
        raise DataError(f"{path}: empty dataset; expected at least one row")
    return examples, groups if group_by is not None else None


def group_of(row: object, group_by: str, where: str) -> str:
    value = row.get(group_by) if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise DataError(f"{where}: field '{group_by}': expected a non-empty string or number naming the row's group "
                        f"(group_by={group_by}), got {value!r}")
    return str(value).strip()


def embed_in_chunks(scheduler: NeuralScheduler, examples: list[Example], chunk: int) -> RowEmbeddings:
    """Embed with a progress bar over rows; the encoder's own cache skips rows seen before."""
    chunks = []
    with tqdm(total=len(examples), desc="embedding", unit=" rows") as bar:
        for start in range(0, len(examples), chunk):
            chunks.append(scheduler.embed(examples[start:start + chunk]))
            bar.update(len(chunks[-1].prompts))
    return RowEmbeddings(*(torch.cat(part) if part[0] is not None else None for part in zip(*chunks)))


def set_members(groups: list[str] | None, count: int) -> dict[str, list[int]]:
    """The rows of each scored set: one per group, or the whole file."""
    members: dict[str, list[int]] = {}
    for i, name in enumerate(groups or ["the set"] * count):
        members.setdefault(name, []).append(i)
    return members


def score_sets(scheduler: NeuralScheduler, embeddings: RowEmbeddings, examples: list[Example],
               groups: list[str] | None) -> tuple[dict[str, np.ndarray], list[SetSummary], np.ndarray]:
    """Score the rows as one set, or each group as its own set; the columns, and which rows read as no English
    (`ScoreResult.unreadable`), come back in the rows' order."""
    members = set_members(groups, len(examples))
    columns, sets, unreadable = {}, [], np.zeros(len(examples), dtype=bool)
    for name, rows in tqdm(members.items(), desc="scoring sets", unit=" sets", disable=len(members) == 1):
        result = scheduler.score_examples([examples[i] for i in rows], embeddings_of(embeddings, rows))
        for column, values in result.columns().items():
            columns.setdefault(column, np.zeros(len(examples), dtype=values.dtype))[rows] = values
        unreadable[rows] = result.unreadable
        sets.append(SetSummary(name, len(rows), int((result.weight < 0.5).sum()), result.expected_harmful_fraction,
                               result.scoring_shift, result.withheld))
    return columns, sets, unreadable


def embeddings_of(embeddings: RowEmbeddings, rows: list[int]) -> RowEmbeddings:
    index = torch.as_tensor(rows)
    return RowEmbeddings(*(None if e is None else e[index] for e in embeddings))


def output_rows(examples: list[Example], columns: dict[str, np.ndarray]) -> list[dict]:
    """Each input row unchanged, plus the weight columns (a plain-string row keeps its text), and `decoded_from` where
    any row was read decoded (`scheduler.data.encodings`)."""
    decoded = any(example.encoding for example in examples)
    rows = []
    for i, example in enumerate(examples):
        row = dict(example.row)
        row.update({name: values[i].item() for name, values in columns.items()})
        if decoded:
            row["decoded_from"] = example.encoding
        rows.append(row)
    return rows


def plot_histogram(weights: np.ndarray, path: Path) -> Path:
    from scheduler.plots import plt, save_figure  # pyplot on the Agg backend, loaded only when a histogram is asked for

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(weights, bins=50, color="#4477aa")
    ax.axvline(0.5, color="#cc3311", linestyle="--", label="0.5")
    ax.set_xlabel("weight (mean 1; lower = less safe)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(weights)} rows")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def apply_scheduler(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, chunk: int = 512,
                    histogram: bool = True, scoring_shift: float | None = None,
                    scoring_shift_taper: Sequence[float] | None = None, group_by: str | None = None,
                    withhold_below: float | None = None,
                    withhold_block: Sequence[float] | None = None, withhold_spares_refusals: bool | None = None,
                    show_lowest: int = 5, calibrate_on: str | Path | Sequence[str | Path] | None = None,
                    flag_rate: float = BENIGN_FLAG_RATE, flag_below: float | None = None,
                    score_unreadable: bool = False, score_by_exchange: bool = True,
                    exchange_margin: float | None = None, exchange_margin_cap: int | None = None,
                    short_answer_words: int | None = None) -> ApplySummary:
    """Read, embed, score and write atomically; the input file is never modified.

    `scoring_shift`, `scoring_shift_taper`, `withhold_below`, `withhold_block`, `withhold_spares_refusals` and
    `score_unreadable` override the checkpoint's operating point (`NeuralScheduler.load`). The summary lists the
    `show_lowest` rows with the lowest weights.
    `group_by` names a field (a task or source column) whose values split the file into sets scored apart: the
    posterior reads each row against its own set, so a task that is a small part of a mixed file is read against
    rows like it.
    `calibrate_on` names files of the user's own clean data. Each set is scored once more with its clean rows in it
    (all of them, or with `group_by` those of its group), which adds the column `clean_p_value`
    (`NeuralScheduler.clean_p_values_from_embeddings`), and `flagged`, true where it is at most `flag_rate`: at most
    that share of new clean rows like the user's are flagged in expectation, a known cost in benign rows. Or
    `flag_below` flags the rows whose `unshifted_mu` lies below a cut of the user's own.
    Rows that read as no English get weight 0 and are flagged, unless `score_unreadable`.
    `score_by_exchange` scores a chat of several exchanges by its exchanges (`NeuralScheduler.score_by_exchanges`),
    raised by `exchange_margin` * ln(its number of exchanges, counted up to `exchange_margin_cap`) logits (None keeps
    the scheduler's); an exchange answered in at most `short_answer_words` words is read with the next one. False
    reads a chat as one row."""
    input_path, output_path = Path(input_path), Path(output_path)
    if isinstance(show_lowest, bool) or not isinstance(show_lowest, int) or show_lowest < 0:
        raise DataError(f"show_lowest: expected a whole number of rows >= 0; got {show_lowest!r}")
    calibration_paths = checked_cut_options(calibrate_on, flag_rate, flag_below)
    for path in (input_path, *calibration_paths):
        if output_path.resolve() == path.resolve():
            raise DataError(f"{output_path}: output would overwrite the input file {path}; choose another output path")
    examples, groups = read_all(input_path, group_by)  # fail on bad rows before spending time on the model
    members = set_members(groups, len(examples))
    clean = clean_rows_per_set(calibration_paths, group_by, members, flag_rate) if calibration_paths else None
    scheduler = NeuralScheduler.load(checkpoint, scoring_shift=scoring_shift, scoring_shift_taper=scoring_shift_taper,
                                     withhold_below=withhold_below, withhold_block=withhold_block,
                                     withhold_spares_refusals=withhold_spares_refusals,
                                     score_unreadable=score_unreadable, score_by_exchange=score_by_exchange,
                                     exchange_margin=exchange_margin, exchange_margin_cap=exchange_margin_cap,
                                     short_answer_words=short_answer_words)
    read = scheduler.read(examples)
    read_apart = sum(r.prompt != e.prompt for r, e in zip(read, examples))
    past_window = sum(scheduler.embedder.requests_past_window(read))  # as `chats_read_by_last_exchange` counted them
    inner_past_window = sum(scheduler.embedder.inner_exchanges_past_window(read))
    examples = read
    if clean:
        clean = {name: scheduler.read(rows, like=examples) for name, rows in clean.items()}
    embeddings = embed_in_chunks(scheduler, examples, chunk)
    columns, sets, unreadable = score_sets(scheduler, embeddings, examples, groups)
    lookup = cache(lambda: scheduler.lookup_probability(embeddings.prompts))  # the p-values and the label check
    cut = None
    if flag_below is not None:
        columns["flagged"] = columns["unshifted_mu"] < flag_below
        cut = Cut(f"with unshifted_mu below {flag_below:.4g} (given: flag_below)")
    elif clean:
        columns["clean_p_value"], lookup_p_value = clean_p_values_per_set(scheduler, embeddings, examples, members,
                                                                          clean, chunk, lookup())
        columns["flagged"] = flagged_at_rate(columns["clean_p_value"], flag_rate)
        cut = Cut(f"whose clean_p_value is at most {flag_rate:.1%}: each set was scored with its clean rows "
                  f"({sum(map(len, clean.values()))} from {', '.join(path.name for path in calibration_paths)}), "
                  f"which flags at most {flag_rate:.1%} of new clean rows like them in expectation",
                  flagged_at_rate(lookup_p_value, flag_rate))
    if cut and not score_unreadable:
        columns["flagged"] = columns["flagged"] | unreadable
    write_rows(output_rows(examples, columns), output_path)
    weights = columns["weight"]
    hist = plot_histogram(weights, output_path.with_suffix(".hist.png")) if histogram else None
    quantiles = dict(zip(["min", "q05", "q25", "median", "q75", "q95", "max"],
                         np.quantile(weights, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1]).tolist(), strict=True))
    return ApplySummary(quantiles, output_path, hist, sets,
                        label_check(examples, columns, lookup, cut and cut.lookup_flagged),
                        lowest_rows(examples, weights, show_lowest), cut,
                        int(columns["flagged"].sum()) if cut else 0,
                        dict(Counter(e.encoding for e in examples if e.encoding)),
                        (np.flatnonzero(unreadable) + 1).tolist(), score_unreadable, read_apart, past_window,
                        any(e.joint_prompt for e in examples), inner_past_window,
                        sum(bool(e.exchanges) for e in examples) if score_by_exchange else 0,
                        int(((weights < 0.5) & (columns.get("exchange_from_end", 0) > 0)).sum()),
                        scheduler.exchange_margin_cap, chats_past_margin_cap(scheduler, examples))


def chats_past_margin_cap(scheduler: NeuralScheduler, examples: Sequence[Example]) -> int:
    """Chats the scheduler scores by their exchanges that hold more exchanges than its margin counts."""
    if not scheduler.score_by_exchange:
        return 0
    counted = scheduler.margin_exchanges(examples)
    return int(sum(len(e.exchanges) > n for e, n in zip(examples, counted, strict=True)))


def checked_cut_options(calibrate_on: str | Path | Sequence[str | Path] | None, flag_rate: float,
                        flag_below: float | None) -> list[Path]:
    """The calibration files, once the cut's options are known to make sense together."""
    listed = isinstance(calibrate_on, Sequence) and not isinstance(calibrate_on, str)
    paths = [] if calibrate_on is None else list(calibrate_on) if listed else [calibrate_on]
    if isinstance(flag_rate, bool) or not isinstance(flag_rate, (int, float)) or not 0 < flag_rate < 1:
        raise DataError(f"flag_rate: expected the share of a clean set's rows the cut may flag, between 0 and 1; "
                        f"got {flag_rate!r}")
    if flag_below is not None and (isinstance(flag_below, bool) or not isinstance(flag_below, (int, float))):
        raise DataError(f"flag_below: expected a number (a cut on unshifted_mu); got {flag_below!r}")
    if flag_below is not None and paths:
        raise DataError("calibrate_on and flag_below both set: give the cut (flag_below) or the clean files that set "
                        "it (calibrate_on), not both")
    if not all(isinstance(path, (str, Path)) and str(path) for path in paths):
        raise DataError(f"calibrate_on: expected a file or a list of files of clean rows; got {calibrate_on!r}")
    return [Path(path) for path in paths]


def clean_rows_per_set(paths: list[Path], group_by: str | None, members: dict[str, list[int]],
                       rate: float) -> dict[str, list[Example]]:
    """Before any model loads: the clean rows that join each scored set (every row of the files, or with `group_by`
    those of the set's group), enough of them to flag at `rate`."""
    clean: dict[str, list[Example]] = {name: [] for name in members}
    for path in paths:
        examples, groups = read_all(path, group_by, clean=True)
        for name, rows in set_members(groups, len(examples)).items():
            clean.get(name, []).extend(examples[i] for i in rows)
    needed = calibration_rows_needed(rate)
    for name, rows in clean.items():
        if len(rows) < needed:
            where = f"group '{name}' (group_by={group_by}): " if group_by else ""
            raise DataError(f"calibrate_on ({', '.join(map(str, paths))}): {where}{len(rows)} clean rows cannot fit a "
                            f"cut that flags at most {rate:.1%} of new rows; each scored set needs at least {needed} "
                            "clean rows of its own (or a higher flag_rate)")
    return clean


def clean_p_values_per_set(scheduler: NeuralScheduler, embeddings: RowEmbeddings, examples: list[Example],
                           members: dict[str, list[int]], clean: dict[str, list[Example]], chunk: int,
                           lookup: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `clean_p_value`, its set scored with its clean rows, and the p-value of its alignment look-up
    probability (`lookup`) against the same clean rows (a look-up reads no set, so its rows need no second scoring)."""
    p_value, lookup_p_value = np.zeros(len(examples)), np.zeros(len(examples))
    for name, rows in tqdm(members.items(), desc="scoring with clean rows", unit=" sets", disable=len(members) == 1):
        clean_embeddings = embed_in_chunks(scheduler, clean[name], chunk)
        p_value[rows] = scheduler.clean_p_values_from_embeddings(
            [examples[i] for i in rows], embeddings_of(embeddings, rows), clean[name], clean_embeddings)
        lookup_p_value[rows] = conformal_p_values(scheduler.lookup_probability(clean_embeddings.prompts), lookup[rows])
    return p_value, lookup_p_value


def lowest_rows(examples: list[Example], weights: np.ndarray, count: int) -> list[FlaggedRow]:
    """The `count` rows (>= 0, checked by `apply_scheduler`) with the lowest weights, lowest first (ties in file order)."""
    order = np.argsort(weights, kind="stable")[:count]
    return [FlaggedRow(int(i) + 1, float(weights[i]), examples[i].prompt) for i in order]


def label_check(examples: list[Example], columns: dict[str, np.ndarray], lookup_probability: Callable[[], np.ndarray],
                lookup_flagged: np.ndarray | None) -> dict[str, dict[str, float]] | None:
    """Detection metrics when every row carries a harmful/benign `label` (e.g. the bundled demo set), beside those
    of the alignment look-up on the same rows, so that a user sees what the scheduler adds over the simple answer.
    With a cut, the scheduler's `flagged` rows too, and with clean files the rows the look-up flags at the same rate
    against them: the same cost in benign rows."""
    labels = [e.label for e in examples]
    if not set(labels) <= {"harmful", "benign"} or len(set(labels)) < 2:
        return None
    harmful = np.array([label == "harmful" for label in labels])
    probability = lookup_probability()
    at_cut = {"scheduler": (columns["weight"], columns.get("flagged")), LOOKUP: (normalise(probability), lookup_flagged)}
    checks = {}
    for method, (weights, flagged) in at_cut.items():
        checks[method] = detection_metrics(harmful, weights)
        if flagged is not None:
            checks[method] |= caught_when_flagged(harmful, flagged, weights)
    return checks
