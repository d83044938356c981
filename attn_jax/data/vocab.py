"""Token vocabularies and padding for the sequence tasks.

Every vocabulary starts with the same special tokens, so models can rely on the ids:
``<pad>`` = 0 (the models' ``pad_id``), ``<bos>`` = 1, ``<eos>`` = 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "Vocabulary", "pad_sequences"]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")


class Vocabulary:
    """A fixed token list: ``SPECIALS`` first, then ``tokens`` in the given order.

    Args:
      tokens: the task's tokens (duplicates and special tokens are dropped).
    """

    def __init__(self, tokens: Iterable[str]):
        self.tokens: list[str] = list(SPECIALS)
        for token in tokens:
            if token not in self.tokens:
                self.tokens.append(token)
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[str]]) -> Vocabulary:
        """The sorted set of tokens in ``sequences`` (deterministic whatever their order)."""
        return cls(sorted({token for sequence in sequences for token in sequence}))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def encode(self, tokens: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids, optionally with ``<bos>`` / ``<eos>``; an unknown token raises."""
        unknown = [t for t in tokens if t not in self._ids]
        if unknown:
            raise ValueError(f"Vocabulary.encode: unknown token(s) {sorted(set(unknown))}")
        return [BOS] * bos + [self._ids[t] for t in tokens] + [EOS] * eos

    def decode(self, ids: Iterable[int], *, strip: bool = True) -> list[str]:
        """Tokens of ``ids``; with ``strip``, stops at ``<eos>`` and drops ``<pad>``/``<bos>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == EOS:
                break
            if strip and i in (PAD, BOS):
                continue
            out.append(self.tokens[i])
        return out


def pad_sequences(sequences: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
    """Right-pads integer sequences with ``PAD``: ``[num_sequences, length]`` int32.

    ``length`` defaults to the longest sequence; a longer sequence raises ``ValueError``.
    """
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"pad_sequences: a sequence of length {longest} exceeds length {length}")
    out = np.full((len(sequences), length), PAD, np.int32)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = sequence
    return out
