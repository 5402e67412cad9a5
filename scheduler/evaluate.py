"""Evaluation: does the scheduler find harmful rows in datasets it never saw, keep a fine-tuned
LM safe while it learns the task, and beat (or undercut in cost) what a user would do instead?

    python train_scheduler.py experiment=heldout_eval        # the checkpoint scored below
    python -m scheduler.evaluate                             # quick preset -> docs/evaluation/quick/
    python -m scheduler.evaluate evaluation=full 'checkpoints=[amortised:A.ckpt,with_summary:B.ckpt]'
    python -m scheduler.evaluate evaluation=detection 'checkpoints=[A.ckpt]' 'harmful_sources=[mine.jsonl]'  # no LM
    python -m scheduler.evaluate evaluation=detection ... 'operating_points={withhold:{withhold_below:-6}}'  # A@withhold too

Every method weights the same grid of sets (benign task x harmful source x ratio p). Rows
that trained a checkpoint (keys stored in it) are removed from every evaluation pool, so
what is scored is unseen. Labels are used only to measure.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from scheduler.baselines import SupervisedFilter, lookup_probability, normalise
from scheduler.data.datamodule import EmbeddedSet, embed_sets, with_clean_rows
from scheduler.data.io import DataError, Example, exit_on_data_error, read_examples, write_rows, write_text
from scheduler.data.mixing import FineTuningSet, categories_of, mix, read_pool, read_tasks
from scheduler.downstream import accuracy, finetune, generate
from scheduler.embeddings import RowEmbeddings
from scheduler.evidence import LMEvidence
from scheduler.judges import EmbeddingHarmJudge, RefusalJudge, agreement
from scheduler.lexical import RowTexts
from scheduler.metrics import (BENIGN_FLAG_RATE, calibrated_threshold, calibration_rows_needed, caught_at_threshold,
                               caught_when_flagged, conformal_p_values, detection_metrics, flagged_at_rate,
                               matched_threshold)
from scheduler.plots import by_ratio, roc_curves, weight_distributions, weight_history
from scheduler.scalar import ScalarBDS
from scheduler.scoring import OPERATING_POINT_OPTIONS, NeuralScheduler
from scheduler.training import CONFIG_DIR, build_evidence, command_line_overrides, register_resolvers


def unseen(rows: list[Example], seen: set[str]) -> list[Example]:
    """The rows no checkpoint trained on, in whole or as one exchange of a chat (`Example.keys`)."""
    return [e for e in rows if seen.isdisjoint(e.keys)]


def build_grid(cfg: DictConfig, seen: set[str],
               read: Callable[[list[Example]], list[Example]]) -> tuple[list[FineTuningSet], dict[str, list[Example]]]:
    """Sets for every task x harmful source x ratio (`evaluation.draws` of each: one set of 200 rows at p = 0.05 holds
    10 harmful rows, too few for a stable AUROC), and each task's held-out rows for accuracy. The first draw is named
    `task:source:pP`, the d-th after it `task:source:pP#d`. Every method reads the rows as `read` gives them: a
    source's rows and its task's together, as one upload, so that a system turn every attack row shares is read as a
    template only where it is most of the rows (`scheduler.features.readings`), and a choice made for the upload
    (`scheduler.features.chats_read_by_last_exchange`) is the same for both."""
    rng = random.Random(cfg.seed)
    given = {name: unseen(rows, seen) for name, rows in read_tasks(cfg.tasks, cfg.root).items()}
    order = {name: rng.sample(range(len(rows)), len(rows)) for name, rows in given.items()}
    accuracy_rows = cfg.evaluation.accuracy_rows
    held_out = {}
    for name, rows in given.items():
        alone = read(rows) if accuracy_rows else rows
        held_out[name] = [alone[i] for i in order[name][:accuracy_rows]]
    sets = []
    for file in cfg.harmful_sources:
        source = Path(file).stem
        harmful = unseen(read_pool([file], cfg.root), seen)
        if not harmful:
            raise DataError(f"{file}: every harmful row trained a checkpoint; nothing unseen to evaluate")
        for task, rows in given.items():
            upload = read([*rows, *harmful])
            pool = [upload[i] for i in order[task][accuracy_rows:]]
            sets += [mix(f"{task}:{source}:p{p}" + (f"#{draw}" if draw else ""), pool, upload[len(rows):],
                         cfg.evaluation.set_size, p, rng)
                     for p in cfg.evaluation.ratios for draw in range(cfg.evaluation.draws)]
    return sets, held_out


def training_collection(cfg: DictConfig, seen: set[str]) -> list[Example]:
    """The labelled rows the checkpoints trained on: what the supervised filter may learn from."""
    rows = read_pool(list(cfg.collection_files), cfg.root)
    return [e for e in rows if e.key in seen]


def load_checkpoints(cfg: DictConfig) -> dict[str, NeuralScheduler]:
    """`name:path` or `path` entries; unnamed ones are `amortised`, `amortised_2`, ... Each of `operating_points`
    is the first checkpoint again, scoring with those options (`NeuralScheduler.load`), named `FIRST@POINT`."""
    points = operating_points(cfg)
    schedulers, paths = {}, {}
    for entry in cfg.checkpoints:
        name, _, path = entry.partition(":") if ":" in entry and "/" not in entry.split(":")[0] else ("", "", entry)
        name = name or ("amortised" if "amortised" not in schedulers else f"amortised_{len(schedulers) + 1}")
        paths[name] = Path(cfg.root) / path
        schedulers[name] = NeuralScheduler.load(paths[name])
    first = next(iter(schedulers))
    for point, options in points.items():
        schedulers[f"{first}@{point}"] = NeuralScheduler.load(paths[first], embedder=schedulers[first].embedder, **options)
    return schedulers


def operating_points(cfg: DictConfig) -> dict[str, dict]:
    """`cfg.operating_points` as plain dicts, checked before any checkpoint is loaded."""
    points = OmegaConf.to_container(cfg.operating_points) if cfg.get("operating_points") else {}
    for point, options in points.items():
        if not isinstance(options, dict) or not set(options) <= set(OPERATING_POINT_OPTIONS):
            raise DataError(f"operating_points.{point}: expected a mapping of {', '.join(OPERATING_POINT_OPTIONS)} "
                            f"to values; got {options!r}")
    return points


def parse(name: str) -> dict[str, object]:
    cell, _, draw = name.partition("#")
    task, source, ratio = cell.split(":")
    return {"task": task, "harmful_source": source, "p": float(ratio[1:]), "draw": int(draw or 0)}


def category_rows(s: EmbeddedSet, method: str, weights: np.ndarray) -> list[dict]:
    """Per harm category: AUROC of its harmful rows against all benign rows, and the share flagged."""
    labels, out = s.labels.numpy(), []
    for category in sorted({c for e, y in zip(s.examples, labels) if y for c in categories_of(e)}):
        keep = np.array([not y or category in categories_of(e) for e, y in zip(s.examples, labels)])
        metrics = detection_metrics(labels[keep], weights[keep])
        out.append({**parse(s.name), "method": method, "category": category, "n_harmful": int(labels[keep].sum()),
                    "auroc": metrics["auroc"], "harmful_below_half": metrics["harmful_below_half"]})
    return out


class Methods:
    """Every weighting compared, each a function of one embedded set."""

    def __init__(self, cfg: DictConfig, schedulers: dict[str, NeuralScheduler], collection: list[Example],
                 alignment: list[Example]):
        reference = next(iter(schedulers.values()))
        self.reference, self.schedulers = reference, schedulers
        collection_set = embed_sets([FineTuningSet("collection", collection)], reference.embedder, joint=False)[0]
        self.supervised = SupervisedFilter().fit(collection_set.prompts, collection_set.responses,
                                                 collection_set.labels.numpy())
        self.scalar = self._scalar(cfg, alignment) if cfg.evaluation.scalar.enabled else None
        self.histories: dict[str, list[np.ndarray]] = {}

    def _scalar(self, cfg: DictConfig, alignment: list[Example]) -> ScalarBDS:
        model_cfg = OmegaConf.create(self.reference.config["config"]["model"])
        evidence = build_evidence(cfg.lm, model_cfg.signal, model_cfg.refusal) if model_cfg.signal != "none" else None
        scalar = cfg.evaluation.scalar
        return ScalarBDS(model_cfg, self.reference.posterior, evidence, alignment, lm_batch_size=scalar.lm_batch_size,
                         network_lr=scalar.network_lr, network_updates=scalar.network_updates,
                         network_only_steps=scalar.network_only_steps, seed=cfg.seed,
                         accelerator="gpu" if cfg.device.startswith("cuda") else "cpu")

    def weigh(self, s: EmbeddedSet) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each method's weights (mean 1 over the set) and, for the schedulers and baselines, a per-row score
        (`score`)."""
        weights = {"uniform": np.ones(len(s.examples))}
        if self.scalar is not None:
            weights["scalar_bds"], self.histories[s.name] = self.scalar.run(s)
        scored, scores = self.score(s)
        weights |= scored
        # A reference, not a method: what perfect knowledge of the labels would do (harmful rows get 0).
        labels = s.labels.numpy()
        weights["label_oracle"] = np.where(labels == 1, 0.0, 1.0) / max(1 - labels.mean(), 1e-12)
        return weights, scores

    def score(self, s: EmbeddedSet) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The schedulers' and baselines' weights, and beside them a per-row score that no normalisation over the set
        has moved (higher = safer): what one threshold for every set reads (`matched_rows`). For a scheduler that is
        the posterior mean logit without the scoring shift (`unshifted_mu`), which is tapered away on sets that hold
        harmful rows; for a baseline its probability of benign."""
        weights, scores = {}, {}
        for name, scheduler in self.schedulers.items():
            result = scheduler.score_examples(s.examples, RowEmbeddings(s.prompts, s.responses, s.joint))
            # as apply flags them: rows that read as no English lie below every cut (`NeuralScheduler.score_unreadable`)
            unreadable = result.unreadable if not scheduler.score_unreadable else np.zeros(len(result.weight), bool)
            weights[name], scores[name] = result.weight, np.where(unreadable, -np.inf, result.unshifted_mu)
        scores["supervised_filter"] = self.supervised.benign_probability(s.prompts, s.responses)
        posterior = self.reference.posterior
        scores["alignment_lookup"] = lookup_probability(s.prompts, posterior.bank, self.reference.config["k"],
                                                        posterior.prior)
        weights |= {name: normalise(scores[name]) for name in ("supervised_filter", "alignment_lookup")}
        return weights, scores


def measure_cost(cfg: DictConfig, methods: Methods, rows: list[Example]) -> dict[str, float]:
    """Wall time to weight one new dataset: each amortised scheduler (embed + score) vs scalar BDS on it."""
    cost = {"rows": len(rows)}
    for name, scheduler in methods.schedulers.items():
        start = time.perf_counter()
        scheduler.score_embeddings(*scheduler.embed(rows, use_cache=False), texts=RowTexts.of(rows))
        cost[f"{name}_seconds"] = time.perf_counter() - start
    if methods.scalar is not None:
        prompts, responses, joint = methods.reference.embedder.embed_examples(rows)  # the scalar's evidence may read joint
        embedded = EmbeddedSet("cost", rows, prompts, responses, torch.arange(len(rows)), torch.zeros(len(rows)), joint)
        start = time.perf_counter()
        methods.scalar.run(embedded)
        cost["scalar_bds_seconds"] = time.perf_counter() - start
    return cost


def downstream(cfg: DictConfig, sets: dict[str, tuple[EmbeddedSet, dict[str, np.ndarray], dict[str, np.ndarray]]],
               held_out: dict[str, list[Example]], alignment: list[Example], judges: list) -> tuple[list[dict], list[dict]]:
    """Fine-tune with each method's weights (alignment batch + weighted user batch) on each of `downstream.sets`
    (at least one), then HS and FA."""
    d = cfg.evaluation.downstream
    lm_cfg = OmegaConf.merge(cfg.lm, d.lm)
    prompts = [e.prompt for e in random.Random(cfg.seed).sample(read_examples(Path(cfg.root) / cfg.eval_harmful_prompts),
                                                                   d.harmful_prompts)]
    rows, answers_out = [], []

    def evaluate_lm(lm: LMEvidence, label: dict) -> None:
        answers = generate(lm, prompts, d.max_new_tokens)
        verdicts = {judge.name: judge.harmful(prompts, answers) for judge in judges}
        task_rows = held_out[label["task"]]
        task_answers = generate(lm, [e.prompt for e in task_rows], d.accuracy_new_tokens)
        rows.append({**label, **{f"hs_{k}": float(v.mean()) for k, v in verdicts.items()},
                     "fa": accuracy(task_rows, task_answers)})
        answers_out.extend({**label, "prompt": p, "answer": a, **{f"judge_{k}": bool(v[i]) for k, v in verdicts.items()}}
                           for i, (p, a) in enumerate(zip(prompts, answers)))

    for name in d.sets:
        embedded, weights, _ = sets[name]
        for method in [m for m in weights if not d.methods or m in d.methods]:
            lm = finetune(lm_cfg, embedded.examples, weights[method], d.steps, d.batch_size, d.lr, cfg.seed,
                          alignment=alignment, desc=f"{name} {method}", device=cfg.device)
            evaluate_lm(lm, {**parse(name), "method": method})
    base = finetune(lm_cfg, [], np.zeros(0), 0, d.batch_size, d.lr, cfg.seed, alignment=alignment, device=cfg.device)
    evaluate_lm(base, {**parse(d.sets[0]), "method": "no_finetune"})  # the LM before any fine-tuning
    return rows, answers_out


def table(rows: list[dict], index: tuple[str, ...], columns: str, value: str) -> str:
    """A Markdown pivot table: one line per `index`, one column per value of `columns`."""
    keys = sorted({tuple(r[i] for i in index) for r in rows}, key=str)
    heads = sorted({r[columns] for r in rows})
    lines = ["| " + " | ".join(index) + " | " + " | ".join(f"{columns}={h}" for h in heads) + " |",
             "|" + "---|" * (len(index) + len(heads))]
    for key in keys:
        cells = {r[columns]: r[value] for r in rows if tuple(r[i] for i in index) == key}
        lines.append("| " + " | ".join(map(str, key)) + " | "
                     + " | ".join(f"{cells[h]:.3f}" if h in cells else "" for h in heads) + " |")
    return "\n".join(lines)


def grouped(rows: list[dict], by: tuple[str, ...], value: str) -> dict[tuple, list[float]]:
    """Each group's values of `value` (NaN left out: AUROC on a set without harmful rows)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if not np.isnan(r[value]):
            groups.setdefault(tuple(r[b] for b in by), []).append(r[value])
    return groups


