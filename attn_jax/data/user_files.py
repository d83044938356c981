"""A user's own data files: paths and globs, strict UTF-8, tokens, errors naming file and line.

Every problem with a user's file raises :class:`DataFileError`, a ``ValueError`` whose
message is one line: the config key, the file, the 1-based line where there is one, and
what is wrong::

    config.data.train_files: data/x.tsv:17: no tab between source and target

The file tasks (``text``, ``pairs``, ``labelled``) read their files when the config is
validated (:func:`split_files`: an evaluation file must not also be a training file), so
``launch.py`` prints that line and exits with code 2 before anything is written.

Tokenisation (``config.data.tokenize``): ``"char"``, every character (spaces included) is
a token; ``"whitespace"``, ``str.split()`` (runs of spaces, tabs and newlines separate
tokens; case and punctuation are kept). Vocabularies are built from the training files:
``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` (ids 0-3), then the training tokens in sorted
order; evaluation tokens not seen in training become ``<unk>``.
"""

from __future__ import annotations

import glob
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from attn_jax.data.vocab import SPECIALS, Vocabulary

__all__ = [
    "RESERVED",
    "TOKENIZERS",
    "UNK",
    "UNK_ID",
    "DataFileError",
    "build_vocabulary",
    "decode_utf8",
    "file_list",
    "numbered_lines",
    "read_bytes",
    "resolve_files",
    "split_files",
    "tokenize",
    "with_unknown",
]

UNK = "<unk>"
UNK_ID = len(SPECIALS)  # 3: the first id after <pad>, <bos>, <eos>
RESERVED = (*SPECIALS, UNK)  # whitespace tokens that would collide with the special ids
TOKENIZERS = ("char", "whitespace")


class DataFileError(ValueError):
    """A user's data file cannot be used: ``"{key}: {path}[:{line}]: {what}"``."""

    def __init__(self, key: str, path: str | os.PathLike, what: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{key}: {where}: {what}")


def file_list(spec: str | Sequence[str]) -> list[str]:
    """The patterns of a ``*_files`` config value: a string (several separated by commas)
    or a list of strings."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [str(p).strip() for p in parts if str(p).strip()]


def resolve_files(spec: str | Sequence[str], key: str) -> list[pathlib.Path]:
    """The files named by ``spec`` (paths or globs, ``~`` expanded; a glob's matches in
    sorted order; each file once), in order.

    Raises:
      ValueError: nothing given; DataFileError: a path that is missing or a directory,
        a glob that matches no file.
    """
    patterns = [] if not isinstance(spec, str | list | tuple) else file_list(spec)
    if not patterns:
        raise ValueError(f"{key}: expected a path or glob (several separated by commas)")
    files: list[pathlib.Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            matched = [pathlib.Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
            matched = [p for p in matched if p.is_file()]
            if not matched:
                raise DataFileError(key, pattern, "matches no file")
        else:
            path = pathlib.Path(expanded)
            if path.is_dir():
                raise DataFileError(key, pattern, "is a directory (name files, or a glob)")
            if not path.is_file():
                raise DataFileError(key, pattern, "no such file")
            matched = [path]
        files += [p for p in matched if p not in files]
    return files


def split_files(data: Any) -> dict[str, list[pathlib.Path]]:
    """``{"train": files, "eval": files}`` of ``config.data.train_files`` /
    ``config.data.eval_files`` (:func:`resolve_files`).

    Raises:
      DataFileError: as :func:`resolve_files`, or naming ``config.data.eval_files`` when
        an evaluation file is also a training file (the same file after
        ``Path.resolve()``, e.g. matched by a training glob too): it would score the model
        on text it trained on.
    """
    files = {}
    for split in ("train", "eval"):
        key = f"config.data.{split}_files"
        files[split] = resolve_files(data.get(f"{split}_files"), key)
    training = {p.resolve() for p in files["train"]}
    for path in files["eval"]:
        if path.resolve() in training:
            what = "is also a training file (config.data.train_files names it too)"
            raise DataFileError("config.data.eval_files", path, what)
    return files


def read_bytes(path: pathlib.Path, key: str) -> bytes:
    """The file's bytes; an unreadable or empty file raises :class:`DataFileError`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataFileError(key, path, f"cannot read ({error.strerror})") from None
    if not data:
        raise DataFileError(key, path, "file is empty")
    return data


def decode_utf8(data: bytes, path: pathlib.Path, key: str) -> str:
    """``data`` as UTF-8 (strict); the first bad byte raises, naming its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        what = f"not valid UTF-8 (byte 0x{data[error.start]:02x} at column {column})"
        raise DataFileError(key, path, what, line) from None


def numbered_lines(path: pathlib.Path, key: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of the file's non-blank lines (1-based, as an editor counts
    them; ``\\r\\n`` endings and a leading byte-order mark removed).

    Raises:
      DataFileError: unreadable, empty, not UTF-8, or only blank lines.
    """
    text = decode_utf8(read_bytes(path, key), path, key).removeprefix("\ufeff")
    lines = [(i + 1, line.removesuffix("\r")) for i, line in enumerate(text.split("\n"))]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise DataFileError(key, path, "no examples (only blank lines)")
    return lines


def tokenize(text: str, mode: str) -> list[str]:
    """``"char"``: every character; ``"whitespace"``: ``text.split()``."""
    if mode == "char":
        return list(text)
    if mode == "whitespace":
        return text.split()
    raise ValueError(f"tokenize: expected one of {TOKENIZERS}, got {mode!r}")


def build_vocabulary(sequences: Iterable[Sequence[str]]) -> Vocabulary:
    """The specials, ``<unk>`` (id :data:`UNK_ID`), then the sorted tokens of ``sequences``."""
    return Vocabulary([UNK, *sorted({t for sequence in sequences for t in sequence})])


def with_unknown(vocab: Vocabulary, tokens: Sequence[str]) -> tuple[list[str], int]:
    """``tokens`` with those outside ``vocab`` replaced by ``<unk>``, and how many were."""
    known = [t if t in vocab else UNK for t in tokens]
    return known, sum(t not in vocab for t in tokens)
