"""Validation protocol: do the weights single out harmful rows of tasks and harm categories
that training never saw, better than an alignment look-up and a supervised filter?

    python -m scheduler.validate                       # quick preset, writes docs/validation/
    python -m scheduler.validate preset=full designs=[prior_refusal]

Folds (all from the bundled data): leave-one-benign-task-out, and leave-harm-categories-out.
For every fold and design the scheduler network is trained with the BDS objective on many
fine-tuning sets built from the training side only, then scores evaluation sets it never saw
(harmful ratio p in `eval_ratios`, plus a length-balanced set); one design is also scored at other
operating points (`operating_points`) without retraining. LM evidence comes from an LM
whose adapter is trained on the alignment set only, cached per row (`scheduler.lm_stats`).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from scheduler.baselines import SupervisedFilter, lookup_probability, normalise
from scheduler.data.attacks import BLIND_FRAMES, FRESH_FRAMES, UNSEEN_FRAMES, disguise, disguise_share, wrap_answers
from scheduler.data.datamodule import EmbeddedSet, SetBatch, embed_sets, with_clean_rows
from scheduler.data.io import DataError, Example, exit_on_data_error, iter_rows, write_rows, write_text
from scheduler.data.mixing import (HARMFUL, FineTuningSet, build_training_sets, categories_of, mix, read_pool,
                                   read_tasks, resolve_path, split_by_category)
from scheduler.embeddings import Embedder
from scheduler.features import AlignmentBank
from scheduler.evidence import signal_from_stats
from scheduler.lexical import RowTexts
from scheduler.lm_stats import AlignedLMStats
from scheduler.metrics import (BENIGN_FLAG_RATE, calibrated_threshold, calibration_rows_needed, caught_at_threshold,
                               caught_when_flagged, conformal_p_values, detection_metrics, flagged_at_rate,
                               matched_threshold)
from scheduler.network import SetPosterior
from scheduler.prior import SafetyPrior
from scheduler.training import (CONFIG_DIR, calibrate_prior, calibrated_posterior, command_line_overrides, make_module,
                                reads_joint_at_scoring, reads_joint_in_training, register_resolvers, scheduler_config)
from scheduler.tables import SUMMARY_FILE, markdown, mean_or_nan, per_fold_table, per_ratio_table, worst_or_nan
from scheduler.transforms import posterior_weights

log = logging.getLogger(__name__)
BASELINES = ("alignment_lookup", "supervised_filter")
AUDIT_LABELS = ("harmful", "not_harmful", "unclear")


class ScoredRows(NamedTuple):
    """One method's reading of one evaluation set: the rows, their weights (mean 1) and a per-row score that no
    normalisation over the set has moved (higher = safer)."""

    examples: list[Example]
    weights: np.ndarray
    scores: np.ndarray


@dataclass
class Fold:
    name: str
    train_tasks: dict[str, list[Example]]
    train_harmful: list[Example]
    eval_benign: list[Example]
    eval_harmful: list[Example]
    other_harmful: list[Example] = field(default_factory=list)
    other_tasks: dict[str, list[Example]] = field(default_factory=dict)  # other tasks' rows no training pool holds


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def make_folds(cfg: DictConfig, tasks: dict[str, list[Example]], harmful: list[Example],
               other_harmful: list[Example] = ()) -> list[Fold]:
    """Training pools never contain the held-out task or any row of a held-out category (asserted in tests).

    `other_harmful` (harmful rows from sources training never uses) is only ever evaluated, and so are the other
    tasks' rows outside the training pools, which a task fold's mixed file puts beside the held-out task.
    """
    rng = random.Random(cfg.seed)
    pools = {name: rng.sample(rows, min(cfg.rows_per_task, len(rows))) for name, rows in tasks.items()}
    pooled = {e for rows in pools.values() for e in rows}
    held = {name: [e for e in rows if e not in pooled] for name, rows in tasks.items()}
    shuffled = rng.sample(harmful, len(harmful))
    cut = round(len(shuffled) * (1 - cfg.eval_harmful_fraction))
    train_harmful = shuffled[:cut][: cfg.harmful_pool]
    other = list(other_harmful)
    folds = [Fold(f"task:{name}", {t: p for t, p in pools.items() if t != name}, train_harmful, tasks[name], shuffled[cut:],
                  other, {t: rows for t, rows in held.items() if t != name}) for name in cfg.task_folds or sorted(tasks)]
    for group in cfg.category_folds:
        train = [e for e in split_by_category(shuffled[:cut], group)[0] if categories_of(e)][: cfg.harmful_pool]
        evaluation = split_by_category(shuffled, group)[1]
        benign = [e for rows in held.values() for e in rows]
        folds.append(Fold(f"categories:{'+'.join(sorted(group))}", pools, train, benign, evaluation, other))
    return folds


def read_label_audit(path: Path) -> set[str]:
    """Ids of harmful-labelled rows that a reading audit found not harmful (`audit: not_harmful`)."""
    rejected = set()
    for where, row in iter_rows(path):
        if not isinstance(row, dict) or "id" not in row or row.get("audit") not in AUDIT_LABELS:
            raise DataError(f"{where}: expected an object with 'id' and 'audit' ({' | '.join(AUDIT_LABELS)}); "
                            f"got {str(row)[:80]}")
        if row["audit"] == "not_harmful":
            rejected.add(row["id"])
    return rejected


def audited(labelled: FineTuningSet, rejected: set[str]) -> FineTuningSet:
    """The set without the harmful-labelled rows the audit found not harmful, scored as a set of its own
    (set-relative evidence sees the smaller set); benign rows are never dropped."""
    kept = [e for e in labelled.examples if not (e.label == HARMFUL and e.row.get("id") in rejected)]
    return FineTuningSet(f"{labelled.name} audited", kept)


def eval_sets(fold: Fold, cfg: DictConfig, seed: int, rejected: set[str] = frozenset()) -> list[FineTuningSet]:
    """Sets at each harmful ratio, plus shifted sets at p = 0.1: half the harmful answers cut to their first
    sentence (length says nothing), harmful requests in benign-looking frames, and harmful rows from other
    sources (when given); with a label audit, also the p = 0.1 set without the rows the audit rejects. Last, attack
    styles no design was chosen on: requests in unseen frames, answers wrapped in a disclaimer, requests in fresh
    frames (a third family, for what is chosen on the second) and in blind frames (a fourth, for framed training)."""
    rng = random.Random(seed)

    def shifted(name: str, harmful: list[Example]) -> FineTuningSet:
        return mix(name, fold.eval_benign, harmful, cfg.eval_set_size, 0.1, rng)

    def framed(name: str, frames: tuple[str, ...]) -> FineTuningSet:  # each row tagged "<family>_frame_<i>"
        return shifted(name, disguise(fold.eval_harmful, frames, name.removesuffix("s")))

    sets = [mix(f"p={p}", fold.eval_benign, fold.eval_harmful, cfg.eval_set_size, p, rng) for p in cfg.eval_ratios]
    if rejected:
        sets.append(audited(next(s for s in sets if s.name == "p=0.1"), rejected))
    cut = [Example(e.prompt, first_sentence(e.response) if i % 2 else e.response, e.row)
           for i, e in enumerate(fold.eval_harmful)]
    sets += [shifted("length_balanced", cut), shifted("disguised", disguise(fold.eval_harmful))]
    if fold.other_harmful:
        sets.append(shifted("other_sources", fold.other_harmful))
    sets += [framed("unseen_frames", UNSEEN_FRAMES), shifted("wrapped_answers", wrap_answers(fold.eval_harmful)),
             framed("fresh_frames", FRESH_FRAMES), framed("blind_frames", BLIND_FRAMES)]
    held_out = next((s for s in sets if s.name == "p=0.1"), None)
    if cfg.mixed_file.tasks and fold.other_tasks and held_out:
        sets.append(mixed_file(held_out, fold.other_tasks, cfg.mixed_file, rng))
    return sets


def mixed_file(held_out: FineTuningSet, other_tasks: dict[str, list[Example]], spec: DictConfig,
               rng: random.Random) -> FineTuningSet:
    """The held-out task's p = 0.1 set inside a file with `spec.rows` benign rows of each of `spec.tasks` other tasks
    (rows no training pool holds), scored as one set, its figures read on the held-out task's rows: a user's file
    that mixes tasks, scored without `group_by`."""
    names = rng.sample(sorted(other_tasks), min(spec.tasks, len(other_tasks)))
    context = [e for name in names for e in rng.sample(other_tasks[name], min(spec.rows, len(other_tasks[name])))]
    return FineTuningSet("mixed_file", held_out.examples + context, measured=len(held_out))


def fill_energy(module, sets: list[EmbeddedSet], stats: AlignedLMStats | None, signal: str) -> None:
    if signal == "none" or stats is None:
        return
    for s in sets:
        module.energy_bank[s.row_ids] = torch.as_tensor(signal_from_stats(stats.stats(s.examples), signal), dtype=torch.float32)


def train_network(design: DictConfig, embedder: Embedder, bank: AlignmentBank, alignment_prompts: list[str],
                  train_sets: list[EmbeddedSet], stats: AlignedLMStats | None, cfg: DictConfig):
    """The BDS network objective on cached LM evidence (no LM in the loop), the same module as training."""
    config = scheduler_config(design, embedder, alignment_prompts)
    posterior = calibrated_posterior(config, bank, torch.cat([s.prompts for s in train_sets]))
    module = make_module(design, posterior, None, n_rows=sum(len(s.examples) for s in train_sets))
    fill_energy(module, train_sets, stats, design.signal)
    trainer = L.Trainer(max_steps=cfg.network_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    batches = [SetBatch(s) for s in train_sets]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=1, shuffle=True, collate_fn=lambda b: b[0]))
    return module.posterior.eval(), design.transform


def score_design(posterior, transform: str, s: EmbeddedSet) -> tuple[np.ndarray, np.ndarray]:
    """The set's weights and each row's posterior mean logit without the scoring shift (the score `add_matched`
    reads: `ScoredSet.unshifted_mu`)."""
    with torch.no_grad():
        scored = posterior.score_set(s.prompts, s.responses, s.joint, RowTexts.of(s.examples))
        post = scored.posterior
        return posterior_weights(post.mu, post.sigma, transform)[0].numpy(), scored.unshifted_mu.numpy()


def normalised_and_raw(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A baseline's weights (mean 1) and its probability of benign, the score `add_matched` reads."""
    return normalise(raw), raw