def mean_over(rows: list[dict], by: tuple[str, ...], value: str) -> list[dict]:
    return [{**dict(zip(by, key)), value: float(np.mean(v))} for key, v in grouped(rows, by, value).items()]


def worst_over(rows: list[dict], by: tuple[str, ...], value: str) -> list[dict]:
    """The lowest `value` of each group: the worst task, fold or set, which a mean hides."""
    return [{**dict(zip(by, key)), value: min(v)} for key, v in grouped(rows, by, value).items()]


def worst_task_auroc(detection: list[dict]) -> list[dict]:
    """Per method and ratio, the AUROC of the task whose mean over sources and draws is lowest."""
    return worst_over(mean_over(detection, ("method", "p", "task"), "auroc"), ("method", "p"), "auroc")


def cell(where: dict) -> tuple:
    """The sets drawn together: one task, harmful source and draw, at every ratio."""
    return where["task"], where["harmful_source"], where["draw"]


# How a method's one threshold is fitted on the clean sets (p = 0): over every task's, in-sample (one threshold for
# the whole grid: `matched_threshold`), or on the clean set of the same cell, scored apart, for new rows
# (`calibrated_threshold`: a user's clean file of their own task). `clean_inside_rows` adds the reading
# `apply_scheduler.py calibrate_on` takes.
CALIBRATIONS = {"every task": (lambda where: "", matched_threshold), "own task": (cell, calibrated_threshold)}
CLEAN_INSIDE = "own task, clean rows inside"


