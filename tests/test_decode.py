"""Greedy, sampling and beam search on hand-made step functions, and ``decode.generate``.

The step functions are Markov chains over a fixed table of next-token probabilities, so
the best sequences are known exactly. Tokens: 0 = pad, 1 = start, 2 = EOS.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import decode
from attn_jax.models import TransformerLM, TransformerOptions
from tests.models.random_params import random_params

PAD, START, EOS = 0, 1, 2
A, B, C, D = 3, 4, 5, 6
TINY = 1e-4  # probability of every token a table row does not mention


def _table(rows: dict[int, dict[int, float]], vocab: int) -> np.ndarray:
    """Log-probabilities ``[vocab, vocab]``: row = previous token, column = next token."""
    probs = np.full((vocab, vocab), TINY)
    for prev, nexts in rows.items():
        for token, p in nexts.items():
            probs[prev, token] = p
    probs /= probs.sum(-1, keepdims=True)
    return np.log(probs).astype(np.float32)


def _markov(table: np.ndarray, calls: list[int] | None = None):
    """``step_fn`` with a scalar step counter as state; ``calls`` records its values."""
    table = jnp.asarray(table)

    def step_fn(counter, tokens):
        if calls is not None:
            jax.debug.callback(lambda c: calls.append(int(c)), counter)
        return table[tokens], counter + 1

    return step_fn


def _start(batch: int, token: int = START) -> jax.Array:
    return jnp.full((batch,), token, jnp.int32)


def _logp(table: np.ndarray, first: int, seq) -> float:
    prev, total = first, 0.0
    for token in seq:
        total += float(table[prev, token])
        prev = token
    return total


# From START: A is likelier than B, but A's successors are flat and B's are peaked, so the
# greedy path (A, .) is less likely than (B, C).
TRAP = _table(
    {START: {A: 0.55, B: 0.45}, A: {C: 0.34, D: 0.33, B: 0.33}, B: {C: 0.95}, C: {}, D: {}},
    vocab=7,
)


def test_beam_search_beats_greedy():
    greedy = decode.sample_search(_markov(TRAP), 0, _start(1), max_len=2)
    np.testing.assert_array_equal(greedy, [[A, C]])
    seqs, scores = decode.beam_search(_markov(TRAP), 0, _start(1), beam_size=2, max_len=2, alpha=0)
    assert seqs.shape == (1, 2, 2) and scores.shape == (1, 2)
    np.testing.assert_array_equal(seqs[0, 0], [B, C])
    assert _logp(TRAP, START, [B, C]) > _logp(TRAP, START, [A, C])
    expected = [_logp(TRAP, START, seq) for seq in np.asarray(seqs[0])]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
    assert scores[0, 0] > scores[0, 1]


def test_beam_search_finds_the_exact_ranking():
    """With as many beams as length-2 prefixes, the beams are the exact top sequences.

    The chain is second order (the state holds the previous token per sequence), so the
    result is only right if the beams' states are reordered with the beams.
    """
    vocab, length, batch = 4, 3, 2
    logits = np.random.RandomState(0).randn(batch, vocab, vocab, vocab).astype(np.float32) * 2
    logp = np.asarray(jax.nn.log_softmax(logits, -1))  # [seq, prev-prev, prev, next]
    starts = np.array([1, 3], np.int32)

    def step_fn(state, tokens):
        prev, seq = state
        return jnp.asarray(logp)[seq, prev, tokens], (tokens, seq)

    state = (jnp.zeros(batch, jnp.int32), jnp.arange(batch))
    k = vocab ** (length - 1)
    seqs, scores = decode.beam_search(
        step_fn, state, jnp.asarray(starts), beam_size=k, max_len=length, alpha=0.0
    )
    for b in range(batch):

        def total(seq, b=b):
            history = [0, int(starts[b]), *seq]
            return sum(logp[b, history[i], history[i + 1], history[i + 2]] for i in range(length))

        ranked = sorted(itertools.product(range(vocab), repeat=length), key=total, reverse=True)
        np.testing.assert_array_equal(seqs[b], np.array(ranked[:k]))
        np.testing.assert_allclose(scores[b], [total(s) for s in ranked[:k]], rtol=1e-5)


def test_beam_of_one_is_greedy():
    table = np.asarray(jax.nn.log_softmax(np.random.RandomState(2).randn(9, 9) * 2, -1))
    start = jnp.arange(4, dtype=jnp.int32) + 3
    kwargs = {"max_len": 6, "eos_id": EOS, "pad_id": PAD}
    greedy = np.asarray(decode.sample_search(_markov(table), 0, start, **kwargs))
    seqs, _ = decode.beam_search(_markov(table), 0, start, beam_size=1, **kwargs)
    np.testing.assert_array_equal(seqs[:, 0], greedy)
    ended = (greedy == EOS).any(-1)
    assert ended.any() and not ended.all(), "want sequences with and without EOS"


# Two chains: START -> A -> EOS (2 tokens) and C -> B -> D -> EOS (3 tokens).
CHAINS = _table(
    {START: {A: 0.9}, A: {EOS: 0.9}, C: {B: 0.9}, B: {C: 0.1, D: 0.8}, D: {EOS: 0.9}}, vocab=8
)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_eos_pads_and_stops_early(method):
    calls: list[int] = []
    out = decode.search(
        _markov(CHAINS, calls),
        0,
        jnp.array([START, C], jnp.int32),
        method=method,
        beam_size=1,
        max_len=8,
        eos_id=EOS,
        pad_id=7,
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(out, [[A, EOS, *[7] * 6], [B, D, EOS, *[7] * 5]])
    assert sorted(calls) == [0, 1, 2], "the loop did not stop once every sequence ended"


def test_beam_search_stops_when_every_beam_ended():
    table = _table({START: {A: 0.6, B: 0.4}, A: {EOS: 0.9}, B: {EOS: 0.9}}, vocab=5)
    calls: list[int] = []
    seqs, _ = decode.beam_search(
        _markov(table, calls), 0, _start(1), beam_size=2, max_len=6, eos_id=EOS, alpha=0
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(seqs[0], [[A, EOS, 0, 0, 0, 0], [B, EOS, 0, 0, 0, 0]])
    assert len(calls) == 2


# A short hypothesis (EOS at once, p = 0.55) and a long one (A B EOS, p = 0.45 * 0.99**2):
# raw log-probability prefers the short one; length normalisation with a large alpha
# divides the long one's score by more and prefers it.
SHORT_LONG = _table({START: {EOS: 0.55, A: 0.45}, A: {B: 0.99}, B: {EOS: 0.99}}, vocab=5)


@pytest.mark.parametrize(("alpha", "winner"), [(0.0, "short"), (0.6, "short"), (2.0, "long")])
def test_length_normalisation(alpha, winner):
    seqs, scores = decode.beam_search(
        _markov(SHORT_LONG), 0, _start(1), beam_size=2, max_len=5, eos_id=EOS, alpha=alpha
    )
    short, long = [EOS, 0, 0, 0, 0], [A, B, EOS, 0, 0]
    raw = {"short": _logp(SHORT_LONG, START, [EOS]), "long": _logp(SHORT_LONG, START, long[:3])}
    assert raw["short"] > raw["long"]
    expected = {
        "short": raw["short"] / decode.length_penalty(jnp.array(1), alpha),
        "long": raw["long"] / decode.length_penalty(jnp.array(3), alpha),
    }
    loser = "long" if winner == "short" else "short"
    np.testing.assert_array_equal(seqs[0], [short, long] if winner == "short" else [long, short])
    np.testing.assert_allclose(scores[0], [expected[winner], expected[loser]], rtol=1e-5)


def test_length_penalty_values():
    np.testing.assert_allclose(decode.length_penalty(jnp.array([1, 7]), 0.0), [1.0, 1.0])
    np.testing.assert_allclose(decode.length_penalty(jnp.array([1, 7]), 1.0), [1.0, 2.0])


RANDOM = np.asarray(jax.nn.log_softmax(np.random.RandomState(2).randn(8, 8), -1))


@functools.cache
def _sampler(batch=16, max_len=6, temperature=1.0, top_k=None):
    """A jitted ``rng -> samples`` over the RANDOM chain (compiled once per setting)."""
    step_fn = _markov(RANDOM)
    return jax.jit(
        lambda rng: decode.sample_search(
            step_fn,
            0,
            _start(batch),
            max_len=max_len,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
        )
    )


def _sample(seed, **kwargs):
    return np.asarray(_sampler(**kwargs)(jax.random.key(seed)))


def test_sampling_is_reproducible_by_rng():
    first = _sample(0)
    np.testing.assert_array_equal(_sample(0), first)
    assert np.any(_sample(1) != first)
    assert len(np.unique(first[:, 0])) > 1, "sequences of one batch should differ"


def test_top_k_of_one_is_greedy():
    greedy = decode.sample_search(_markov(RANDOM), 0, _start(16), max_len=6)
    np.testing.assert_array_equal(_sample(3, top_k=1), greedy)


def test_top_k_restricts_the_choices():
    top2 = np.argsort(-RANDOM, -1)[:, :2]  # [prev, 2]
    samples = _sample(4, batch=256, max_len=3, top_k=2)
    prev = np.concatenate([np.full((256, 1), START), samples[:, :-1]], 1)
    allowed = (top2[prev] == samples[..., None]).any(-1)
    assert allowed.all(), "a token outside the top 2 was sampled"
    assert set(np.unique(samples[:, 0])) == set(top2[START]), "both top-2 tokens should occur"
    free = _sample(4, batch=256, max_len=3)
    prev = np.concatenate([np.full((256, 1), START), free[:, :-1]], 1)
    assert not (top2[prev] == free[..., None]).any(-1).all(), "sanity: unrestricted sampling"


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_frequencies_follow_the_tempered_distribution(temperature):
    n = 4000
    samples = _sample(5, batch=n, max_len=1, temperature=temperature)[:, 0]
    tempered = np.exp(RANDOM[START] / temperature)
    tempered /= tempered.sum()
    freq = np.bincount(samples, minlength=8) / n
    np.testing.assert_allclose(freq, tempered, atol=0.03)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda s: decode.beam_search(*s, beam_size=0, max_len=3), "beam_size"),
        (lambda s: decode.search(*s, method="beam", beam_size=0, max_len=3), "beam_size"),
        (lambda s: decode.sample_search(*s, max_len=3, temperature=-0.5), "temperature"),
        (lambda s: decode.sample_search(*s, max_len=3, temperature=1.0), "rng"),
        (lambda s: decode.search(*s, method="sample", max_len=3), "rng"),
        (lambda s: decode.search(*s, method="nucleus", max_len=3), "method"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        call((_markov(RANDOM), 0, _start(2)))


# decode.generate with a tiny TransformerLM.
LM = TransformerLM(20, TransformerOptions(width=32, num_layers=1, num_heads=2, max_len=16))
PROMPT = np.array([[3, 7, 5], [9, 2, 11]], np.int32)
NEW = 5


@functools.cache
def _lm_params():
    return random_params(LM, PROMPT, seed=1, std=1.0)


def test_generate_greedy_matches_full_forward_argmax():
    params = _lm_params()
    forward = jax.jit(lambda p, tokens: LM.apply({"params": p}, tokens))
    # One fixed-size buffer: the model is causal, so the unwritten tail cannot matter.
    buffer = np.zeros((2, PROMPT.shape[1] + NEW), np.int32)
    buffer[:, : PROMPT.shape[1]] = PROMPT
    for i in range(PROMPT.shape[1], buffer.shape[1]):
        buffer[:, i] = np.argmax(np.asarray(forward(params, buffer))[:, i - 1], -1)
    expected = buffer[:, PROMPT.shape[1] :]
    out = decode.generate(LM, params, PROMPT, max_new_tokens=NEW, method="greedy")
    assert out.shape == (2, NEW)
    np.testing.assert_array_equal(out, expected)
    assert len(np.unique(expected)) > 2, "degenerate model"
    beam = decode.generate(LM, params, PROMPT, max_new_tokens=NEW, method="beam", beam_size=1)
    np.testing.assert_array_equal(beam, expected)


def test_generate_sampling_is_reproducible_by_rng():
    params = _lm_params()
    sample = functools.partial(
        decode.generate, LM, params, PROMPT, max_new_tokens=NEW, method="sample", temperature=2.0
    )
    first = np.asarray(sample(rng=jax.random.key(0)))
    assert first.shape == (2, NEW)
    np.testing.assert_array_equal(sample(rng=jax.random.key(0)), first)
    assert np.any(np.asarray(sample(rng=jax.random.key(1))) != first)


def test_generate_past_max_len_raises():
    too_many = LM.options.max_len - PROMPT.shape[1] + 1
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(
            lambda p: decode.generate(LM, p, PROMPT, max_new_tokens=too_many), _lm_params()
        )
