"""scikit-learn's bundled 8x8 handwritten digits (no download), for image classification.

1797 grey-scale images of the digits 0..9, pixel levels 0..16. :func:`load_digits_split`
gives a stratified train/test split with pixels scaled to ``[0, 1]``; :func:`pixel_tokens`
turns images into sequential-pixel classification inputs (one token per pixel, raster
order), with ids 0..2 left to ``PAD``/``BOS``/``EOS`` of :mod:`attn_jax.data.vocab`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "IMAGE_SHAPE",
    "MAX_LEVEL",
    "NUM_CLASSES",
    "PIXEL_OFFSET",
    "PIXEL_VOCAB_SIZE",
    "DigitsSplit",
    "load_digits_split",
    "pixel_tokens",
]

IMAGE_SHAPE = (8, 8, 1)  # height, width, channels
NUM_CLASSES = 10
MAX_LEVEL = 16  # pixel levels are 0..MAX_LEVEL
PIXEL_OFFSET = 3  # token of pixel level v is PIXEL_OFFSET + v: 0..2 stay PAD/BOS/EOS
PIXEL_VOCAB_SIZE = PIXEL_OFFSET + MAX_LEVEL + 1  # 20


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsSplit:
    """A train/test split of the digits (``eq=False``: arrays do not compare as a bool).

    Attributes:
      train_images: ``[num_train, 8, 8, 1]`` float32 in ``[0, 1]`` (level / 16).
      train_labels: ``[num_train]`` int32 classes 0..9.
      test_images: ``[num_test, 8, 8, 1]`` float32 in ``[0, 1]``.
      test_labels: ``[num_test]`` int32 classes 0..9.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The 1797 digits split into train and test, stratified by class, deterministic by seed.

    ``test_fraction`` (in ``(0, 1)``) of the examples go to the test set, rounded up as
    scikit-learn's ``train_test_split`` does (0.2 gives 1437 train and 360 test images).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / MAX_LEVEL).astype(np.float32)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int32)  # [1797]
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return DigitsSplit(
        train_images=np.ascontiguousarray(train_x),
        train_labels=np.ascontiguousarray(train_y),
        test_images=np.ascontiguousarray(test_x),
        test_labels=np.ascontiguousarray(test_y),
    )


def pixel_tokens(images: np.ndarray) -> np.ndarray:
    """Sequential-pixel tokens: ``[n, 8, 8, 1]`` (or ``[n, 8, 8]``) images in ``[0, 1]`` to
    ``[n, 64]`` int32 tokens in raster order (row by row, left to right).

    A pixel's token is ``PIXEL_OFFSET + round(pixel * 16)``, in ``3 .. PIXEL_VOCAB_SIZE - 1``;
    ids 0..2 (``PAD``/``BOS``/``EOS``) never occur. Any ``[n, ...]`` array is flattened
    per example the same way.
    """
    images = np.asarray(images)
    if images.ndim < 1:
        raise ValueError(f"images: must have a leading example axis, got shape {images.shape}")
    if not ((images >= 0) & (images <= 1)).all():  # also rejects NaN
        raise ValueError("images: pixel values must lie in [0, 1]")
    levels = np.rint(images.reshape(images.shape[0], -1).astype(np.float64) * MAX_LEVEL)
    return (levels + PIXEL_OFFSET).astype(np.int32)