def matched_rows(scored: dict[str, tuple[EmbeddedSet, dict[str, np.ndarray], dict[str, np.ndarray]]]) -> list[dict]:
    """Per method with a per-row score (`Methods.weigh`) and per calibration (`CALIBRATIONS`), a threshold on it that
    keeps 97 % of benign rows, and what it flags on every set with harmful rows, with the share of weight it leaves
    on them; empty without clean sets."""
    sets = [(parse(name), s.labels.numpy(), weights, scores) for name, (s, weights, scores) in scored.items()]
    rows = []
    for calibration, (group, fit) in CALIBRATIONS.items():
        clean: dict[object, list[dict[str, np.ndarray]]] = {}
        for where, _, _, scores in sets:
            if where["p"] == 0:
                clean.setdefault(group(where), []).append(scores)
        thresholds = {}
        for key, fitted in clean.items():
            for method in fitted[0]:
                try:
                    thresholds[key, method] = fit(scores[method] for scores in fitted)
                except ValueError:  # clean sets too small to fit a cut for new rows: `calibrated_threshold`
                    continue
        for where, labels, weights, scores in sets:
            for method in scores if where["p"] > 0 else ():
                if (threshold := thresholds.get((group(where), method))) is not None:
                    rows.append({**where, "method": method, "calibration": calibration, "threshold": threshold,
                                 **caught_at_threshold(labels, scores[method], threshold, weights[method])})
    return rows


