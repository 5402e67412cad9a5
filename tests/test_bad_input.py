"""Bad input: one-line error naming file, line and field, non-zero exit, no partial output."""

import subprocess
from pathlib import Path

import pytest
from conftest import run_script, train_overrides

from scheduler.data.io import DataError, read_examples


@pytest.mark.parametrize(("content", "expected"), [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', r"bad\.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "response": "b"}\n{"title": "x", "body": "y"}\n', r"bad\.jsonl:2: no usable text field \(has: body, title\)"),
    ('{"messages": [{"role": "user"}]}\n', r"bad\.jsonl:1: field 'messages\[0\]'"),
    ("", r"bad\.jsonl: empty dataset"),
    ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object or a string, got list"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_examples(path)


@pytest.mark.parametrize(("name", "expected"), [("missing.jsonl", "file not found"), ("data.txt", "unsupported extension")])
def test_missing_or_unsupported_file(tmp_path, name, expected):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=expected):
        read_examples(tmp_path / name)


def test_not_utf8(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(tmp_path / "latin.jsonl")


def run_apply(*args: str) -> subprocess.CompletedProcess:
    return run_script("apply_scheduler.py", *args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir, tiny_embedder_path, tiny_lm_path) -> Path:
    out = tmp_path_factory.mktemp("bad-input-run")
    overrides = train_overrides(data_dir, out, tiny_embedder_path, tiny_lm_path, steps=2) + ["demo_input=null"]
    result = run_script("train_scheduler.py", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "scheduler.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(("content", "expected"), [
    ('{"prompt": "a", "response": "b"}\n{oops\n', "input.jsonl:2: malformed JSON"),
    ('{"prompt": "a"}\n{"foo": 1}\n', "input.jsonl:2: no usable text field (has: foo)"),
    ("", "input.jsonl: empty dataset"),
])
def test_apply_rejects_bad_rows_without_output(checkpoint, tmp_path, content, expected):
    source = tmp_path / "input.jsonl"
    source.write_text(content)
    result = run_apply(f"checkpoint={checkpoint}", f"input={source}", f"output={tmp_path / 'out.jsonl'}")
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize(("second_row", "expected"), [
    ('{"prompt": "b", "response": "c"}', "input.jsonl:2: field 'task': expected a non-empty string or number"),
    ('{"prompt": "b", "response": "c", "task": ["x"]}', "input.jsonl:2: field 'task': expected a non-empty string"),
])
def test_apply_group_by_needs_the_field_on_every_row(checkpoint, tmp_path, second_row, expected):
    source = tmp_path / "input.jsonl"
    source.write_text('{"prompt": "a", "response": "b", "task": "t1"}\n' + second_row + "\n")
    result = run_apply(f"checkpoint={checkpoint}", f"input={source}", f"output={tmp_path / 'out.jsonl'}",
                       "group_by=task")
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_apply_missing_input_and_bad_checkpoint(checkpoint, tmp_path):
    result = run_apply(f"checkpoint={checkpoint}", f"input={tmp_path / 'nope.jsonl'}", f"output={tmp_path / 'o.jsonl'}")
    assert result.returncode != 0 and "nope.jsonl: file not found" in result.stderr
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    result = run_apply(f"checkpoint={tmp_path / 'junk.ckpt'}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'o.jsonl'}")
    assert result.returncode != 0 and "junk.ckpt: not a readable checkpoint" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("options, expected", [
    (["scoring_shift=high"], "scoring_shift: expected a number"),
    (["scoring_shift_taper=[0.5,0.1]"], "scoring_shift_taper: expected 0 <= low < high <= 1; got [0.5, 0.1]"),
    (["withhold_below=low"], "withhold_below: expected a number"),
    (["withhold_below=-6", "withhold_block=[0.07,0.06]"], "withhold_block: expected 0 <= low < high <= 1; got [0.07, 0.06]"),
    (["withhold_below=-6", "withhold_block=0.06"], "withhold_block: expected two fractions of the set [low, high]; got 0.06"),
    (["withhold_block=[0.06,0.07]"], "withhold_block: needs withhold_below"),
    (["withhold_below=-6", "withhold_spares_refusals=maybe"], "withhold_spares_refusals: expected true or false; got 'maybe'"),
    (["withhold_spares_refusals=true"], "withhold_spares_refusals: needs withhold_below"),
    (["exchange_margin_cap=0"], "exchange_margin_cap: expected a whole number of exchanges >= 1 (e.g. 6) or null; got 0"),
    (["short_answer_words=-1"], "short_answer_words: expected a whole number of words >= 0 (0: off) or null; got -1"),
    (["show_lowest=few"], "show_lowest: expected a whole number of rows >= 0; got 'few'"),
    (["flag_rate=0"], "flag_rate: expected the share of a clean set's rows the cut may flag, between 0 and 1; got 0"),
    (["flag_below=low"], "flag_below: expected a number (a cut on unshifted_mu); got 'low'"),
    (["flag_below=4", "calibrate_on=clean.jsonl"], "calibrate_on and flag_below both set"),
    (["calibrate_on=[1]"], "calibrate_on: expected a file or a list of files of clean rows; got [1]"),
])
def test_apply_rejects_a_bad_operating_point_without_output(checkpoint, tmp_path, options, expected):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    result = run_apply(f"checkpoint={checkpoint}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
                       *options)
    assert result.returncode != 0 and expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_apply_calibration_files_must_be_clean_readable_and_kept(checkpoint, tmp_path):
    """A calibration file with a harmful row, a missing one, or one the output would overwrite: a one-line error, no
    output, and the file as it was."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    clean = '{"prompt": "a", "response": "b", "label": "benign"}\n{"prompt": "c", "response": "d", "label": "harmful"}\n'
    (tmp_path / "clean.jsonl").write_text(clean)
    cases = {"clean.jsonl:2: field 'label': 'harmful' in a file given to calibrate_on": "o.jsonl",
             "nope.jsonl: file not found": "o.jsonl",
             "output would overwrite the input file": "clean.jsonl"}
    for expected, output in cases.items():
        calibration = "nope.jsonl" if "nope" in expected else "clean.jsonl"
        result = run_apply(f"checkpoint={checkpoint}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / output}",
                           f"calibrate_on={tmp_path / calibration}")
        assert result.returncode != 0 and expected in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "o.jsonl").exists() and (tmp_path / "clean.jsonl").read_text() == clean


@pytest.mark.slow
def test_checkpoint_with_mismatched_embedder(checkpoint, tmp_path_factory):
    from scheduler import NeuralScheduler
    from scheduler.embeddings import Embedder
    from scheduler.tiny import build_tiny_embedder

    other = Embedder(str(build_tiny_embedder(tmp_path_factory.mktemp("other"), dim=16)))
    with pytest.raises(DataError, match="gives 16-d embeddings; the checkpoint was trained with .*32-d"):
        NeuralScheduler.load(checkpoint, embedder=other)


@pytest.mark.slow
def test_unknown_config_key_fails(tmp_path):
    result = run_apply("checkpoint=x.ckpt", "input=a.jsonl", "output=b.jsonl", "batchsize=3")
    assert result.returncode != 0 and "batchsize" in result.stderr
