"""Synthetic decoder-LM tasks for length generalisation: copying and induction heads.

Both train on short sequences and can be evaluated on longer ones (``length`` /
``seq_len`` arguments). Token ids: ``PAD`` 0, ``BOS`` 1, ``EOS`` 2 (as in
:mod:`attn_jax.data.vocab`), ``SEP`` 3 for copying and ``TRIGGER`` 3 for induction, and
symbols ``SYMBOL_OFFSET .. SYMBOL_OFFSET + num_symbols - 1``; a task's ``vocab_size`` is
``num_symbols + 4``.

* Copy: ``[BOS, x1..xn, SEP, x1..xn, EOS]``; the loss covers the copy and ``EOS``.
* Induction (the H3 "induction head" task; Fu et al., 2023, "Hungry Hungry Hippos"):
  random symbols in which ``TRIGGER`` occurs twice, once followed by a target symbol and
  once at the last position; the model must predict the target after the last trigger.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax.data.mqar import IGNORE
from attn_jax.data.vocab import BOS, EOS, PAD

__all__ = [
    "SEP",
    "SYMBOL_OFFSET",
    "TRIGGER",
    "CopyConfig",
    "InductionConfig",
    "make_copy",
    "make_induction",
]

SEP = 3  # separates the source from its copy
TRIGGER = 3  # the induction task's trigger token
SYMBOL_OFFSET = 4  # first symbol id


@dataclasses.dataclass(frozen=True)
class CopyConfig:
    """Copy-task sizes: source lengths are uniform in ``[min_len, max_len]``."""

    num_symbols: int = 16
    min_len: int = 1
    max_len: int = 16

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + SYMBOL_OFFSET

    def validate(self, prefix: str = "data") -> None:
        """Raises ``ValueError`` naming the offending field."""
        if self.num_symbols < 1:
            raise ValueError(f"{prefix}.num_symbols: must be >= 1, got {self.num_symbols}")
        if self.min_len < 1:
            raise ValueError(f"{prefix}.min_len: must be >= 1, got {self.min_len}")
        if self.max_len < self.min_len:
            raise ValueError(
                f"{prefix}.max_len: must be >= min_len ({self.min_len}), got {self.max_len}"
            )


@dataclasses.dataclass(frozen=True)
class InductionConfig:
    """Induction-task sizes: ``seq_len`` (>= 4) symbols per example."""

    num_symbols: int = 16
    seq_len: int = 32

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + SYMBOL_OFFSET

    def validate(self, prefix: str = "data") -> None:
        """Raises ``ValueError`` naming the offending field."""
        if self.num_symbols < 1:
            raise ValueError(f"{prefix}.num_symbols: must be >= 1, got {self.num_symbols}")
        if self.seq_len < 4:
            raise ValueError(f"{prefix}.seq_len: must be >= 4, got {self.seq_len}")


def make_copy(
    config: CopyConfig, num_examples: int, seed: int, *, length: int | None = None
) -> dict[str, np.ndarray]:
    """Generates ``num_examples`` copy examples, deterministically from ``seed``.

    Each example has a source length ``n`` uniform in ``[min_len, max_len]`` (or exactly
    ``length`` when given, which may exceed ``max_len``: evaluation at longer lengths) and
    uniform symbols ``x1..xn``; its sequence is ``s = [BOS, x1..xn, SEP, x1..xn, EOS]``.

    Returns:
      ``inputs [num_examples, 2 * L + 2]`` int32: ``s[:-1]`` right-padded with ``PAD``, and
      ``labels [num_examples, 2 * L + 2]`` int32: ``s[1:]`` with :data:`IGNORE` before the
      ``SEP`` position (``n + 1``) and as padding, so ``n + 1`` labels (``x1..xn, EOS``)
      carry loss; ``L`` is ``max_len``, or ``length`` when given.
    """
    config.validate()
    if length is not None and length < 1:
        raise ValueError(f"length: must be >= 1, got {length}")
    if num_examples < 0:
        raise ValueError(f"num_examples: must be >= 0, got {num_examples}")
    rng = np.random.default_rng(seed)
    longest = config.max_len if length is None else length
    if length is None:
        n = rng.integers(config.min_len, config.max_len + 1, size=(num_examples, 1))
    else:
        n = np.full((num_examples, 1), length, np.int64)
    symbols = rng.integers(
        SYMBOL_OFFSET, SYMBOL_OFFSET + config.num_symbols, size=(num_examples, longest)
    )
    # The whole sequence s, [num_examples, 2 * L + 3]: k is the position in s.
    k = np.arange(2 * longest + 3)[None, :]
    source = symbols[:, np.clip(k[0] - 1, 0, longest - 1)]  # x_k
    copy = np.take_along_axis(symbols, np.clip(k - n - 2, 0, longest - 1), axis=1)
    s = np.where(k == 0, BOS, PAD)
    s = np.where((k >= 1) & (k <= n), source, s)
    s = np.where(k == n + 1, SEP, s)
    s = np.where((k >= n + 2) & (k <= 2 * n + 1), copy, s)
    s = np.where(k == 2 * n + 2, EOS, s)
    targets = np.where((k >= n + 2) & (k <= 2 * n + 2), s, IGNORE)  # copy and EOS
    inputs = np.where(k <= 2 * n + 1, s, PAD)[:, :-1]  # s[:-1], so never EOS
    labels = targets[:, 1:]
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}


def make_induction(
    config: InductionConfig, num_examples: int, seed: int, *, seq_len: int | None = None
) -> dict[str, np.ndarray]:
    """Generates ``num_examples`` induction-head examples, deterministically from ``seed``.

    Each example is ``seq_len`` uniform symbols (``config.seq_len`` unless ``seq_len`` is
    given, for evaluation at longer lengths) in which ``TRIGGER`` appears exactly twice: at
    a position ``p`` uniform in ``[0, seq_len - 3]``, followed by the target symbol at
    ``p + 1``, and at the last position ``seq_len - 1``.

    Returns:
      ``inputs [num_examples, seq_len]`` int32 tokens, ``positions [num_examples, 1]`` int32
      (``seq_len - 1``, where the answer is predicted) and ``answers [num_examples, 1]``
      int32 (the target symbol).
    """
    if seq_len is not None:
        config = dataclasses.replace(config, seq_len=seq_len)
    config.validate()
    if num_examples < 0:
        raise ValueError(f"num_examples: must be >= 0, got {num_examples}")
    rng = np.random.default_rng(seed)
    length = config.seq_len
    inputs = rng.integers(
        SYMBOL_OFFSET, SYMBOL_OFFSET + config.num_symbols, size=(num_examples, length)
    )
    p = rng.integers(0, length - 2, size=(num_examples, 1))  # uniform in [0, length - 3]
    answers = np.take_along_axis(inputs, p + 1, axis=1)
    np.put_along_axis(inputs, p, TRIGGER, axis=1)
    inputs[:, -1] = TRIGGER
    positions = np.full((num_examples, 1), length - 1, np.int32)
    return {
        "inputs": inputs.astype(np.int32),
        "positions": positions,
        "answers": answers.astype(np.int32),
    }