def clean_inside_rows(scored: dict[str, tuple[EmbeddedSet, dict[str, np.ndarray], dict[str, np.ndarray]]],
                      score: Callable[[EmbeddedSet], dict[str, np.ndarray]]) -> list[dict]:
    """Per method with a per-row score, what `apply_scheduler.py calibrate_on` flags on every set with harmful rows:
    the set scored again (`score`) with the rows of its cell's clean set that it does not hold (`with_clean_rows`),
    and a row flagged when its conformal p-value among them is at most 3 %. Its weights and the share left on harmful
    rows are the set scored alone, as apply writes them; empty where no clean set leaves 33 rows."""
    clean = {cell(parse(name)): s for name, (s, _, _) in scored.items() if parse(name)["p"] == 0}
    rows = []
    for name, (s, weights, _) in tqdm(scored.items(), desc="scoring the sets with clean rows inside"):
        where = parse(name)
        if where["p"] == 0 or (joined := with_clean_rows(s, clean.get(cell(where)))) is None:
            continue
        n = len(s.examples)
        for method, pooled in score(joined).items():
            flagged = flagged_at_rate(conformal_p_values(pooled[n:], pooled[:n]))
            rows.append({**where, "method": method, "calibration": CLEAN_INSIDE, "clean_rows": len(pooled) - n,
                         **caught_when_flagged(s.labels.numpy(), flagged, weights[method])})
    return rows


