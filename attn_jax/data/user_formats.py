"""Parsers of a user's example files: TSV pairs and labelled JSONL / CSV.

* **Pairs** (``.tsv`` or any name): one ``source<TAB>target`` per line; blank lines are
  skipped; a line with no tab, more than one tab, or an empty side is an error.
* **Labelled**, by file extension: ``.jsonl`` (or ``.ndjson``), one JSON object per line
  with a string ``"text"`` and a string or integer ``"label"`` (other keys ignored); or
  ``.csv`` with a header row that has ``text`` and ``label`` columns (others ignored;
  quoting as Python's ``csv`` module reads it, so a quoted field may hold commas and line
  breaks). Labels are compared as strings, without surrounding whitespace (``1``, ``"1"``
  and ``" 1"`` are the same label).

Errors are :class:`~attn_jax.data.user_files.DataFileError` naming the file and line (a
CSV record's first line, where a quoted field spans several).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
from collections.abc import Sequence

from attn_jax.data.user_files import (
    RESERVED,
    DataFileError,
    decode_utf8,
    numbered_lines,
    read_bytes,
    tokenize,
)

__all__ = ["LABELLED_SUFFIXES", "Labelled", "Pair", "read_labelled", "read_pairs"]

LABELLED_SUFFIXES = (".jsonl", ".ndjson", ".csv")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One TSV line: its tokens and where it came from."""

    source: list[str]
    target: list[str]
    path: pathlib.Path
    line: int


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One labelled example: its tokens, its label (a string) and where it came from."""

    tokens: list[str]
    label: str
    path: pathlib.Path
    line: int


def _tokens(text: str, mode: str, what: str, key: str, path: pathlib.Path, line: int) -> list:
    tokens = tokenize(text, mode)
    if not tokens:
        raise DataFileError(key, path, f"empty {what}", line)
    reserved = sorted(set(tokens) & set(RESERVED))
    if reserved:
        raise DataFileError(key, path, f"{what} has the reserved token(s) {reserved}", line)
    return tokens


def read_pairs(files: Sequence[pathlib.Path], key: str, mode: str) -> list[Pair]:
    """Every ``source<TAB>target`` line of ``files``, tokenised by ``mode``."""
    pairs = []
    for path in files:
        for number, line in numbered_lines(path, key):
            fields = line.split("\t")
            if len(fields) == 1:
                raise DataFileError(key, path, "no tab between source and target", number)
            if len(fields) > 2:
                what = f"{len(fields) - 1} tabs (expected one: source<TAB>target)"
                raise DataFileError(key, path, what, number)
            source, target = (
                _tokens(f, mode, w, key, path, number)
                for f, w in zip(fields, ("source", "target"), strict=True)
            )
            pairs.append(Pair(source, target, path, number))
    return pairs


def _label(value: object, key: str, path: pathlib.Path, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        what = f'"label" must be a string or an integer, got {json.dumps(value)}'
        raise DataFileError(key, path, what, line)
    label = str(value).strip()
    if not label:
        raise DataFileError(key, path, "empty label", line)
    return label


def _jsonl(path: pathlib.Path, key: str, mode: str) -> list[Labelled]:
    examples = []
    for number, line in numbered_lines(path, key):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            what = f"not valid JSON ({error.msg} at column {error.colno})"
            raise DataFileError(key, path, what, number) from None
        if not isinstance(record, dict):
            what = 'expected a JSON object with "text" and "label"'
            raise DataFileError(key, path, what, number)
        missing = [k for k in ("text", "label") if k not in record]
        if missing:
            raise DataFileError(key, path, f'missing key "{missing[0]}"', number)
        if not isinstance(record["text"], str):
            what = f'"text" must be a string, got {json.dumps(record["text"])}'
            raise DataFileError(key, path, what, number)
        tokens = _tokens(record["text"], mode, "text", key, path, number)
        label = _label(record["label"], key, path, number)
        examples.append(Labelled(tokens, label, path, number))
    return examples


def _csv(path: pathlib.Path, key: str, mode: str) -> list[Labelled]:
    text = decode_utf8(read_bytes(path, key), path, key).removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    examples, start = [], 1  # start: the first line of the record being read
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataFileError(key, path, "no header row (expected text,label columns)", 1)
        columns = [h.strip() for h in header]
        missing = [c for c in ("text", "label") if c not in columns]
        if missing:
            what = f"the header has no {missing[0]!r} column (columns: {', '.join(columns)})"
            raise DataFileError(key, path, what, 1)
        text_at, label_at = columns.index("text"), columns.index("label")
        start = reader.line_num + 1
        for row in reader:  # a record spans several lines where a quoted field does
            number, start = start, reader.line_num + 1
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(columns):
                what = f"{len(row)} fields, the header has {len(columns)}"
                raise DataFileError(key, path, what, number)
            tokens = _tokens(row[text_at], mode, "text", key, path, number)
            label = _label(row[label_at], key, path, number)
            examples.append(Labelled(tokens, label, path, number))
    except csv.Error as error:
        raise DataFileError(key, path, f"not valid CSV ({error})", start) from None
    if not examples:
        raise DataFileError(key, path, "no examples (only a header)")
    return examples


def read_labelled(files: Sequence[pathlib.Path], key: str, mode: str) -> list[Labelled]:
    """Every example of ``files`` (each ``.jsonl`` / ``.ndjson`` or ``.csv``)."""
    examples = []
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in LABELLED_SUFFIXES:
            what = f"unknown format {suffix or '(no extension)'!r}; expected .jsonl or .csv"
            raise DataFileError(key, path, what)
        examples += (_csv if suffix == ".csv" else _jsonl)(path, key, mode)
    return examples