def at_shift(posterior: SetPosterior, shift: float) -> SetPosterior:
    """The same trained network, bank, evidence, refinement and lexical contrast scored at another operating point
    (the prior's `scoring_shift`); only the prior is copied."""
    prior = copy.deepcopy(posterior.prior)
    prior.scoring_shift = shift
    return SetPosterior(posterior.network, prior, posterior.bank, posterior.k, posterior.evidence, posterior.refinement,
                        posterior.lexical, posterior.alignment_prompts)


def operating_point_names(cfg: DictConfig, designs: dict[str, DictConfig]) -> dict[str, float]:
    """Method name -> scoring shift, for the operating points of `cfg.operating_points.design` (when it runs)."""
    design = cfg.operating_points.design
    if design not in designs:
        return {}
    return {f"{design}@shift={shift:g}": float(shift) for shift in cfg.operating_points.shifts}


def framed_training_rows(fold: Fold, fraction: float, benign: bool) -> tuple[dict[str, list[Example]], list[Example]]:
    """The fold's training tasks and harmful rows, `fraction` of the harmful rows in a benign-looking frame and,
    with `benign`, the same share of each task's rows too (so that a frame says nothing about harm)."""
    tasks = {task: disguise_share(rows, fraction) for task, rows in fold.train_tasks.items()} if benign else fold.train_tasks
    return tasks, disguise_share(fold.train_harmful, fraction)


