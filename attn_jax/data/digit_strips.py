"""Strips of scikit-learn digits side by side, captioned with the digits' English words.

A strip of ``k`` digits is ``k`` 8x8 images of :mod:`attn_jax.data.digits` placed left to
right, ``8 x 8k`` pixels, captioned ``"seven two nine"``. Strips are left-aligned on one
canvas for every split, ``8 x 8 * canvas_digits`` pixels (48 wide for 6 digits), the rest
zero: zero is the digits' blank background, so the padding is blank paper, not masked (a
model sees the whole canvas and must notice where the ink ends). ``lengths`` and
``digits`` keep the truth for evaluation.

:func:`make_digit_strips` builds train strips from the digits' train images and test strips
from its test images (the stratified split of :func:`attn_jax.data.digits.load_digits_split`),
so no test strip contains an image seen in training; by default train strips have 3-5
digits and test strips 3-6 (longer than any training caption). With ``valid_fraction``, a
stratified share of the train images is held out of the train strips for validation
strips (training lengths), which monitor training without reading the test images.
Everything is a function of the arguments (``seed``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attn_jax.data import digits as digits_data
from attn_jax.data.vocab import Vocabulary

__all__ = [
    "DIGIT_SIZE",
    "WORDS",
    "DigitStrips",
    "caption",
    "make_digit_strips",
    "make_strips",
    "vocabulary",
]

DIGIT_SIZE = 8  # each digit image is 8x8 pixels
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def vocabulary() -> Vocabulary:
    """``Vocabulary(WORDS)``: the specials (``<pad>``, ``<bos>``, ``<eos>``), then the ten
    words; digit ``d`` has id ``3 + d``."""
    return Vocabulary(WORDS)


def caption(digit_row: np.ndarray) -> list[str]:
    """English words of a row of digit classes, stopping at the first negative entry
    (padding): ``[7, 2, 9, -1]`` -> ``["seven", "two", "nine"]``."""
    words = []
    for d in np.asarray(digit_row).tolist():
        if d < 0:
            break
        words.append(WORDS[d])
    return words


@dataclasses.dataclass(frozen=True, eq=False)
class DigitStrips:
    """Captioned strips (``eq=False``: arrays do not compare as a bool).

    Attributes:
      images: ``[n, 8, 8 * canvas_digits]`` float32 in ``[0, 1]``; digit ``j`` of a strip
        occupies columns ``8j .. 8j + 7``; columns past its last digit are 0.
      digits: ``[n, canvas_digits]`` int32 classes 0..9, ``-1`` past the strip's length.
      sources: ``[n, canvas_digits]`` int32 indices of the digit images in the pool they
        were drawn from, ``-1`` past the length.
      lengths: ``[n]`` int32 digits per strip.
    """

    images: np.ndarray
    digits: np.ndarray
    sources: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def captions(self) -> list[list[str]]:
        """Each strip's caption as a word list."""
        return [caption(row) for row in self.digits]


