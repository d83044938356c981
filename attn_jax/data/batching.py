"""Deterministic, step-indexed batching of in-memory datasets.

The batch for step ``s`` is a pure function of ``(seed, s)``: each epoch is a fresh
permutation drawn from ``seed`` and the epoch number, so a run resumed at step ``s``
continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ArrayDataset"]


class ArrayDataset:
    """Arrays sharing a leading example axis, e.g. ``{"inputs": ..., "labels": ...}``."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int = 0):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ArrayDataset: arrays differ in length: {sizes}")
        self.arrays, self.seed = arrays, seed
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {  # keep the current and next epochs only
                e: p for e, p in self._permutations.items() if e >= epoch - 1
            }
            rng = np.random.default_rng((self.seed, epoch))
            self._permutations[epoch] = rng.permutation(len(self))
        return self._permutations[epoch]

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step``: ``{name: [batch_size, ...]}``."""
        positions = step * batch_size + np.arange(batch_size)
        epochs, offsets = np.divmod(positions, len(self))
        index = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            index[chosen] = self._permutation(int(epoch))[offsets[chosen]]
        return {k: v[index] for k, v in self.arrays.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Sequential batches covering every example once (evaluation); the last one may
        be smaller."""
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.arrays.items()}
