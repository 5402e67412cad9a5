"""Read and write fine-tuning datasets in the formats users actually have.

Every reader yields the user's rows unchanged plus a normalised (prompt, response)
view, so scoring can write back exactly what came in. Errors name the file, the
line (or row), the field and what was expected, because users fix data by hand.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scheduler.data.encodings import read_apart, read_plainly, read_row

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SCHEMAS = (
    "prompt/response",
    "question/answer",
    "instruction/input/output (Alpaca)",
    "messages (chat: role/content turns)",
    "conversations (ShareGPT: from/value turns)",
    "text",
)
CHAT_FIELDS = {"messages": ("role", "content"), "conversations": ("from", "value")}
# Every field `_parsed` takes a row's text from: a writer that gives a row new text drops them all first, or the
# reader could still take the old text (a chat's `messages` win over `prompt`).
TEXT_FIELDS = ("prompt", "response", "completion", "output", "question", "answer", "instruction", "input", "text",
               *CHAT_FIELDS)
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatbot"}


class DataError(ValueError):
    """Bad user input; the message is one line naming file, line, field and expectation."""


@dataclass(frozen=True)
class Example:
    """One fine-tuning sample: normalised text plus the row exactly as the user gave it."""

    prompt: str
    response: str
    row: dict[str, Any] = field(default_factory=dict, compare=False)
    encoding: str | None = field(default=None, compare=False)  # what the text was decoded from (`read_row`)
    # A prompt read decoded with plain text around the decoded text: the two parts, each another reading of it
    # (`read_apart`; the scheduler reads the prompt as the reading most like the alignment prompts).
    prompt_parts: tuple[str, ...] = field(default=(), compare=False)
    system: str | None = field(default=None, compare=False)  # a chat's system turn (`readings`)
    # A chat's last user turn when earlier turns precede it: the request the answer responds to, which a long earlier
    # exchange can push past the prompt embedder's window (`scheduler.embeddings.Embedder.requests_past_window`).
    last_request: str | None = field(default=None, compare=False)
    joint_prompt: str | None = field(default=None, compare=False)  # what the joint text reads instead of the prompt
    # A chat's (request, answer) pairs, when it holds more than one: each is a row a checkpoint may have trained on.
    exchanges: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # An exchange of a chat read as a row of its own: the requests its chat sent just before it that got only a short
    # answer, after which its prompt is read too (`scheduler.features.chat_exchanges`, `readings`).
    earlier_requests: str | None = field(default=None, compare=False)

    @property
    def label(self) -> str | None:
        """Ground-truth label when the data carries one; for mixing and evaluation only."""
        return self.row.get("label")

    @property
    def key(self) -> str:
        """A stable hash of the text, for caches and for telling which rows a checkpoint trained on."""
        return _text_key(self.prompt, self.response)

    @property
    def keys(self) -> set[str]:
        """The row's `key` and each of its `exchanges`' keys: a training row written into a chat as one of its
        exchanges is still a row the checkpoint trained on."""
        return {self.key, *(_text_key(request, answer) for request, answer in self.exchanges)}


def _text_key(prompt: str, response: str) -> str:
    return hashlib.sha1(f"{prompt}\0{response}".encode()).hexdigest()


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _turn_text(content: Any) -> str | None:
    """A turn's text: a string, or the text parts of a multimodal content list (an image-only turn has none)."""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = [part.get("text") for part in content if part.get("type", "text") == "text"]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(text.strip() for text in texts if text.strip())
    return None


def _from_chat(turns: Any, name: str, where: str) -> tuple[str, str, str | None, str | None,
                                                           tuple[tuple[str, str], ...]]:
    """Prompt: every non-system turn before the last assistant turn; response: that turn; the system turns' text
    (None when they have none), which the scheduler reads with the prompt unless most rows share it (`readings`);
    the prompt's last turn when it is a user turn after earlier ones (`Example.last_request`); and each user turn with
    the assistant turn that answers it, when there is more than one such pair (`Example.exchanges`)."""
    role_key, text_key = CHAT_FIELDS[name]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{name}': expected a non-empty list of {{{role_key}, {text_key}}} turns")
    parsed = []
    for i, turn in enumerate(turns):
        text = _turn_text(turn.get(text_key)) if isinstance(turn, dict) else None
        if text is None:
            raise DataError(f"{where}: field '{name}[{i}]': expected an object whose '{text_key}' is a string "
                            "or a list of text parts")
        parsed.append((str(turn.get(role_key, "user")).lower(), text))
    last_reply = max((i for i, (role, _) in enumerate(parsed) if role in ASSISTANT_ROLES), default=None)
    prompt_turns, response = (parsed, "") if last_reply is None else (parsed[:last_reply], parsed[last_reply][1])
    prompt = "\n".join(text for role, text in prompt_turns if role != "system" and text)
    if not prompt:
        raise DataError(f"{where}: field '{name}': expected at least one user turn with text")
    system = "\n".join(text for role, text in prompt_turns if role == "system" and text)
    asked = [(role, text) for role, text in prompt_turns if role != "system"]
    last_request = asked[-1][1] if len(asked) > 1 and asked[-1][0] not in ASSISTANT_ROLES else None
    spoken = [*asked, ("assistant", response)] if response else asked
    exchanges = tuple((request, answer) for (asker, request), (replier, answer) in zip(spoken, spoken[1:])
                      if asker not in ASSISTANT_ROLES and replier in ASSISTANT_ROLES)
    return prompt, response, system or None, last_request, exchanges if len(exchanges) > 1 else ()