def make_strips(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    min_digits: int,
    max_digits: int,
    canvas_digits: int,
    seed: int | tuple[int, ...],
) -> DigitStrips:
    """``count`` strips from a pool of digit images.

    Each strip's length is uniform in ``min_digits .. max_digits``; its digits are drawn
    uniformly from the pool (with replacement: an image may recur in different strips).

    Args:
      images: ``[m, 8, 8]`` or ``[m, 8, 8, 1]`` in ``[0, 1]``; labels: ``[m]`` classes.
      canvas_digits: canvas width in digits (``>= max_digits``).
      seed: seeds ``np.random.default_rng`` (an int or a tuple of ints).

    Returns:
      :class:`DigitStrips` with ``images [count, 8, 8 * canvas_digits]``.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
        raise ValueError(f"images: expected [m, 8, 8], got shape {images.shape}")
    if len(labels) != len(images) or not len(images):
        raise ValueError(f"labels: expected {len(images)} labels (> 0), got {len(labels)}")
    if not 1 <= min_digits <= max_digits <= canvas_digits:
        raise ValueError(
            f"min_digits / max_digits / canvas_digits: expected 1 <= {min_digits} <= "
            f"{max_digits} <= {canvas_digits}"
        )
    if count < 0:
        raise ValueError(f"count: expected >= 0, got {count}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_digits, max_digits + 1, size=count).astype(np.int32)
    sources = rng.integers(0, len(images), size=(count, canvas_digits)).astype(np.int32)
    present = np.arange(canvas_digits)[None, :] < lengths[:, None]  # [count, canvas]
    sources = np.where(present, sources, -1)
    tiles = images[np.maximum(sources, 0)] * present[..., None, None]  # [count, canvas, 8, 8]
    strip = tiles.transpose(0, 2, 1, 3).reshape(count, DIGIT_SIZE, canvas_digits * DIGIT_SIZE)
    classes = np.where(present, np.asarray(labels, np.int32)[np.maximum(sources, 0)], -1)
    return DigitStrips(
        images=np.ascontiguousarray(strip, np.float32),
        digits=classes.astype(np.int32),
        sources=sources,
        lengths=lengths,
    )


def make_digit_strips(
    num_train: int,
    num_test: int,
    *,
    train_lengths: tuple[int, int] = (3, 5),
    test_lengths: tuple[int, int] = (3, 6),
    seed: int = 0,
    test_fraction: float = 0.2,
    num_valid: int = 0,
    valid_fraction: float = 0.1,
) -> dict[str, DigitStrips]:
    """Train strips from the digits' train images, test strips from its test images, and
    optionally validation strips from train images that no train strip uses.

    Args:
      num_train / num_test: strips per split.
      train_lengths / test_lengths: ``(min, max)`` digits per strip, inclusive (validation
        strips: ``train_lengths``).
      seed: the image splits (:func:`~attn_jax.data.digits.load_digits_split`, then the
        validation images) and the strips (streams ``(seed, 0)`` for train, ``(seed, 1)``
        for test, ``(seed, 2)`` for validation).
      test_fraction: the digits' test share (0.2: 1,437 train / 360 test images).
      num_valid: validation strips; 0: none, and every train image makes train strips.
      valid_fraction: with ``num_valid``, the share of the train images held out for them,
        stratified by class (0.1: 144 of 1,437, leaving 1,293 for the train strips).

    Returns:
      ``{"train", "test"[, "valid"]}``: :class:`DigitStrips` on one canvas,
      ``max(train_lengths[1], test_lengths[1])`` digits wide; ``sources`` index the split's
      own pool of images, and no two splits share an image.
    """
    split = digits_data.load_digits_split(seed, test_fraction)
    canvas = max(train_lengths[1], test_lengths[1])
    make = lambda images, labels, count, lengths, stream: make_strips(
        images,
        labels,
        count,
        min_digits=lengths[0],
        max_digits=lengths[1],
        canvas_digits=canvas,
        seed=(seed, stream),
    )
    kept = np.arange(len(split.train_labels))
    strips = {}
    if num_valid:
        from sklearn.model_selection import train_test_split

        if not 0 < valid_fraction < 1:
            raise ValueError(f"valid_fraction: expected a float in (0, 1), got {valid_fraction}")
        kept, held = (
            np.sort(part)
            for part in train_test_split(
                kept, test_size=valid_fraction, stratify=split.train_labels, random_state=seed
            )
        )
        images, labels = split.train_images[held], split.train_labels[held]
        strips["valid"] = make(images, labels, num_valid, train_lengths, 2)
    images, labels = split.train_images[kept], split.train_labels[kept]
    return {
        "train": make(images, labels, num_train, train_lengths, 0),
        "test": make(split.test_images, split.test_labels, num_test, test_lengths, 1),
        **strips,
    }