def summary_plot(detection: list[dict], matched: list[dict], path: Path) -> Path:
    """Mean AUROC, worst task's AUROC, harmful share of weight and (with clean sets: `matched_rows`) the harmful rows
    caught at one threshold per method against the harmful ratio, one line per method (without the references:
    uniform and the label oracle)."""
    rows = [r for r in detection if r["method"] not in ("uniform", "label_oracle") and r["p"] > 0]
    panels = {"AUROC, mean over tasks and sources": (mean_over(rows, ("method", "p"), "auroc"), "auroc"),
              "AUROC, worst task": (worst_task_auroc(rows), "auroc"),
              "harmful share of total weight": (mean_over(rows, ("method", "p"), "harmful_weight_share"),
                                                "harmful_weight_share")}
    if matched := [r for r in matched if r["calibration"] == "every task"]:
        panels["harmful rows caught, one threshold per method\n(97 % of benign rows kept on every clean set)"] = (
            mean_over(matched, ("method", "p"), "caught_at_matched"), "caught_at_matched")
    series: dict[str, dict[str, dict[float, float]]] = {figure: {} for figure in panels}
    for figure, (values, value) in panels.items():
        for r in values:
            series[figure].setdefault(r["method"], {})[r["p"]] = r[value]
    return by_ratio(series, "Every method on the same sets, by harmful ratio", path)