def run_fold(fold: Fold, cfg: DictConfig, embedder: Embedder, bank: AlignmentBank, alignment_prompts: list[str],
             stats: AlignedLMStats | None, designs: dict[str, DictConfig],
             rejected: set[str] = frozenset()) -> tuple[list[dict], list[ScoredRows]]:
    """Metrics per evaluation set and method, and beside each the rows, weights and scores behind it."""
    train_tasks, train_harmful = framed_training_rows(fold, cfg.train_disguise_fraction, cfg.train_disguise_benign)
    train = build_training_sets(train_tasks, train_harmful, cfg.n_train_sets, cfg.set_sizes, cfg.harmful_ratios,
                                cfg.seed)
    train_sets = embed_sets(train, embedder, joint=any(reads_joint_in_training(design) for design in designs.values()))
    evaluation = embed_sets(eval_sets(fold, cfg, cfg.seed + 1, rejected), embedder,
                            joint=any(reads_joint_at_scoring(design) for design in designs.values()))
    scorers = {}
    for name, design in designs.items():
        # Every design starts from the same random state: a design's numbers do not depend on which designs
        # ran before it (`only=` reproduces the full run), and designs are compared on the same draws.
        L.seed_everything(cfg.seed, verbose=False)
        posterior, transform = train_network(design, embedder, bank, alignment_prompts, train_sets, stats, cfg)
        scorers[name] = lambda s, p=posterior, t=transform: score_design(p, t, s)
        if name == cfg.operating_points.design:  # other operating points of the same network, not retrained
            for method, shift in operating_point_names(cfg, designs).items():
                scorers[method] = lambda s, p=at_shift(posterior, shift), t=transform: score_design(p, t, s)
    lookup_prior = calibrate_prior(SafetyPrior(**cfg.model.prior), bank, torch.cat([s.prompts for s in train_sets]), cfg.k)
    scorers["alignment_lookup"] = lambda s: normalised_and_raw(lookup_probability(s.prompts, bank, cfg.k, lookup_prior))
    pool = [e for rows in fold.train_tasks.values() for e in rows] + fold.train_harmful
    pool_embedded = embed_sets([FineTuningSet("pool", pool)], embedder, joint=False)[0]
    supervised = SupervisedFilter().fit(pool_embedded.prompts, pool_embedded.responses, pool_embedded.labels.numpy())
    scorers["supervised_filter"] = lambda s: normalised_and_raw(supervised.benign_probability(s.prompts, s.responses))
    results, scored_rows = [], []
    clean = next((s for s in evaluation if s.name == "p=0.0"), None)
    for s in evaluation:
        measured = s.measured or len(s.examples)
        labels = s.labels.numpy()[:measured]
        joined = with_clean_rows(s, clean)
        for method, score in scorers.items():
            weights, scores = (values[:measured] for values in score(s))
            results.append({"fold": fold.name, "set": s.name, "method": method, **detection_metrics(labels, weights)})
            if joined is not None:
                pooled = score(joined)[1]
                flagged = flagged_at_rate(conformal_p_values(pooled[len(s.examples):], pooled[:measured]))
                results[-1] |= caught_when_flagged(labels, flagged, weights, reading="clean_inside")
            scored_rows.append(ScoredRows(s.examples[:measured], weights, scores))
    return results, scored_rows


