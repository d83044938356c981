"""Language modelling on a user's text files: token streams and fixed-length windows.

The files become one stream of tokens, ``<bos>`` before each file's first token (so the
model sees where a file starts; ``<bos>`` is never a target). Byte level: byte ``b`` is
token ``b + 3`` (:data:`BYTE_VOCAB_SIZE` = 259 with the specials). Character level: the
sorted characters of the training files after ``<unk>`` (id 3); evaluation characters the
training files lack become ``<unk>`` and still count as targets (the model cannot know
them, and pays for them).

Training windows are ``seq_len + 1`` tokens starting anywhere in the stream, drawn from
``(seed, step)`` alone (:class:`WindowDataset`), so a resumed run sees exactly the batches
of an uninterrupted one. Evaluation tiles the stream with non-overlapping windows
(:func:`tile_windows`), so every token is predicted exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attn_jax.data.mqar import IGNORE
from attn_jax.data.user_files import UNK, UNK_ID
from attn_jax.data.vocab import BOS, PAD, SPECIALS

__all__ = [
    "BYTE_OFFSET",
    "BYTE_VOCAB_SIZE",
    "LEVELS",
    "WindowDataset",
    "byte_stream",
    "char_stream",
    "char_tokens",
    "tile_windows",
    "token_name",
]

LEVELS = ("byte", "char")
BYTE_OFFSET = len(SPECIALS)  # byte b is token b + 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


def _stream(documents: Sequence[np.ndarray]) -> np.ndarray:
    """``[<bos>, doc 0..., <bos>, doc 1..., ...]`` (int32)."""
    parts = [np.concatenate([[BOS], doc]) for doc in documents]
    return np.concatenate(parts).astype(np.int32)


def byte_stream(documents: Sequence[bytes]) -> np.ndarray:
    """The byte-level token stream of ``documents``: ``[total tokens]`` int32."""
    return _stream([np.frombuffer(d, np.uint8).astype(np.int32) + BYTE_OFFSET for d in documents])


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def char_tokens(documents: Sequence[str]) -> list[str]:
    """The vocabulary of character-level training: ``<unk>``, then the sorted characters of
    ``documents`` (so token ``i`` of the list has id ``i + 3``)."""
    codes = np.unique(np.concatenate([_code_points(d) for d in documents]))
    return [UNK, *(chr(int(c)) for c in codes)]


def char_stream(documents: Sequence[str], tokens: Sequence[str]) -> tuple[np.ndarray, int]:
    """The character-level token stream of ``documents`` for the vocabulary ``tokens``
    (:func:`char_tokens`), and how many characters became ``<unk>``."""
    known = np.asarray([ord(t) for t in tokens[1:]], np.uint32)  # sorted code points
    ids, unknown = [], 0
    for document in documents:
        codes = _code_points(document)
        where = np.minimum(np.searchsorted(known, codes), len(known) - 1)
        found = known[where] == codes
        unknown += int((~found).sum())
        ids.append(np.where(found, where + UNK_ID + 1, UNK_ID))
    return _stream(ids), unknown


def _pairs(windows: np.ndarray) -> dict[str, np.ndarray]:
    """``[n, seq_len + 1]`` token windows -> inputs and next-token labels, no loss on
    ``<bos>`` (a file boundary) or padding."""
    labels = windows[:, 1:]
    labels = np.where((labels == BOS) | (labels == PAD), IGNORE, labels)
    return {"inputs": windows[:, :-1], "labels": labels.astype(np.int32)}


class WindowDataset:
    """Random ``seq_len``-token windows of a token stream (training).

    The batch of step ``s`` is a pure function of ``(seed, s)``: window starts are drawn
    uniformly (with replacement) by ``np.random.default_rng((seed, s))``.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int = 0):
        if len(stream) < seq_len + 1:
            raise ValueError(
                f"WindowDataset: {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.stream, self.seq_len, self.seed = stream, seq_len, seed

    def __len__(self) -> int:
        """The number of distinct windows."""
        return len(self.stream) - self.seq_len

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """``{"inputs", "labels"}``, each ``[batch_size, seq_len]`` int32 (labels: the next
        token, ``IGNORE`` where it is ``<bos>``)."""
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self), batch_size)
        return _pairs(self.stream[starts[:, None] + np.arange(self.seq_len + 1)])


def tile_windows(stream: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows that predict every token of ``stream`` after the first
    exactly once: ``{"inputs", "labels"}`` ``[ceil((len - 1) / seq_len), seq_len]``, the
    last window padded (``<pad>`` inputs, ``IGNORE`` labels)."""
    count = -(-(len(stream) - 1) // seq_len)
    padded = np.full(count * seq_len + 1, PAD, np.int32)
    padded[: len(stream)] = stream
    starts = np.arange(count) * seq_len
    return _pairs(padded[starts[:, None] + np.arange(seq_len + 1)])


def token_name(token: str) -> str:
    """A readable label for a character or byte token in plots."""
    names = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return names.get(token, token if token.isprintable() else repr(token)[1:-1])
