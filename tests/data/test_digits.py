"""8x8 digits: stratified split and sequential-pixel tokens."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from attn_jax.data.digits import (
    NUM_CLASSES,
    PIXEL_VOCAB_SIZE,
    DigitsSplit,
    load_digits_split,
    pixel_tokens,
)


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


def _keys(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return [(x.tobytes(), int(y)) for x, y in zip(images, labels, strict=True)]


def test_shapes_dtypes_and_ranges(split):
    assert split.train_images.shape == (1437, 8, 8, 1)
    assert split.test_images.shape == (360, 8, 8, 1)
    assert split.train_labels.shape == (1437,) and split.test_labels.shape == (360,)
    for images, labels in [
        (split.train_images, split.train_labels),
        (split.test_images, split.test_labels),
    ]:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.min() == 0.0 and images.max() == 1.0
        levels = images * 16
        np.testing.assert_array_equal(levels, np.round(levels))  # exact levels 0..16
        assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_split_is_a_stratified_partition_of_the_dataset(split):
    from sklearn.datasets import load_digits

    digits = load_digits()
    full = collections.Counter(
        _keys(digits.images.astype(np.float32)[..., None] / 16, digits.target)
    )
    train = _keys(split.train_images, split.train_labels)
    test = _keys(split.test_images, split.test_labels)
    assert collections.Counter(train) + collections.Counter(test) == full  # every example once
    assert not {x for x, _ in train} & {x for x, _ in test}  # no image in both
    total = np.bincount(digits.target, minlength=NUM_CLASSES)
    in_test = np.bincount(split.test_labels, minlength=NUM_CLASSES)
    assert np.all(np.abs(in_test - 0.2 * total) <= 1)  # class proportions kept


def test_deterministic_by_seed_and_fraction(split):
    again, other = load_digits_split(seed=0), load_digits_split(seed=1)
    np.testing.assert_array_equal(split.train_images, again.train_images)
    np.testing.assert_array_equal(split.test_labels, again.test_labels)
    assert not np.array_equal(split.train_labels, other.train_labels)
    half = load_digits_split(seed=0, test_fraction=0.5)
    assert len(half.train_labels) == 898 and len(half.test_labels) == 899


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_names_the_field(fraction):
    with pytest.raises(ValueError, match=r"^test_fraction: must be in"):
        load_digits_split(test_fraction=fraction)


def test_pixel_tokens_range_and_dtype(split):
    tokens = pixel_tokens(split.train_images)
    assert tokens.shape == (1437, 64) and tokens.dtype == np.int32
    assert tokens.min() == 3 and tokens.max() == PIXEL_VOCAB_SIZE - 1 == 19
    expected = 3 + np.round(split.train_images * 16).reshape(-1, 64)
    np.testing.assert_array_equal(tokens, expected)


def test_pixel_tokens_are_in_raster_order():
    levels = (np.arange(2 * 64).reshape(2, 8, 8, 1) * 5) % 17  # distinct levels per position
    tokens = pixel_tokens(levels.astype(np.float32) / 16)
    for i in range(2):
        for row in range(8):
            for col in range(8):
                assert tokens[i, 8 * row + col] == 3 + levels[i, row, col, 0]
    np.testing.assert_array_equal(pixel_tokens(levels[..., 0] / 16), tokens)  # [n, 8, 8] too


def test_pixel_tokens_rejects_out_of_range_pixels():
    with pytest.raises(ValueError, match=r"^images:"):
        pixel_tokens(np.full((1, 8, 8, 1), 16.0, np.float32))  # unscaled levels