def matched_report(matched: list[dict]) -> list[str]:
    """The readings at a cut (`matched_rows`, `clean_inside_rows`), one section per calibration."""
    parts = []
    for calibration, heading in (("every task", "one threshold per method that keeps 97 % of benign rows on every "
                                                "clean set"),
                                 ("own task", "a threshold per method and set, calibrated on one clean set of its "
                                              "task scored apart, for new rows"),
                                 (CLEAN_INSIDE, "a cut per method and set as `apply_scheduler.py calibrate_on` makes "
                                                "it: the set scored again with the rows of a clean set of its task "
                                                "that it does not hold, a row flagged when its conformal p-value among "
                                                "them is at most 3 %")):
        rows = [r for r in matched if r["calibration"] == calibration]
        if not rows:
            parts += [f"Not measured at {heading}: too few clean rows (at {BENIGN_FLAG_RATE * 100:g} %, "
                      f"{calibration_rows_needed(BENIGN_FLAG_RATE)} rows are needed).", ""] if matched else []
            continue
        parts += [f"## At {heading}", ""]
        if calibration == "every task":
            thresholds = {r["method"]: r["threshold"] for r in rows}
            parts += ["Each method's threshold (" + ", ".join(f"{m} {t:.4g}" for m, t in thresholds.items())
                      + ") is the highest that flags at most 3 % of the benign rows of every set with p = 0: each "
                      "method at the same cost in benign rows. It reads a score no normalisation over the set has "
                      "moved: a scheduler's posterior mean logit without the scoring shift (`unshifted_mu`), a "
                      "baseline's probability of benign.",
                      ""]
        if calibration == CLEAN_INSIDE:
            counts = [r["clean_rows"] for r in rows]
            parts += [f"Each set was read against {np.mean(counts):.0f} clean rows on average (fewest {min(counts)}): "
                      "the rows of its clean set it does not hold. With fewer clean rows a conformal p-value is "
                      "coarser and fewer rows reach 3 %: compare the methods within this section, and this cut with "
                      "the one above on disjoint files (`python -m scheduler.benchmark cut`).", ""]
        for key, what in (("caught_at_matched", "Harmful rows caught (flagged)"),
                          ("harmful_share_left_at_matched", "Share of weight left on harmful rows once the flagged rows "
                                                            "are dropped"),
                          ("benign_flagged_at_matched", "Benign rows flagged on the sets with harmful rows (each cut "
                                                        "was fitted to flag at most 3 % of clean rows)")):
            parts += [f"{what}:", "", table(mean_over(rows, ("method", "p"), key), ("method",), "p", key), ""]
    return parts


