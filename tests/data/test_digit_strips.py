"""Digit strips: deterministic, captions that match the digits, lengths, a canvas padded
with blank paper, and train / validation / test strips drawn from disjoint images."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from attn_jax.data import digit_strips, digits
from attn_jax.data.vocab import BOS, EOS


@functools.cache
def _strips(seed: int = 0) -> dict[str, digit_strips.DigitStrips]:
    return digit_strips.make_digit_strips(300, 200, seed=seed)


def test_same_seed_same_strips_other_seed_other_strips():
    again = digit_strips.make_digit_strips(300, 200, seed=0)
    for name, strips in _strips(0).items():
        np.testing.assert_array_equal(again[name].images, strips.images)
        np.testing.assert_array_equal(again[name].digits, strips.digits)
    assert not np.array_equal(_strips(1)["train"].images, _strips(0)["train"].images)


def test_lengths_canvas_and_padding():
    train, test = _strips()["train"], _strips()["test"]
    assert train.images.shape == (300, 8, 48) and test.images.shape == (200, 8, 48)
    assert set(train.lengths.tolist()) == {3, 4, 5}
    assert set(test.lengths.tolist()) == {3, 4, 5, 6}
    for strips in (train, test):
        for image, length, row in zip(strips.images, strips.lengths, strips.digits, strict=True):
            assert (image[:, 8 * length :] == 0).all()  # blank paper after the last digit
            assert (row[:length] >= 0).all() and (row[length:] == -1).all()
        assert strips.images.dtype == np.float32
        assert strips.images.min() >= 0.0 and strips.images.max() <= 1.0


def test_captions_are_the_words_of_the_digits_drawn():
    split = digits.load_digits_split(0)
    strips = _strips()["train"]
    for image, row, sources, words in zip(
        strips.images, strips.digits, strips.sources, strips.captions(), strict=True
    ):
        assert words == [digit_strips.WORDS[d] for d in row if d >= 0]
        for j, source in enumerate(sources[: len(words)]):
            np.testing.assert_array_equal(
                image[:, 8 * j : 8 * j + 8], split.train_images[source, ..., 0]
            )
            assert split.train_labels[source] == row[j]
    vocab = digit_strips.vocabulary()
    assert vocab.encode(["zero", "nine"], bos=True, eos=True) == [BOS, 3, 12, EOS]
    assert digit_strips.caption(np.array([7, 2, 9, -1])) == ["seven", "two", "nine"]


def test_test_strips_use_only_unseen_images():
    split = digits.load_digits_split(0)
    seen = {image[..., 0].tobytes() for image in split.train_images}
    test = _strips()["test"]
    tiles = [
        image[:, 8 * j : 8 * j + 8]
        for image, length in zip(test.images, test.lengths, strict=True)
        for j in range(length)
    ]
    assert len(tiles) == test.lengths.sum()
    assert not any(np.ascontiguousarray(tile).tobytes() in seen for tile in tiles)


def test_bad_arguments_name_the_argument():
    images, labels = np.zeros((4, 8, 8)), np.zeros(4, int)
    with pytest.raises(ValueError, match="min_digits / max_digits / canvas_digits"):
        digit_strips.make_strips(
            images, labels, 2, min_digits=3, max_digits=7, canvas_digits=6, seed=0
        )
    with pytest.raises(ValueError, match="images: expected"):
        digit_strips.make_strips(
            np.zeros((4, 8, 9)), labels, 2, min_digits=1, max_digits=2, canvas_digits=2, seed=0
        )


def _tiles(strips: digit_strips.DigitStrips) -> set[bytes]:
    return {
        np.ascontiguousarray(image[:, 8 * j : 8 * j + 8]).tobytes()
        for image, length in zip(strips.images, strips.lengths, strict=True)
        for j in range(length)
    }


def test_validation_strips_hold_out_train_images():
    strips = digit_strips.make_digit_strips(300, 200, num_valid=100, seed=0)
    valid, train = _tiles(strips["valid"]), _tiles(strips["train"])
    assert not valid & train and not valid & _tiles(strips["test"])
    split = digits.load_digits_split(0)
    pool = {image[..., 0].tobytes() for image in split.train_images}
    assert valid <= pool and set(strips["valid"].lengths.tolist()) == {3, 4, 5}
    assert set(strips["valid"].digits[strips["valid"].digits >= 0].tolist()) == set(range(10))
    np.testing.assert_array_equal(strips["test"].images, _strips()["test"].images)  # unchanged
    again = digit_strips.make_digit_strips(300, 200, num_valid=100, seed=0)["valid"]
    np.testing.assert_array_equal(again.images, strips["valid"].images)
