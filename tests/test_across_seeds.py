"""Reading validation runs of several seeds together (scheduler.across_seeds), on constructed summaries."""

import json
import math

import pytest

from scheduler.across_seeds import main, mean_over_seeds, per_seed, read_summaries, targets_met
from scheduler.data.io import DataError


def write_run(directory, rows):
    directory.mkdir()
    (directory / "validation_summary.json").write_text(json.dumps(rows, indent=1))
    return directory


@pytest.fixture
def runs(tmp_path):
    """Two seeds: the default measured on both (no audited set on the second), the look-up on the first only."""
    first = write_run(tmp_path / "seed1", [
        {"method": "default", "auroc_p0.1_worst": 0.96, "auroc_p0.1_mean": 0.99, "benign_kept_p0_worst": 0.975,
         "auroc_p0.1_audited_worst": 0.94},
        {"method": "alignment_lookup", "auroc_p0.1_worst": 0.86, "auroc_p0.1_mean": 0.95, "benign_kept_p0_worst": 0.99,
         "auroc_p0.1_audited_worst": 0.88}])
    second = write_run(tmp_path / "seed2", [
        {"method": "default", "auroc_p0.1_worst": 0.94, "auroc_p0.1_mean": 0.985, "benign_kept_p0_worst": 0.965,
         "auroc_p0.1_audited_worst": float("nan")}])
    return [first, second]


def test_means_over_seeds_skip_what_a_seed_did_not_measure(runs):
    table = {row["method"]: row for row in mean_over_seeds(read_summaries(runs))}
    default, lookup = table["default"], table["alignment_lookup"]
    assert default["seeds"] == 2 and lookup["seeds"] == 1
    assert default["auroc_p0.1_worst"] == pytest.approx(0.95)
    assert default["auroc_p0.1_mean"] == pytest.approx(0.9875)
    assert default["auroc_p0.1_audited_worst"] == pytest.approx(0.94)  # the second seed has no audited set
    assert lookup["auroc_p0.1_worst"] == pytest.approx(0.86)
    assert [row["method"] for row in mean_over_seeds(read_summaries(runs))] == ["default", "alignment_lookup"]


def test_targets_count_the_seeds_that_meet_them(runs):
    default = next(row for row in targets_met(read_summaries(runs)) if row["method"] == "default")
    assert default == {"method": "default", "auroc_p0.1_worst >= 0.95": "1 / 2", "auroc_p0.1_mean >= 0.98": "2 / 2",
                       "benign_kept_p0_worst >= 0.97": "1 / 2", "auroc_p0.1_audited_worst >= 0.95": "0 / 1"}
    by_run = {row["run"]: row for row in per_seed(read_summaries(runs))}
    assert by_run["seed2"]["default"] == 0.94 and math.isnan(by_run["seed2"]["alignment_lookup"])


def test_command_prints_and_writes_the_report_and_plot(runs, tmp_path, capsys):
    out, figure = tmp_path / "across.md", tmp_path / "across.png"
    main([*map(str, runs), "--output", str(out), "--plot", str(figure)])
    assert figure.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "# Across 2 seeds: seed1, seed2" in printed
    assert "| default | 2 | 0.9500 | 0.9875 | 0.9700 | 0.9400 |" in printed
    assert "| seed2 | 0.9400 | - |" in printed


@pytest.mark.parametrize("content, expected", [
    (None, "not found"), ("{not json", "not valid JSON"), ('{"method": "default"}', "expected a list of rows")])
def test_bad_run_directory_names_the_file(tmp_path, capsys, content, expected):
    run = tmp_path / "seed0"
    run.mkdir()
    if content is not None:
        (run / "validation_summary.json").write_text(content)
    with pytest.raises(DataError, match=expected):
        read_summaries([run])
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--output", str(tmp_path / "across.md")])
    assert exit_info.value.code == 2
    assert str(run / "validation_summary.json") in capsys.readouterr().err
    assert not (tmp_path / "across.md").exists()


def test_plot_with_an_unknown_format_stops_before_reading(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, runs), "--output", str(tmp_path / "across.md"), "--plot", str(tmp_path / "across.xyz")])
    assert exit_info.value.code == 2 and "expected a file ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "across.md").exists()


def test_runs_are_read_in_natural_order(tmp_path):
    rows = [{"method": "default", "auroc_p0.1_worst": 0.95}]
    dirs = [write_run(tmp_path / name, rows) for name in ("seed10", "seed9", "seed2")]
    assert list(read_summaries(dirs)) == ["seed2", "seed9", "seed10"]