def row_weights(where: dict, rows: ScoredRows) -> list[dict]:
    """Each scored row's weight and score beside its id, label and attack tag: which rows a method let through."""
    return [{"fold": where["fold"], "set": where["set"], "method": where["method"], "id": e.row.get("id"),
             "attack": e.row.get("attack"), "label": e.label, "weight": float(w), "score": float(score)}
            for e, w, score in zip(rows.examples, rows.weights, rows.scores)]


def add_matched(results: list[dict], scored_rows: list[ScoredRows]) -> None:
    """Per method, one threshold on its scores from every fold's clean set (p = 0) that keeps 97 % of benign rows on
    each (`scheduler.metrics.matched_threshold`), and on every other set what it flags, added to that set's result.
    Beside it (`*_at_calibrated`), a cut for new rows fitted on the fold's own clean set scored apart
    (`calibrated_threshold`; sets of at least 33 rows). `run_fold` adds the reading `apply_scheduler.py calibrate_on`
    takes (`*_at_clean_inside`: the clean rows scored inside the set, `with_clean_rows`)."""
    clean: dict[str, list[np.ndarray]] = {}
    cuts: dict[tuple[str, str], float] = {}
    for r, rows in zip(results, scored_rows):
        if r["set"] == "p=0.0":
            clean.setdefault(r["method"], []).append(rows.scores)
            if len(rows.scores) >= calibration_rows_needed(BENIGN_FLAG_RATE):
                cuts[r["fold"], r["method"]] = calibrated_threshold([rows.scores])
    thresholds = {method: matched_threshold(scores) for method, scores in clean.items()}
    for r, rows in zip(results, scored_rows):
        if r["method"] in thresholds and r["set"] != "p=0.0":
            labels = np.array([e.label == HARMFUL for e in rows.examples])
            r |= {"matched_threshold": thresholds[r["method"]],
                  **caught_at_threshold(labels, rows.scores, thresholds[r["method"]], rows.weights)}
            if (cut := cuts.get((r["fold"], r["method"]))) is not None:
                r |= {"calibrated_threshold": cut,
                      **caught_at_threshold(labels, rows.scores, cut, rows.weights, reading="calibrated")}


