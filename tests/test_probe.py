"""The LM-signal probe (`python -m scheduler.probe`): its rows, its AUROCs and its command line."""

import json

import pytest

from scheduler.data.io import Example
from scheduler.probe import ProbeRows, main, per_task_auroc


def test_per_task_auroc_matches_hand_computed_values():
    benign = {"a": [Example("a1", "x"), Example("a2", "x")], "b": [Example("b1", "x")]}
    rows = ProbeRows(benign, {"plain": [Example("h1", "x"), Example("h2", "x")]})
    score = {e.key: s for e, s in zip(rows.all(), [0.1, 0.5, 0.95, 0.4, 0.9])}  # a1, a2, b1, h1, h2
    # task a: of the pairs (h, a) h1 beats a1 only, h2 beats both: 3 of 4; task b: b1 (0.95) beats both: 0
    assert per_task_auroc(rows, score) == {"plain": {"a": 0.75, "b": 0.0}}


def test_framed_rows_hold_the_plain_requests_in_every_frame_family(data_dir):
    rows = ProbeRows.sample(data_dir, benign_per_task=5, harmful_per_group=24)
    assert set(rows.tasks) == {"sentiment", "math", "cooking"} and set(rows.harmful) == {"beavertails", "framed"}
    for plain, framed in zip(rows.harmful["beavertails"], rows.harmful["framed"]):
        assert plain.prompt in framed.prompt and plain.prompt != framed.prompt and plain.response == framed.response
    assert len({e.row["attack"] for e in rows.harmful["framed"]}) == 24  # the 24 frames of the four families


def test_probe_command_scores_every_signal_of_an_adapter_and_the_lookup(data_dir, tiny_lm_path, tiny_embedder_path,
                                                                          tmp_path, capsys):
    out = tmp_path / "probe.json"
    main(["--data", str(data_dir), "--lm", tiny_lm_path, "--embedder", tiny_embedder_path, "--adapters", "3:1",
          "lookup", "--benign-per-task", "8", "--harmful-per-group", "8", "--batch-size", "4", "--out", str(out)])
    results = json.loads(out.read_text())
    assert list(results) == ["3:1", "lookup"]
    assert set(results["3:1"]) == {"refusal", "refusal_gain", "margin", "loss", "reference"}
    for by_group in [*results["3:1"].values(), results["lookup"]["lookup"]]:
        assert set(by_group) == {"beavertails", "framed"}
        for by_task in by_group.values():
            assert set(by_task) == {"sentiment", "math", "cooking"} and all(0 <= v <= 1 for v in by_task.values())
    assert "mean / worst" in capsys.readouterr().out


def test_a_malformed_adapter_is_refused_before_any_model_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--adapters", "60-all"])
    assert exit_.value.code == 2 and "expected STEPS:LAYERS such as 60:6" in capsys.readouterr().err
