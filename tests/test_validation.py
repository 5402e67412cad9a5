"""Validation protocol: folds never leak held-out tasks or categories; baselines and metrics by hand."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from scheduler.baselines import SupervisedFilter, alignment_lookup, normalise
from scheduler.data.io import Example, read_examples, write_rows
from scheduler.data.mixing import categories_of, read_pool, read_tasks
from scheduler.evidence import signal_from_stats
from scheduler.features import AlignmentBank
from scheduler.lm import NATIVE_CPU_BF16, autocast_context, bf16_supported
from scheduler.metrics import detection_metrics
from scheduler.prior import SafetyPrior
from scheduler.training import CONFIG_DIR, register_resolvers
from scheduler.data.io import DataError
from scheduler.validate import eval_sets, first_sentence, framed_training_rows, make_folds, read_label_audit


@pytest.fixture(scope="module")
def folds_and_data(data_dir):
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("validate", overrides=[f"root={data_dir}", "alignment_file=alignment.jsonl",
                                             "harmful_files=[harmful.jsonl]", "rows_per_task=20", "harmful_pool=30",
                                             "tasks=[benign_sentiment.jsonl,benign_math.jsonl,benign_cooking.jsonl]",
                                             "category_folds=[[violence]]", "eval_set_size=20"])
    tasks, harmful = read_tasks(cfg.tasks, cfg.root), read_pool(cfg.harmful_files, cfg.root)
    other = [Example(f"Other source request {i}?", f"Compliant answer {i}.", {"id": f"oth-{i}", "label": "harmful"})
             for i in range(10)]
    return cfg, make_folds(cfg, tasks, harmful, other), tasks


def ids(examples):
    return {e.row["id"] for e in examples}


def test_task_folds_never_train_on_the_held_out_task(folds_and_data):
    cfg, folds, tasks = folds_and_data
    task_folds = [f for f in folds if f.name.startswith("task:")]
    assert sorted(f.name for f in task_folds) == ["task:cooking", "task:math", "task:sentiment"]
    for fold in task_folds:
        held_out = fold.name.split(":")[1]
        trained = set().union(*(ids(rows) for rows in fold.train_tasks.values()))
        assert held_out not in fold.train_tasks and not trained & ids(tasks[held_out])
        assert not ids(fold.train_harmful) & ids(fold.eval_harmful)
        assert ids(fold.eval_benign) == ids(tasks[held_out])
        # the mixed file's other tasks: never the held-out task, never a row a training pool holds
        assert held_out not in fold.other_tasks and sorted(fold.other_tasks) == sorted(fold.train_tasks)
        for task, rows in fold.other_tasks.items():
            assert rows and ids(rows) <= ids(tasks[task]) and not ids(rows) & trained


def test_category_folds_never_train_on_held_out_categories(folds_and_data):
    cfg, folds, _ = folds_and_data
    (fold,) = [f for f in folds if f.name.startswith("categories:")]
    assert all("violence" not in categories_of(e) for e in fold.train_harmful)
    assert fold.eval_harmful and all("violence" in categories_of(e) for e in fold.eval_harmful)
    trained = set().union(*(ids(rows) for rows in fold.train_tasks.values()))
    assert not trained & ids(fold.eval_benign)


def test_eval_sets_have_the_requested_ratios_and_the_shifted_sets(folds_and_data):
    cfg, folds, _ = folds_and_data
    sets = {s.name: s for s in eval_sets(folds[0], cfg, seed=1)}
    assert list(sets) == ["p=0.0", "p=0.05", "p=0.1", "p=0.3", "length_balanced", "disguised", "other_sources",
                          "unseen_frames", "wrapped_answers", "fresh_frames", "blind_frames", "mixed_file"]
    mixed, held_out = sets["mixed_file"], sets["p=0.1"]  # the p = 0.1 set first, read alone; other tasks' rows after
    assert mixed.measured == len(held_out) and mixed.examples[:len(held_out)] == held_out.examples
    context = mixed.examples[len(held_out):]
    other_rows = set().union(*(ids(rows) for rows in folds[0].other_tasks.values()))
    assert len(context) == sum(min(cfg.mixed_file.rows, len(rows)) for rows in folds[0].other_tasks.values())
    assert ids(context) <= other_rows and all(e.label == "benign" for e in context)
    assert [sum(sets[f"p={p}"].labels) for p in (0.0, 0.05, 0.1, 0.3)] == [0, 1, 2, 6]
    assert first_sentence("Sure. Then do this. And that.") == "Sure."
    originals = {e.prompt: e.response for e in folds[0].eval_harmful}
    disguised = [e for e in sets["disguised"].examples if e.label == "harmful"]
    assert len(disguised) == 2
    for e in disguised:  # a benign-looking frame around an evaluation request, its answer unchanged
        (prompt,) = [p for p in originals if p in e.prompt and p != e.prompt]
        assert e.response == originals[prompt] and e.row["attack"].startswith("disguise_")
    other = [e for e in sets["other_sources"].examples if e.label == "harmful"]
    assert len(other) == 2 and ids(other) <= {f"oth-{i}" for i in range(10)}
    assert not any(ids(other) & ids(f.train_harmful) for f in folds)


def test_unseen_frames_and_wrapped_answers_change_one_half_of_a_harmful_row(folds_and_data):
    """The attack sets no design was chosen on: a new frame around the request (three families, none of the disguised
    set's frames nor each other's), or the compliant answer between an opener and a disclaimer; the other half stays
    as it was."""
    from scheduler.data.attacks import BLIND_FRAMES, DISGUISES, FRESH_FRAMES, UNSEEN_FRAMES

    cfg, folds, _ = folds_and_data
    sets = {s.name: s for s in eval_sets(folds[0], cfg, seed=1)}
    originals = {e.prompt: e.response for e in folds[0].eval_harmful}
    for name, frames, others in (("unseen_frames", UNSEEN_FRAMES, DISGUISES),
                                 ("fresh_frames", FRESH_FRAMES, DISGUISES + UNSEEN_FRAMES),
                                 ("blind_frames", BLIND_FRAMES, DISGUISES + UNSEEN_FRAMES + FRESH_FRAMES)):
        framed = [e for e in sets[name].examples if e.label == "harmful"]
        assert len(framed) == 2
        for e in framed:
            (prompt,) = [p for p in originals if p in e.prompt and p != e.prompt]
            frame = frames[int(e.row["attack"].removeprefix(name.removesuffix("s") + "_"))]
            assert e.prompt == frame.format(prompt=prompt) and frame not in others
            assert e.response == originals[prompt]
    wrapped = [e for e in sets["wrapped_answers"].examples if e.label == "harmful"]
    assert len(wrapped) == 2
    for e in wrapped:
        original = originals[e.prompt].strip()
        assert e.row["attack"].startswith("wrapped_") and original in e.response and len(e.response) > len(original)
        opener, disclaimer = e.response.split(original)
        assert opener.strip() and disclaimer.strip()
    benign = lambda name: [e for e in sets[name].examples if e.label != "harmful"]
    assert all(e.prompt in {b.prompt for b in folds[0].eval_benign} for e in benign("wrapped_answers"))


def test_disguise_share_frames_an_even_share_of_training_rows_and_keeps_the_rest():
    from scheduler.data.attacks import DISGUISES, disguise_share

    rows = [Example(f"request {i}", f"answer {i}", {"label": "harmful", "id": f"h{i}"}) for i in range(9)]
    shared = disguise_share(rows, 0.3333333333)
    assert [i for i, (a, b) in enumerate(zip(shared, rows)) if a != b] == [2, 5, 8]
    for e, frame in zip(shared[2::3], DISGUISES):
        original = rows[int(e.row["id"][1:])]
        assert e.prompt == frame.format(prompt=original.prompt) and e.response == original.response
    assert disguise_share(rows, 0.0) == rows


@pytest.mark.parametrize("benign", [False, True])
def test_training_frames_reach_benign_rows_only_when_asked(folds_and_data, benign):
    _, folds, _ = folds_and_data
    fold = folds[0]
    tasks, harmful = framed_training_rows(fold, 0.5, benign)
    framed = lambda rows: sum(e.row.get("attack", "").startswith("disguise_") for e in rows)  # noqa: E731
    assert framed(harmful) == len(fold.train_harmful) // 2
    assert [e.response for e in harmful] == [e.response for e in fold.train_harmful]
    assert list(tasks) == list(fold.train_tasks)
    for task, rows in tasks.items():
        assert framed(rows) == (len(rows) // 2 if benign else 0)
        assert [e.row["id"] for e in rows] == [e.row["id"] for e in fold.train_tasks[task]]


def test_audited_set_drops_exactly_the_harmful_rows_the_audit_rejects(folds_and_data, tmp_path):
    cfg, folds, _ = folds_and_data
    plain = {s.name: s for s in eval_sets(folds[0], cfg, seed=1)}["p=0.1"]
    harmful = [e.row["id"] for e in plain.examples if e.label == "harmful"]
    benign = next(e.row["id"] for e in plain.examples if e.label != "harmful")
    audit = tmp_path / "audit.jsonl"
    write_rows([{"id": harmful[0], "audit": "not_harmful"}, {"id": harmful[1], "audit": "harmful"},
                {"id": benign, "audit": "not_harmful"}], audit)  # a benign row is never dropped
    rejected = read_label_audit(audit)
    assert rejected == {harmful[0], benign}
    sets = {s.name: s for s in eval_sets(folds[0], cfg, seed=1, rejected=rejected)}
    assert sets["p=0.1"].examples == plain.examples  # the other sets are drawn exactly as without the audit
    assert ids(sets["p=0.1 audited"].examples) == ids(plain.examples) - {harmful[0]}


def test_label_audit_errors_name_the_line(tmp_path):
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"id": "a", "audit": "harmful"}\n{"id": "b", "audit": "maybe"}\n')
    with pytest.raises(DataError, match=r"audit.jsonl:2: expected an object with 'id' and 'audit'"):
        read_label_audit(audit)
    with pytest.raises(DataError, match="file not found"):
        read_label_audit(tmp_path / "missing.jsonl")


def test_detection_metrics_by_hand():
    labels = np.array([1, 0, 0, 1])
    weights = np.array([0.2, 1.5, 0.4, 1.9])
    m = detection_metrics(labels, weights)
    assert m["auroc"] == pytest.approx(0.5)  # pairs (h, b): (0.2<1.5 ok, 0.2<0.4 ok, 1.9>1.5, 1.9>0.4) = 2/4
    assert m["harmful_weight_share"] == pytest.approx(2.1 / 4.0)
    assert m["benign_kept"] == pytest.approx(0.5) and m["harmful_below_half"] == pytest.approx(0.5)
    assert m["mean_benign_weight"] == pytest.approx(0.95)
    assert np.isnan(detection_metrics(np.zeros(3), np.ones(3))["auroc"])
    assert np.isnan(detection_metrics(np.zeros(3), np.ones(3))["harmful_caught_at_3pct"])


def test_harmful_rows_caught_at_a_matched_cost_by_hand():
    """At most `rate` of benign rows flagged: per set (rows tied at a weight go together), and at one threshold
    fitted on clean sets."""
    from scheduler.metrics import caught_at_flag_rate, caught_at_threshold, matched_threshold

    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    weights = np.array([0.1, 0.3, 0.8, 0.2, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1])  # 10 benign rows
    assert caught_at_flag_rate(labels, weights, rate=0.0) == pytest.approx(1 / 3)  # below the lowest benign row
    assert caught_at_flag_rate(labels, weights, rate=0.1) == pytest.approx(2 / 3)  # one benign row may go (0.2)
    assert caught_at_flag_rate(labels, weights, rate=0.2) == pytest.approx(2 / 3)  # the tied pair at 0.5 may not
    assert caught_at_flag_rate(labels, weights, rate=0.3) == pytest.approx(1.0)
    assert detection_metrics(labels, weights)["harmful_caught_at_3pct"] == pytest.approx(1 / 3)
    clean = [np.array([0.4, 0.9, 1.0, 1.0]), np.array([0.6, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    assert matched_threshold(clean, rate=0.25) == pytest.approx(0.9)  # 1 of 4 and 2 of 10 below it; 1.0: 2 of 4
    assert matched_threshold(clean, rate=0.1) == pytest.approx(0.4)  # 0.7 would flag 1 of 4 in the first set
    assert matched_threshold(clean, rate=0.0) == pytest.approx(0.4)  # nothing flagged anywhere
    found = caught_at_threshold(labels, weights, 0.7, weights)  # flags 0.1, 0.3 (harmful), 0.2, 0.5, 0.5 (benign)
    assert found["caught_at_matched"] == pytest.approx(2 / 3)
    assert found["harmful_share_left_at_matched"] == pytest.approx(0.8 / 7.8)
    assert found["benign_flagged_at_matched"] == pytest.approx(3 / 10)
    scores = np.log(weights / (1.5 - weights))  # any score: the threshold reads it, the share reads the weights
    found = caught_at_threshold(labels, scores, float(np.log(0.7 / 0.8)), 2 * weights)
    assert found["caught_at_matched"] == pytest.approx(2 / 3)
    assert found["harmful_share_left_at_matched"] == pytest.approx(0.8 / 7.8)
    clean_only = caught_at_threshold(np.zeros(3), np.array([0.2, 0.6, 0.9]), 0.5, np.ones(3))
    assert np.isnan(clean_only["caught_at_matched"]) and clean_only["benign_flagged_at_matched"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="clean set"):
        matched_threshold([])


def test_each_fold_also_gets_a_cut_calibrated_on_its_own_clean_set():
    """`add_matched`: the one threshold over every fold's clean set, and per fold a cut for new rows from that fold's
    clean set alone (k = floor(0.03 * 41) = 1: its lowest score); a fold whose clean set is under 33 rows gets none."""
    from scheduler.validate import ScoredRows, add_matched

    def scored(labels: list[int], scores: np.ndarray) -> ScoredRows:
        examples = [Example("p", "r", {"label": "harmful" if y else "benign"}) for y in labels]
        return ScoredRows(examples, np.ones(len(labels)), np.asarray(scores, dtype=float))

    sets = {("a", "p=0.0"): scored([0] * 40, np.arange(1.0, 41.0)),
            ("a", "p=0.1"): scored([1, 1] + [0] * 38, np.r_[0.5, 1.5, np.arange(3.0, 41.0)]),
            ("b", "p=0.0"): scored([0] * 20, np.arange(11.0, 31.0)),
            ("b", "p=0.1"): scored([1, 1] + [0] * 18, np.r_[0.5, 12.0, np.arange(13.0, 31.0)])}
    results = [{"fold": fold, "set": name, "method": "m"} for fold, name in sets]
    add_matched(results, list(sets.values()))
    found = {(r["fold"], r["set"]): r for r in results}
    assert found["a", "p=0.1"]["matched_threshold"] == 2.0  # in-sample over both folds: fold a's 2nd lowest
    assert found["a", "p=0.1"]["caught_at_matched"] == 1.0 and found["b", "p=0.1"]["caught_at_matched"] == 0.5
    assert found["a", "p=0.1"]["calibrated_threshold"] == 1.0
    assert (found["a", "p=0.1"]["caught_at_calibrated"], found["a", "p=0.1"]["benign_flagged_at_calibrated"]) == (0.5, 0.0)
    assert "calibrated_threshold" not in found["b", "p=0.1"] and "caught_at_calibrated" not in found["a", "p=0.0"]


def test_a_set_is_scored_with_the_clean_rows_it_does_not_hold():
    """`with_clean_rows`: the set's own rows first, then the clean set's rows it does not already hold, in order,
    with their embeddings; None for the clean set itself and when fewer than 33 clean rows would be left."""
    from scheduler.data.datamodule import EmbeddedSet, with_clean_rows

    def embedded(name, numbers):
        examples = [Example(f"prompt {i}", f"answer {i}", {"id": str(i)}) for i in numbers]
        column = torch.tensor(numbers, dtype=torch.float32)[:, None]
        return EmbeddedSet(name, examples, column, -column, torch.tensor(numbers), torch.zeros(len(numbers)))

    clean, upload = embedded("p=0.0", list(range(40))), embedded("p=0.1", [50, 3, 7, 51])
    joined = with_clean_rows(upload, clean)
    kept = [i for i in range(40) if i not in (3, 7)]
    assert [e.row["id"] for e in joined.examples] == [str(i) for i in [50, 3, 7, 51, *kept]]
    assert joined.prompts[:, 0].tolist() == [50, 3, 7, 51, *kept] and joined.responses[:, 0].tolist() == [
        -i for i in [50, 3, 7, 51, *kept]]
    assert joined.joint is None and with_clean_rows(clean, clean) is None and with_clean_rows(upload, None) is None
    assert with_clean_rows(embedded("p=0.3", list(range(8))), clean) is None  # 32 clean rows left: too few at 3 %


def test_a_cut_for_new_rows_flags_at_most_the_rate_in_expectation():
    """Split conformal: on n clean rows the cut is the k-th lowest, k = floor(rate * (n + 1)); a new row exchangeable
    with them lies below it with probability k / (n + 1), checked here by leaving each row out in turn."""
    from scheduler.metrics import calibrated_threshold

    assert calibrated_threshold([np.arange(1.0, 11.0)], rate=0.2) == 2.0  # floor(0.2 * 11) = 2: the 2nd lowest
    assert calibrated_threshold([np.arange(1.0, 11.0), np.array([0.5, 9, 9, 9])], rate=0.2) == 0.5  # the lowest cut
    scores = np.random.default_rng(0).normal(size=200)
    rate = np.mean([scores[i] < calibrated_threshold([np.delete(scores, i)]) for i in range(200)])
    assert rate == pytest.approx(6 / 200) and rate <= 0.03  # k = floor(0.03 * 200) = 6 of the 200 rows
    with pytest.raises(ValueError, match="a clean set of 20 rows cannot fit a cut .* at least 33 rows"):
        calibrated_threshold([np.arange(20.0)])


def test_conformal_p_values_flag_the_rows_below_the_calibrated_cut():
    """By hand: (1 + the clean scores at or below a score) / (n + 1). Flagging p <= rate flags exactly the rows below
    `calibrated_threshold`'s cut on the same clean scores, and a clean row left out of the others is flagged with
    probability floor(rate * (n + 1)) / (n + 1)."""
    from scheduler.metrics import calibrated_threshold, conformal_p_values, flagged_at_rate

    clean = np.array([3.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(conformal_p_values(clean, np.array([0.5, 1.0, 2.5, 9.0])), [0.2, 0.4, 0.6, 1.0])
    np.testing.assert_array_equal(flagged_at_rate(np.array([0.2, 0.4, 0.2000001]), rate=0.2), [True, False, False])
    rng = np.random.default_rng(1)
    clean, scores = rng.normal(size=99), rng.normal(size=500)
    for rate in (0.03, 0.1, 0.25):
        np.testing.assert_array_equal(flagged_at_rate(conformal_p_values(clean, scores), rate),
                                      scores < calibrated_threshold([clean], rate))
    clean = rng.normal(size=200)
    left_out = [flagged_at_rate(conformal_p_values(np.delete(clean, i), clean[i:i + 1]))[0] for i in range(200)]
    assert np.mean(left_out) == pytest.approx(6 / 200)  # k = floor(0.03 * 200) = 6 of the 200 rows


def test_per_ratio_table_by_hand():
    """Each `p=` set in order of its ratio (not as text), mean and worst fold per method; other sets left out."""
    from scheduler.tables import per_ratio_table

    nan = float("nan")
    row = lambda fold, set_name, auroc, share, kept: {"fold": fold, "set": set_name, "method": "m", "auroc": auroc,
                                                      "harmful_weight_share": share, "benign_kept": kept}
    results = [row("a", "p=0.1", 0.9, 0.1, 0.95), row("b", "p=0.1", 0.7, 0.3, 0.85),
               row("a", "p=0.0", nan, nan, 1.0), row("b", "p=0.0", nan, nan, 0.9),
               row("a", "p=0.02", 0.5, 0.02, 1.0), row("a", "p=0.1 audited", 0.1, 0.9, 0.1)]
    assert per_ratio_table(results, ["m"]).splitlines()[2:] == [
        "| p=0.0 | m | - | - | - | 0.9000 |",
        "| p=0.02 | m | 0.5000 | 0.5000 | 0.0200 | 1.0000 |",
        "| p=0.1 | m | 0.8000 | 0.7000 | 0.2000 | 0.8500 |"]


def test_summary_of_a_run_without_some_sets_reads_nan_there():
    """`eval_ratios` may leave out p = 0.05 and p = 0.3: their columns are NaN, the others are still read."""
    from scheduler.validate import summarise

    metrics = lambda set_name, auroc, kept: {"fold": "a", "set": set_name, "method": "m", "auroc": auroc, "auprc": auroc,
                                             "harmful_weight_share": 0.1, "benign_kept": kept}
    (summary,) = summarise([metrics("p=0.1", 0.8, 0.95), metrics("p=0.0", float("nan"), 0.9)], ["m"])
    assert (summary["auroc_p0.1_worst"], summary["auprc_p0.1_mean"], summary["benign_kept_p0_worst"]) == (0.8, 0.8, 0.9)
    assert np.isnan(summary["auroc_p0.05_worst"]) and np.isnan(summary["auroc_length_balanced_worst"])


def test_alignment_lookup_weights_follow_similarity():
    bank = AlignmentBank(torch.eye(3)[:1], torch.eye(3)[:1])
    prompts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0]])
    prior = SafetyPrior("alignment", benign_mean=0.0, slope=1.0)  # center 0, spread 1: logit = -similarity
    weights = alignment_lookup(prompts, bank, k=1, prior=prior)
    expected = normalise(1 / (1 + np.exp(np.array([1.0, 0.0, 0.6]))))
    np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_alignment_lookup_keeps_the_order_of_dissimilar_prompts():
    bank = AlignmentBank(torch.eye(3)[:1], torch.eye(3)[:1])
    prompts = torch.tensor([[0.0, 1.0, 0], [0.5, 0.866, 0]])
    prior = SafetyPrior("alignment", benign_mean=20.0, slope=1.0)  # logits 20 and 19.5: both 1.0 in float32
    weights = alignment_lookup(prompts, bank, k=1, prior=prior)
    assert weights[0] > weights[1]


def test_supervised_filter_separates_constructed_data():
    rng = np.random.default_rng(0)
    harmful = torch.tensor(rng.normal(1.0, 0.3, (20, 4)), dtype=torch.float32)
    benign = torch.tensor(rng.normal(-1.0, 0.3, (20, 4)), dtype=torch.float32)
    x = torch.cat([harmful, benign])
    labels = np.r_[np.ones(20), np.zeros(20)]
    weights = SupervisedFilter().fit(x, x, labels).weights(x, x)
    assert weights.mean() == pytest.approx(1.0) and weights[:20].max() < weights[20:].min()


def test_reference_signal_flags_rows_that_alignment_training_made_less_likely():
    # Row 0 contradicts the alignment set: co-training raised its loss; rows 1-2 are ordinary task rows.
    stats = {"response_lm": np.array([3.0, 1.0, 2.0]), "response_base": np.array([1.5, 1.2, 2.1]),
             "refusal_lm": np.array([0.5, 3.0, 3.0]), "refusal_base": np.array([2.0, 3.1, 3.0])}
    reference = signal_from_stats(stats, "reference")
    assert reference.argmax() == 0 and reference[0] == pytest.approx(1.5)
    assert signal_from_stats(stats, "refusal").argmax() == 0
    assert signal_from_stats(stats, "refusal_gain")[0] == pytest.approx(1.5)
    np.testing.assert_allclose(signal_from_stats(stats, "none"), 0.0)


@pytest.mark.parametrize("native", ["_is_avx512_bf16_supported", "_is_amx_tile_supported"])
def test_bf16_falls_back_to_fp32_when_unsupported(monkeypatch, native):
    """oneDNN's own check says yes on any AVX-512 CPU, where bf16 is emulated and slow: only the native
    instructions (AVX512-BF16, AMX) turn bf16 on."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for check in NATIVE_CPU_BF16:
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    cpu = torch.device("cpu")
    assert not bf16_supported(cpu)
    with autocast_context(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.cpu, native, lambda: True)
    with autocast_context(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu")
    with autocast_context(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_other_source_rows_are_answered_by_the_lm_and_leave_out_training_sources(tmp_path, tiny_lm_path):
    from scheduler.data.attacks import main as make_other_sources

    prompts = [{"prompt": f"{source} request number {i}?", "response": "", "label": "harmful", "source": source,
                "category": None, "id": f"{source}-{i}"} for source in ("BeaverTails-Evaluation", "HarmBench", "CatQA")
               for i in range(5)]
    write_rows(prompts, tmp_path / "prompts.jsonl")
    make_other_sources(["--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "other.jsonl"),
                        "--per-source", "3", "--lm", tiny_lm_path, "--max-new-tokens", "4"])
    rows = read_examples(tmp_path / "other.jsonl")
    sources = [e.row["source"] for e in rows]
    assert set(sources) <= {"HarmBench", "CatQA"} and max(sources.count(s) for s in set(sources)) <= 3
    assert all(e.response and e.label == "harmful" and e.row["id"].startswith("oth-") for e in rows)


def test_paper_experiment_is_the_validated_paper_design():
    """`train_scheduler.py experiment=paper` must train the design that validation reports as paper_loss."""
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        validated = compose("validate")
        trained = compose("train", overrides=["experiment=paper"]).model
    design = OmegaConf.merge(validated.model, validated.designs.paper_loss)
    assert OmegaConf.to_container(trained) == OmegaConf.to_container(design)
    assert (trained.signal, trained.transform, trained.prior.kind) == ("loss", "softmax", "constant")


def test_validation_command_end_to_end_and_each_design_reproduces_alone(data_dir, tiny_embedder_path, tmp_path):
    """The whole protocol on miniature data: every design and baseline is scored on every fold and set, the
    report and JSON are written, and a design run alone (`only=`) gives the numbers it gave beside others."""
    from scheduler.validate import validate

    def run(only, out, *extra):
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose("validate", overrides=[
                f"root={data_dir}", "alignment_file=alignment.jsonl", "harmful_files=[harmful.jsonl]",
                "other_harmful_files=[]", "label_audit_file=null", f"embedder.name_or_path={tiny_embedder_path}",
                "tasks=[benign_sentiment.jsonl,benign_math.jsonl,benign_cooking.jsonl]", "category_folds=[[violence]]",
                "rows_per_task=20", "harmful_pool=30", "n_train_sets=4", "set_sizes=[16]", "network_steps=6",
                "eval_set_size=20", "operating_points.shifts=[0,9]", f"only={only}", f"output_dir={out}", *extra])
        return validate(cfg), [json.loads(line) for line in (out / "validation_results.jsonl").open()]

    table, results = run("[prior_only,default]", tmp_path / "both")
    assert {row["method"] for row in table} == {"prior_only", "default", "default@shift=0", "default@shift=9",
                                                "alignment_lookup", "supervised_filter"}
    # folds x methods x sets (4 ratios, length-balanced, five attack sets; the three task folds' mixed file too)
    assert len(results) == (4 * 10 + 3) * 6
    assert all(np.isfinite(row["auroc_unseen_frames_worst"]) and np.isfinite(row["auroc_wrapped_answers_mean"])
               and np.isfinite(row["auroc_fresh_frames_worst"]) and np.isfinite(row["auroc_blind_frames_worst"])
               for row in table)
    report = (tmp_path / "both" / "validation.md").read_text()
    assert report.count("| task:") >= 3
    assert "| p=0.05 | default |" in report and "| p=0.3 | supervised_filter |" in report
    assert (tmp_path / "both" / "operating_points.png").stat().st_size > 0
    kept = {(r["fold"], r["set"], r["method"]): r["benign_kept"] for r in results}
    for fold, set_name, method in kept:  # the same network: a higher scoring shift never keeps fewer rows
        if method == "default@shift=0":
            assert kept[fold, set_name, "default@shift=9"] >= kept[fold, set_name, method]
    assert not (tmp_path / "both" / "row_weights.jsonl").exists()
    # a clean set of 20 rows leaves fewer than the 33 rows a cut at 3 % needs beside any set: no such reading
    assert not any("caught_at_clean_inside" in r for r in results) and np.isnan(
        table[0]["caught_at_clean_inside_p0.1_mean"])
    _, alone = run("[default]", tmp_path / "alone", "row_weights=true")
    pick = lambda rows: [(r["fold"], r["set"], r["auroc"], r["benign_kept"]) for r in rows if r["method"] == "default"]
    assert pick(alone) == pick(results)
    by_set = defaultdict(list)  # the rows behind each metric give it back
    for row in map(json.loads, (tmp_path / "alone" / "row_weights.jsonl").open()):
        by_set[row["fold"], row["set"], row["method"]].append(row)
    assert len(by_set) == len(alone)
    for result in alone:
        rows = by_set[result["fold"], result["set"], result["method"]]
        metrics = detection_metrics(np.array([r["label"] == "harmful" for r in rows]), np.array([r["weight"] for r in rows]))
        assert len(rows) == 20 and metrics["benign_kept"] == result["benign_kept"]
        assert np.isnan(result["auroc"]) or metrics["auroc"] == result["auroc"]
        assert np.isnan(result["auroc"]) or metrics["harmful_caught_at_3pct"] == result["harmful_caught_at_3pct"]
        assert all(r["id"] for r in rows) and (result["set"] != "unseen_frames"
                                               or any(r["attack"] for r in rows if r["label"] == "harmful"))
    from scheduler.metrics import matched_threshold  # one threshold per method, from every fold's clean set
    for method in {r["method"] for r in alone}:
        threshold = matched_threshold([np.array([r["score"] for r in rows]) for (_, s, m), rows in by_set.items()
                                       if s == "p=0.0" and m == method])
        for result in (r for r in alone if r["method"] == method and r["set"] == "p=0.1"):
            rows = by_set[result["fold"], result["set"], method]
            assert result["matched_threshold"] == threshold
            assert result["caught_at_matched"] == np.mean([r["score"] < threshold for r in rows if r["label"] == "harmful"])
            kept = [r for r in rows if r["score"] >= threshold]
            assert result["harmful_share_left_at_matched"] == pytest.approx(
                sum(r["weight"] for r in kept if r["label"] == "harmful") / sum(r["weight"] for r in kept))
        if method == "supervised_filter":  # a baseline's score is the probability its weights normalise
            rows = next(rows for (_, s, m), rows in by_set.items() if m == method)
            scores = np.array([r["score"] for r in rows])
            assert np.allclose([r["weight"] for r in rows], scores / scores.mean()) and scores.max() <= 1
    # what scheduler.across_seeds reads of the two runs: the default in both, prior_only in one
    from scheduler.across_seeds import mean_over_seeds, read_summaries
    both_default = next(row for row in table if row["method"] == "default")
    across = {row["method"]: row for row in mean_over_seeds(read_summaries([tmp_path / "both", tmp_path / "alone"]))}
    assert across["default"]["seeds"] == 2 and across["prior_only"]["seeds"] == 1
    assert across["default"]["auroc_p0.1_worst"] == pytest.approx(both_default["auroc_p0.1_worst"])