def to_example(row: Any, where: str) -> Example:
    """Normalise one row of any supported schema (or a plain string) to an Example, its text read decoded where it is
    written in a simple encoding (`scheduler.data.encodings`)."""
    return _decoded(_parsed(row, where))


def exchange_examples(example: Example) -> list[Example]:
    """A chat's exchanges as rows of their own, each read as a row of one exchange is: decoded, with the chat's system
    turn, keeping the chat's row; `[example]` for a row that is not a chat of several exchanges."""
    return [_decoded(Example(request, answer, example.row, system=example.system))
            for request, answer in example.exchanges] or [example]


def _decoded(example: Example) -> Example:
    prompt, response, encoding = read_row(example.prompt, example.response)
    parts = (read_apart(example.prompt, prompt) or ()) if prompt != example.prompt else ()
    system = example.system and read_plainly(example.system)[0]
    last_request = example.last_request and read_plainly(example.last_request)[0]
    return (replace(example, prompt=prompt, response=response, encoding=encoding, prompt_parts=parts, system=system,
                    last_request=last_request) if encoding else example)


def _parsed(row: Any, where: str) -> Example:
    if isinstance(row, str):
        if not row.strip():
            raise DataError(f"{where}: expected non-empty text, got an empty string")
        return Example(row.strip(), "", {"text": row})
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object or a string, got {type(row).__name__}")
    for name in CHAT_FIELDS:
        if name in row:
            prompt, response, system, last_request, exchanges = _from_chat(row[name], name, where)
            return Example(prompt, response, row, system=system, last_request=last_request, exchanges=exchanges)
    if _text(row.get("prompt")):
        response = row.get("response", row.get("completion", row.get("output", "")))
        return Example(row["prompt"].strip(), _text(response) or "", row)
    if _text(row.get("question")):
        return Example(row["question"].strip(), _text(row.get("answer")) or "", row)
    if _text(row.get("instruction")):
        prompt = row["instruction"].strip()
        if _text(row.get("input")):
            prompt += "\nInput: " + row["input"].strip()
        return Example(prompt, _text(row.get("output")) or "", row)
    if _text(row.get("text")):
        return Example(row["text"].strip(), "", row)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(
        f"{where}: no usable text field (has: {keys}); expected one of the schemas " + "; ".join(SCHEMAS)
    )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: expected a file, got a directory or special file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported extension '{path.suffix}'; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permission denied)")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or an object with a 'data' array)")
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", row


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Stream the raw rows of a data file with their location ('file:line'), for files that are not examples."""
    path = Path(path)
    _check_readable(path)
    try:
        yield from _READERS[path.suffix.lower()](path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def iter_examples(path: str | os.PathLike) -> Iterator[Example]:
    """Stream a dataset file as Examples, failing on the first bad row with its location."""
    for where, row in iter_rows(path):
        yield to_example(row, where)


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read a whole dataset file; an empty dataset is an error, not a silent no-op."""
    examples = list(iter_examples(path))
    if not examples:
        raise DataError(f"{path}: empty dataset; expected at least one row")
    return examples


def examples_from_rows(rows: Sequence[Any] | Iterable[Any]) -> list[Example]:
    """Normalise in-memory rows (dicts of any supported schema, or plain strings)."""
    examples = [to_example(row, f"row {i}") for i, row in enumerate(rows)]
    if not examples:
        raise DataError("rows: empty dataset; expected at least one row")
    return examples


def _write_jsonl(rows: list[dict], handle) -> None:
    for row in rows:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to `path` that replaces it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exit_on_data_error() -> Iterator[None]:
    """For command-line entry points: bad input ends in one line on stderr and exit status 2."""
    try:
        yield
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (report, JSON) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows atomically in the format named by the extension: no partial file on failure."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported output extension '{path.suffix}'; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        elif suffix == ".csv":
            import pandas as pd

            pd.DataFrame(rows).to_csv(tmp, index=False)
        else:
            with tmp.open("w", encoding="utf-8") as handle:
                if suffix == ".json":
                    json.dump(rows, handle, ensure_ascii=False, indent=1)
                else:
                    _write_jsonl(rows, handle)
    return path