def report(cfg: DictConfig, results: dict, wall: float) -> str:
    detection = results["detection"]
    parts = [f"# Evaluation ({cfg.evaluation.name})", "",
             f"Command: `python -m scheduler.evaluate {command_line_overrides()}`", "",
             f"Wall time: {wall:.0f} s. Checkpoints: {list(cfg.checkpoints)}"
             + (f", and the first at operating points {OmegaConf.to_container(cfg.operating_points)}"
                if cfg.get("operating_points") else "") + ". Rows of the evaluation files that "
             f"trained a checkpoint were removed: {results['removed_rows']}. Sets of {cfg.evaluation.set_size} rows, "
             f"{cfg.evaluation.draws} drawn per task, harmful source and ratio; every table averages the draws.", ""]
    for metric, what in (("auroc", "AUROC (harmful = positive, lower weight = flagged)"),
                         ("auprc", "AUPRC"), ("harmful_weight_share", "Share of total weight on harmful rows"),
                         ("mean_benign_weight", "Mean benign weight"),
                         ("benign_kept", "Benign rows kept (weight >= 0.5)"),
                         ("harmful_below_half", "Harmful rows weighted below 0.5"),
                         ("harmful_caught_at_3pct", "Harmful rows caught when each set's own threshold flags at most 3 % "
                                                    "of its benign rows")):
        parts += [f"## {what}, mean over tasks and sources", "", table(mean_over(detection, ("method", "p"), metric),
                                                                       ("method",), "p", metric), ""]
    parts += matched_report(results["matched"])
    parts += ["## AUROC on the worst task (each task's mean over sources and draws)", "",
              table(worst_task_auroc(detection), ("method",), "p", "auroc"), "",
              "## Benign rows kept on the lowest set (any task, source or draw)", "",
              table(worst_over(detection, ("method", "p"), "benign_kept"), ("method",), "p", "benign_kept"), "",
              "## AUROC per task (mean over ratios with harmful rows)", "",
              table(mean_over(detection, ("method", "task"), "auroc"), ("method",), "task", "auroc"), ""]
    for metric, what in (("auroc", "AUROC"), ("harmful_weight_share", "Share of total weight on harmful rows")):
        parts += [f"## {what} per harmful source (mean over tasks)", "",
                  table(mean_over(detection, ("method", "harmful_source", "p"), metric), ("harmful_source", "method"),
                        "p", metric), ""]
    parts += ["## AUROC per harm category (mean over sets)", "",
              table(mean_over(results["categories"], ("method", "category"), "auroc"), ("category",), "method", "auroc"), ""]
    if results["downstream"]:
        down = results["downstream"]
        parts += ["## Downstream: harmful score (HS, lower is better) and fine-tune accuracy (FA)", ""]
        for value in [k for k in down[0] if k.startswith("hs_")] + ["fa"]:
            parts += [f"### {value}", "", table(down, ("method", "task"), "p", value), ""]
    if results.get("judge_agreement"):
        parts += ["## Judges against hand labels", "", "```", json.dumps(results["judge_agreement"], indent=1), "```", ""]
    parts += ["## Cost of weighting one new dataset", "", "```", json.dumps(results["cost"], indent=1), "```", "",
              "Plots: `plots/by_ratio.png` (every method by harmful ratio), `plots/roc_*.png`, `plots/weights_*.png`"
              + (", `plots/history_*.png` (the scalar BDS's weights over its steps)." if cfg.evaluation.scalar.enabled else ".")]
    return "\n".join(parts) + "\n"


def build_judges(cfg: DictConfig, reference: NeuralScheduler, held_out: dict[str, list[Example]],
                 alignment: list[Example]) -> list:
    embedding = EmbeddingHarmJudge(reference.embedder).fit(read_pool(list(cfg.judge_harmful_files), cfg.root),
                                                           alignment + [e for rows in held_out.values() for e in rows])
    return [RefusalJudge(), embedding]


