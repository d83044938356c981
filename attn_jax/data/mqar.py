"""Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology").

Each example lists ``num_kv_pairs`` key-value pairs, ``k1 v1 k2 v2 ...``, then, in the
rest of the sequence, every key is queried once: the model must predict the key's value
at the position right after the query key. Keys come from the first half of the
vocabulary, values from the second; query gaps follow Zoology's power law; positions that
are neither pairs nor queries hold random tokens; the loss covers answer positions only.
This follows the generator in the Zoology repository (``multiquery_ar``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["IGNORE", "MQARConfig", "make_mqar"]

IGNORE = -100  # label of positions that carry no loss


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Task sizes. ``seq_len`` is the input length (even, >= 4 * num_kv_pairs)."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def validate(self, prefix: str = "data") -> None:
        """Raises ``ValueError`` naming the offending field."""
        if self.seq_len % 2 or self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(
                f"{prefix}.seq_len: must be even and >= 4 * num_kv_pairs "
                f"({4 * self.num_kv_pairs}), got {self.seq_len}"
            )
        if self.num_kv_pairs < 1:
            raise ValueError(f"{prefix}.num_kv_pairs: must be >= 1, got {self.num_kv_pairs}")
        if self.vocab_size <= self.seq_len or self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"{prefix}.vocab_size: must exceed seq_len ({self.seq_len}) and hold "
                f"num_kv_pairs distinct keys, got {self.vocab_size}"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"{prefix}.power_a: must be in (0, 1], got {self.power_a}")


def _distinct(rng: np.random.Generator, low: int, high: int, n: int, k: int) -> np.ndarray:
    """``[n, k]`` integers in ``[low, high)``, distinct within each row, uniformly drawn."""
    out = rng.integers(low, high, size=(n, k))
    while True:
        ordered = np.sort(out, axis=1)
        clash = (np.diff(ordered, axis=1) == 0).any(axis=1)
        if not clash.any():
            return out
        out[clash] = rng.integers(low, high, size=(int(clash.sum()), k))


def make_mqar(config: MQARConfig, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``num_examples`` MQAR examples, deterministically from ``seed``.

    Returns:
      ``inputs [num_examples, seq_len]`` int32 tokens and ``labels [num_examples, seq_len]``
      int32 targets: the value at each answer position (the query key's position), and
      :data:`IGNORE` elsewhere.
    """
    config.validate()
    rng = np.random.default_rng(seed)
    n, k = num_examples, config.num_kv_pairs
    context = 2 * k
    key_vocab = config.vocab_size // 2
    keys = _distinct(rng, 1, key_vocab, n, k)
    values = _distinct(rng, key_vocab, config.vocab_size, n, k)
    kvs = np.zeros((n, context), np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    # Query slots: every other position after the pairs, gaps drawn from a power law.
    space = (config.seq_len - context) // 2
    p = config.power_a * np.arange(1, space + 1) ** (config.power_a - 1)
    p /= p.sum()
    # Weighted sampling without replacement by the Gumbel-top-k trick.
    perturbed = np.log(p) + rng.gumbel(size=(n, space))
    gaps = np.argsort(-perturbed, axis=1)[:, :k]
    queries = np.zeros((n, config.seq_len - context + 1), np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((n, config.seq_len + 1), IGNORE, np.int64)
    np.put_along_axis(labels, 2 * gaps + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    if config.random_non_queries:
        noise = rng.integers(config.vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)
