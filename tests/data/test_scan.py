"""SCAN: the grammar's 20,910 commands, their interpretation and the paper's splits."""

from __future__ import annotations

import collections

import pytest

from attn_jax.data import scan


def test_grammar_generates_exactly_the_papers_20910_distinct_commands():
    pairs = scan.all_pairs()
    assert len(pairs) == len({c for c, _ in pairs}) == 20_910
    lengths = [len(a.split()) for _, a in pairs]
    assert min(lengths) == 1 and max(lengths) == 48
    assert 23 not in lengths  # hence the length split's 22 / 24 boundary
    words = collections.Counter(w for c, _ in pairs for w in c.split())
    assert set(words) == {
        "walk", "look", "run", "jump", "turn", "left", "right", "opposite", "around",
        "twice", "thrice", "and", "after",
    }  # fmt: skip


@pytest.mark.parametrize(
    "command, actions",
    [  # Figure 1 and the interpretation rules of Lake & Baroni (2018)
        ("jump", "JUMP"),
        ("jump left", "LTURN JUMP"),
        ("jump around right", "RTURN JUMP RTURN JUMP RTURN JUMP RTURN JUMP"),
        ("turn left twice", "LTURN LTURN"),
        ("turn around right", "RTURN RTURN RTURN RTURN"),
        ("turn opposite left", "LTURN LTURN"),
        ("jump thrice", "JUMP JUMP JUMP"),
        ("jump opposite left and walk thrice", "LTURN LTURN JUMP WALK WALK WALK"),
        (
            "jump opposite left after walk around left",
            "LTURN WALK LTURN WALK LTURN WALK LTURN WALK LTURN LTURN JUMP",
        ),
        ("look right twice after run", "RUN RTURN LOOK RTURN LOOK"),
    ],
)
def test_interpretation_follows_the_papers_rules(command, actions):
    names = {"LTURN": "I_TURN_LEFT", "RTURN": "I_TURN_RIGHT"}
    expected = [names.get(a, f"I_{a}") for a in actions.split()]
    assert scan.interpret(command) == expected
    assert dict(scan.all_pairs())[command] == " ".join(expected)


def test_interpret_rejects_non_commands():
    with pytest.raises(ValueError, match="not a SCAN command"):
        scan.interpret("jump sideways")


@pytest.mark.parametrize("split", scan.SPLITS)
def test_split_sizes_are_the_papers(split):
    train, test = scan.make_split(split, seed=0)
    assert (len(train), len(test)) == scan.SPLIT_SIZES[split]
    everything = set(scan.all_pairs())
    assert set(train) <= everything and set(test) <= everything
    assert not {c for c, _ in train} & {c for c, _ in test}


def test_length_split_trains_on_at_most_22_actions_and_tests_on_24_to_48():
    train, test = scan.make_split("length")
    assert max(len(a.split()) for _, a in train) == 22
    assert {len(a.split()) for _, a in test} <= set(range(24, 49))
    assert (len(train), len(test)) == (16_990, 3_920)


def test_jump_split_shows_jump_only_in_isolation_as_a_tenth_of_training():
    train, test = scan.make_split("addprim_jump")
    with_jump = [c for c, _ in train if "jump" in c.split()]
    assert set(with_jump) == {"jump"} and len(with_jump) == 1_467
    assert len(with_jump) / len(train) == pytest.approx(0.1)
    assert all("jump" in c.split() and c != "jump" for c, _ in test)


def test_simple_split_is_random_by_seed_and_the_others_are_fixed_sets():
    a, b, c = (scan.make_split("simple", seed) for seed in (0, 0, 1))
    assert a == b and set(a[1]) != set(c[1])
    for split in ("length", "addprim_jump"):
        x, y = scan.make_split(split, 0), scan.make_split(split, 1)
        assert sorted(x[1]) == sorted(y[1]) and x[1] != y[1]  # same pairs, shuffled


def test_unknown_split_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="split: expected one of"):
        scan.make_split("around_right")