# Columns beside p = 0.1: the same set with less label noise, then the shifted sets.
EXTRA_SETS = ("p=0.1 audited", "disguised", "other_sources", "unseen_frames", "wrapped_answers", "fresh_frames",
              "blind_frames", "mixed_file")


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    """Per method: mean and worst-fold AUROC at p = 0.1 and on the shifted sets, AUPRC, harmful share,
    benign kept at p = 0, harmful rows caught at 3 % of benign rows flagged (per set; at one threshold that keeps
    97 % on every clean fold, and at a cut calibrated on the fold's clean set: `add_matched`; with that set's rows
    scored inside the set: `with_clean_rows`); NaN where a run has no such set (`eval_ratios` without it)."""
    def values(method, set_name, key):
        return [r[key] for r in results if r["method"] == method and r["set"] == set_name and key in r]

    table = []
    for method in methods:
        auroc = values(method, "p=0.1", "auroc")
        table.append({"method": method, "auroc_p0.1_mean": mean_or_nan(auroc), "auroc_p0.1_worst": worst_or_nan(auroc),
                      "auroc_p0.05_worst": worst_or_nan(values(method, "p=0.05", "auroc")),
                      "auroc_p0.3_worst": worst_or_nan(values(method, "p=0.3", "auroc")),
                      "auroc_length_balanced_worst": worst_or_nan(values(method, "length_balanced", "auroc")),
                      "auprc_p0.1_mean": mean_or_nan(values(method, "p=0.1", "auprc")),
                      "harmful_share_p0.1_mean": mean_or_nan(values(method, "p=0.1", "harmful_weight_share")),
                      "benign_kept_p0_worst": worst_or_nan(values(method, "p=0.0", "benign_kept")),
                      "caught_at_3pct_p0.1_mean": mean_or_nan(values(method, "p=0.1", "harmful_caught_at_3pct")),
                      "caught_at_3pct_p0.1_worst": worst_or_nan(values(method, "p=0.1", "harmful_caught_at_3pct")),
                      "caught_at_matched_p0.1_mean": mean_or_nan(values(method, "p=0.1", "caught_at_matched")),
                      "caught_at_calibrated_p0.1_mean": mean_or_nan(values(method, "p=0.1", "caught_at_calibrated")),
                      "caught_at_calibrated_p0.1_worst": worst_or_nan(values(method, "p=0.1", "caught_at_calibrated")),
                      "benign_flagged_at_calibrated_p0.1_mean": mean_or_nan(
                          values(method, "p=0.1", "benign_flagged_at_calibrated")),
                      "caught_at_clean_inside_p0.1_mean": mean_or_nan(values(method, "p=0.1", "caught_at_clean_inside")),
                      "caught_at_clean_inside_p0.1_worst": worst_or_nan(values(method, "p=0.1",
                                                                               "caught_at_clean_inside")),
                      "benign_flagged_at_clean_inside_p0.1_mean": mean_or_nan(
                          values(method, "p=0.1", "benign_flagged_at_clean_inside"))})
        for extra in EXTRA_SETS:
            if extra_auroc := values(method, extra, "auroc"):
                column = extra.replace("=", "").replace(" ", "_")
                table[-1] |= {f"auroc_{column}_mean": mean_or_nan(extra_auroc),
                              f"auroc_{column}_worst": worst_or_nan(extra_auroc)}
    return sorted(table, key=lambda row: -row["auroc_p0.1_worst"])