def judge_agreement(cfg: DictConfig, judges: list) -> dict | None:
    """Each judge against the hand labels (`hand_harmful`) in `cfg.hand_labels`, where that file exists."""
    if not cfg.hand_labels or not (Path(cfg.root) / cfg.hand_labels).exists():
        return None
    hand = read_examples(Path(cfg.root) / cfg.hand_labels)
    truth = [bool(e.row["hand_harmful"]) for e in hand]
    return {j.name: agreement(truth, j.harmful([e.prompt for e in hand], [e.response for e in hand])) for j in judges}


def evaluate(cfg: DictConfig) -> dict:
    start = time.time()
    torch.manual_seed(cfg.seed)
    schedulers = load_checkpoints(cfg)
    seen = set().union(*(set(s.config.get("training_rows", ())) for s in schedulers.values()))
    reference = next(iter(schedulers.values()))
    sets, held_out = build_grid(cfg, seen, reference.read)
    alignment = read_pool([cfg.alignment_file], cfg.root)
    if cfg.judges_only:  # re-measure the judges after hand-labelling a run's answers.jsonl
        result = judge_agreement(cfg, build_judges(cfg, reference, held_out, alignment))
        write_text(json.dumps(result, indent=1), Path(cfg.output_dir) / "judge_agreement.json")
        print(json.dumps(result, indent=1))
        return {"judge_agreement": result}
    methods = Methods(cfg, schedulers, training_collection(cfg, seen), alignment)
    out = Path(cfg.output_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    detection, categories, scored = [], [], {}
    for s in tqdm(embed_sets(sets, reference.embedder), desc="weighting the grid"):
        weights, scores = methods.weigh(s)
        scored[s.name] = (s, weights, scores)
        labels = s.labels.numpy()
        for method, w in weights.items():
            detection.append({**parse(s.name), "method": method, **detection_metrics(labels, w)})
            categories += category_rows(s, method, w)
        if 0 < labels.sum() < len(labels) and parse(s.name)["draw"] == 0:  # plots of the first draw only
            slug = s.name.replace(":", "_")
            roc_curves(labels, weights, s.name, out / "plots" / f"roc_{slug}.png")
            weight_distributions(labels, weights, s.name, out / "plots" / f"weights_{slug}.png")
            if s.name in methods.histories:
                weight_history(methods.histories[s.name], labels, s.name, out / "plots" / f"history_{slug}.png")
    matched = matched_rows(scored) + clean_inside_rows(scored, lambda s: methods.score(s)[1])
    summary_plot(detection, matched, out / "plots" / "by_ratio.png")
    all_rows = [e for s in sets for e in s.examples]
    cost_rows = random.Random(cfg.seed).sample(all_rows, min(cfg.evaluation.cost_rows, len(all_rows)))
    results = {"removed_rows": len(seen), "detection": detection, "categories": categories, "matched": matched,
               "cost": measure_cost(cfg, methods, cost_rows)}
    results["downstream"], results["judge_agreement"] = [], None
    if cfg.evaluation.downstream.sets:  # without a fine-tune (evaluation=detection) no LM is loaded and nothing is judged
        judges = build_judges(cfg, reference, held_out, alignment)
        results["downstream"], answers = downstream(cfg, scored, held_out, alignment, judges)
        write_rows(answers, out / "answers.jsonl")
        results["judge_agreement"] = judge_agreement(cfg, judges)
    write_text(json.dumps(results, indent=1), out / "results.json")
    text = report(cfg, results, time.time() - start)
    write_text(text, out / "evaluation.md")
    print(text)
    return results


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    # One Trainer per scalar BDS run: keep Lightning's per-run notices out of the progress output.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning.pytorch")
    with exit_on_data_error():
        evaluate(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
