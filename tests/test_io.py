"""Readers for every supported format and schema, and atomic writes."""

import json

import pandas as pd
import pytest

from scheduler.data.io import DataError, examples_from_rows, read_examples, write_rows

ROWS = [
    {"prompt": "p1", "response": "r1", "extra": 1},
    {"instruction": "do this", "input": "with that", "output": "done"},
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"text": "just text"},
    {"question": "q1", "answer": "a1"},
    {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "first"},
                       {"from": "gpt", "value": "reply one"}, {"from": "human", "value": "second"},
                       {"from": "gpt", "value": "reply two"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "describe"}, {"type": "image_url"},
                                               {"type": "text", "text": "briefly"}]},
                  {"role": "Assistant", "content": [{"type": "text", "text": "a cat"}]}]},
]
EXPECTED = [("p1", "r1"), ("do this\nInput: with that", "done"), ("hi", "hello"), ("just text", ""), ("q1", "a1"),
            ("first\nreply one\nsecond", "reply two"), ("describe\nbriefly", "a cat")]


def test_every_schema_normalises_and_keeps_the_row():
    examples = examples_from_rows(ROWS)
    assert [(e.prompt, e.response) for e in examples] == EXPECTED
    assert examples[0].row == ROWS[0]


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human"}]}, r"row 0: field 'conversations\[0\]': expected an object whose 'value'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     r"field 'messages\[0\]': expected an object whose 'content' is a string or a list of text parts"),
    ({"conversations": [{"from": "gpt", "value": "only a reply"}]},
     r"field 'conversations': expected at least one user turn"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "a cat"}]}, r"field 'messages': expected at least one user turn"),
    ({"conversations": "not a list"}, r"field 'conversations': expected a non-empty list of \{from, value\} turns"),
])
def test_bad_chat_rows_name_the_field(row, message):
    with pytest.raises(DataError, match=message):
        examples_from_rows([row])


def test_plain_strings_are_rows():
    assert [(e.prompt, e.response) for e in examples_from_rows(["a question"])] == [("a question", "")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_round_trip_through_every_format(tmp_path, suffix):
    rows = [{"prompt": "p1", "response": "r1", "weight": 0.5}, {"prompt": "p2", "response": "r2", "weight": 1.5}]
    path = write_rows(rows, tmp_path / f"data{suffix}")
    examples = read_examples(path)
    assert [(e.prompt, e.response) for e in examples] == [("p1", "r1"), ("p2", "r2")]
    assert float(examples[1].row["weight"]) == 1.5
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_json_array_and_data_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": ROWS}))
    assert len(read_examples(tmp_path / "a.json")) == len(ROWS)


def test_csv_reports_line_of_bad_row(tmp_path):
    pd.DataFrame([{"prompt": "ok", "response": "r"}, {"prompt": "", "response": ""}]).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d\.csv:3: no usable text field"):
        read_examples(tmp_path / "d.csv")


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        write_rows([{"prompt": "ok"}, {"bad": object()}], target)
    assert list(tmp_path.iterdir()) == []