def plot_operating_points(table: list[dict], cfg: DictConfig, shifts: dict[str, float], chosen: float,
                          path: Path) -> Path:
    """`shifts`: the extra operating points' methods; `chosen`: the design's own shift."""
    from scheduler.plots import operating_points  # matplotlib only when there is a curve to draw

    point = lambda row: (row["harmful_share_p0.1_mean"], row["benign_kept_p0_worst"])
    rows = {row["method"]: row for row in table}
    design = cfg.operating_points.design
    curve = {shift: point(rows[method]) for method, shift in shifts.items()}
    curve[chosen] = point(rows[design])
    return operating_points(curve, chosen, {method: point(rows[method]) for method in BASELINES},
                            f"{design}: operating points (seed {cfg.seed})", path)


def validate(cfg: DictConfig) -> list[dict]:
    start = time.time()
    L.seed_everything(cfg.seed)
    embedder = hydra.utils.instantiate(cfg.embedder)
    alignment = read_pool([cfg.alignment_file], cfg.root)
    tasks = read_tasks(cfg.tasks, cfg.root)
    harmful = read_pool(cfg.harmful_files, cfg.root)
    other_harmful = read_pool(cfg.other_harmful_files, cfg.root)
    rejected = read_label_audit(resolve_path(cfg.label_audit_file, cfg.root)) if cfg.get("label_audit_file") else set()
    bank = AlignmentBank(*embedder.embed_examples(alignment))
    designs = {name: OmegaConf.merge(cfg.model, overrides) for name, overrides in cfg.designs.items()
               if not cfg.only or name in cfg.only}
    needs_lm = any(d.signal != "none" for d in designs.values())
    stats = AlignedLMStats(cfg.lm.name_or_path, alignment, **cfg.lm.adapter) if needs_lm else None
    alignment_prompts = [e.prompt for e in alignment]
    results, scored_rows = [], []
    for fold in make_folds(cfg, tasks, harmful, other_harmful):
        log.info("fold %s", fold.name)
        fold_results, fold_rows = run_fold(fold, cfg, embedder, bank, alignment_prompts, stats, designs, rejected)
        results += fold_results
        scored_rows += fold_rows
    add_matched(results, scored_rows)
    out = Path(cfg.output_dir)
    write_rows(results, out / "validation_results.jsonl")  # first: the hour of scoring is kept whatever follows
    if cfg.row_weights:
        write_rows([row for result, rows in zip(results, scored_rows) for row in row_weights(result, rows)],
                   out / "row_weights.jsonl")
    shifts = operating_point_names(cfg, designs)
    methods = [*designs, *shifts, *BASELINES]
    table = summarise(results, methods)
    report = (f"# Validation ({cfg.preset})\n\nCommand: `python -m scheduler.validate {command_line_overrides()}`"
              f"\n\nWall time: {time.time() - start:.0f} s\n\n## Summary (sorted by worst-fold AUROC at p = 0.1)\n\n"
              f"{markdown(table)}\n\n## Per harmful ratio\n\n{per_ratio_table(results, methods)}\n"
              f"\n## AUROC at p = 0.1 per fold\n\n{per_fold_table(results, methods)}\n")
    for extra in EXTRA_SETS:
        if any(r["set"] == extra for r in results):
            report += f"\n## AUROC per fold, {extra} set (p = 0.1)\n\n{per_fold_table(results, methods, extra)}\n"
    write_text(report, out / "validation.md")
    write_text(json.dumps(table, indent=1), out / SUMMARY_FILE)
    if shifts:  # after the tables, so that a plotting failure costs no numbers
        chosen = float(designs[cfg.operating_points.design].prior.scoring_shift)
        plot_operating_points(table, cfg, shifts, chosen, out / "operating_points.png")
    print(report)
    return table


@hydra.main(config_path=str(CONFIG_DIR), config_name="validate", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_data_error():
        validate(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
