"""Packing several examples into each row of a batch (sequence packing).

Examples are placed greedily, in order, into rows of ``row_length`` tokens; each keeps its
own positions (restarting at 0) and a segment id (1, 2, ... within its row; 0 marks the
padding at a row's end), so that a model with segment-aware attention computes, for every
example, exactly what it would compute for it alone, with fewer padded tokens.
"""

from __future__ import annotations

import numpy as np

from attn_jax.data.mqar import IGNORE

__all__ = ["example_lengths", "pack"]


def example_lengths(labels: np.ndarray) -> np.ndarray:
    """``[num_examples]``: the tokens an example needs, up to its last label that carries
    loss (later tokens cannot change a causal model's predictions)."""
    carries = labels != IGNORE
    last = labels.shape[1] - 1 - np.argmax(carries[:, ::-1], axis=1)
    return np.where(carries.any(1), last + 1, 0).astype(np.int64)


def pack(inputs: np.ndarray, labels: np.ndarray, row_length: int) -> dict[str, np.ndarray]:
    """Packs ``inputs`` / ``labels [num_examples, length]`` (``labels`` :data:`IGNORE` where
    there is no loss) into rows.

    Args:
      inputs: ``[num_examples, length]`` tokens.
      labels: ``[num_examples, length]`` targets.
      row_length: tokens per packed row (at least the longest example).

    Returns:
      ``{"inputs", "labels", "segment_ids", "token_positions"}``, each ``[rows,
      row_length]`` int32 (labels :data:`IGNORE` and segment id 0 on the padding).
    """
    lengths = example_lengths(labels)
    if row_length < int(lengths.max(initial=0)):
        raise ValueError(
            f"config.data.pack_length: {row_length} is shorter than the longest example "
            f"({int(lengths.max())} tokens)"
        )
    rows: list[list[int]] = []
    used = row_length  # forces a first row
    for index, length in enumerate(lengths):
        if used + length > row_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += int(length)
    out = {
        "inputs": np.zeros((len(rows), row_length), np.int32),
        "labels": np.full((len(rows), row_length), IGNORE, np.int32),
        "segment_ids": np.zeros((len(rows), row_length), np.int32),
        "token_positions": np.zeros((len(rows), row_length), np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            n = int(lengths[index])
            span = slice(start, start + n)
            out["inputs"][r, span] = inputs[index, :n]
            out["labels"][r, span] = labels[index, :n]
            out["segment_ids"][r, span] = segment
            out["token_positions"][r, span] = np.arange(n)
            start += n
    return out
