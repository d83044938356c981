"""Autoregressive decoding: greedy, temperature/top-k sampling and beam search.

The searches are generic over a *step function* ``step_fn(state, tokens [batch]) ->
(logits [batch, vocab], state)``; every array leaf of ``state`` whose leading axis is the
batch is reordered by beam search (scalars such as a cache index are left alone). The model
helpers build the step function for each model:

- :func:`generate` for :class:`~attn_jax.models.TransformerLM`: the prompts (of one length
  or, with ``prompt_lengths``, of several) are prefilled into the cache in one call, then
  one token per step. Every registered ``dot_product`` kernel decodes, each from its own
  cache (:mod:`attn_jax.models.kv_cache`).
- :func:`translate` for :class:`~attn_jax.models.EncoderDecoder` (cached decoder; the
  memory's cross-attention keys/values are computed once per source) and
  :class:`~attn_jax.models.Seq2SeqRNN` (recurrent state), over source tokens or, for
  models with a ``source`` module, e.g. images (``[batch, height, width]`` pixels).

Everything runs under ``jax.jit`` with ``lax.while_loop`` and stops early once every
sequence has produced ``eos_id``; positions after EOS hold ``pad_id``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from attn_jax.models.encoder_decoder import EncoderDecoder
from attn_jax.models.lm import TransformerLM
from attn_jax.models.positions import check_length
from attn_jax.models.seq2seq_rnn import Seq2SeqRNN

__all__ = [
    "METHODS",
    "beam_search",
    "check_prompts",
    "generate",
    "generate_linen",
    "init_cache",
    "sample_search",
    "search",
    "translate",
    "translate_linen",
]

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
METHODS = ("greedy", "sample", "beam")
NEG_INF = -1e30
# Keyword options of :func:`search`, static under jit in the model helpers.
_SEARCH_OPTIONS = ("method", "eos_id", "pad_id", "beam_size", "alpha", "temperature", "top_k")


def init_cache(model: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
    """A zero KV cache for ``model.apply(..., *args, decode=True, method=method)``.

    The cache is sized by ``args`` (e.g. ``tokens [batch, max_len]``); shapes come from
    ``jax.eval_shape``, so no forward pass is run.
    """
    shapes = jax.eval_shape(
        functools.partial(model.init, method=method, decode=True, **kwargs),
        jax.random.key(0),
        *args,
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def sample_search(
    step_fn: StepFn,
    state: Any,
    start_tokens: jax.Array,
    *,
    max_len: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Greedy (``temperature=0``) or sampled decoding.

    Args:
      step_fn: ``(state, tokens [batch]) -> (logits [batch, vocab], state)``.
      state: the state after the tokens *before* ``start_tokens``.
      start_tokens: ``[batch]`` the first tokens fed (BOS, or a prompt's last token).
      max_len: tokens to generate.
      rng: key for sampling (``temperature > 0``).
      temperature: 0 = argmax; otherwise logits are divided by it and sampled.
      top_k: sample among the ``top_k`` most likely tokens only.

    Returns:
      ``[batch, max_len]`` generated tokens (``pad_id`` after ``eos_id``).
    """
    chex.assert_rank(start_tokens, 1)
    if temperature < 0:
        raise ValueError(f"sample_search: 'temperature' must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sample_search: argument 'rng' is required when temperature > 0")
    batch = start_tokens.shape[0]
    rng = jax.random.key(0) if rng is None else rng

    def choose(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, -1)
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, NEG_INF, logits)
        return jax.random.categorical(key, logits)

    def cond(carry):
        i, _, _, _, finished, _ = carry
        return (i < max_len) & ~jnp.all(finished)

    def body(carry):
        i, tokens, state, out, finished, key = carry
        logits, state = step_fn(state, tokens)
        key, sub = jax.random.split(key)
        new = choose(logits.astype(jnp.float32), sub).astype(out.dtype)
        new = jnp.where(finished, pad_id, new)
        out = out.at[:, i].set(new)
        if eos_id is not None:
            finished = finished | (new == eos_id)
        return i + 1, new, state, out, finished, key

    out = jnp.full((batch, max_len), pad_id, jnp.int32)
    carry = (0, start_tokens.astype(jnp.int32), state, out, jnp.zeros(batch, bool), rng)
    return jax.lax.while_loop(cond, body, carry)[3]


def _gather_beams(tree: Any, beam_index: jax.Array, batch: int, beams: int) -> Any:
    """Reorders every leaf with a leading ``batch * beams`` axis by ``beam_index [B, K]``."""
    flat = (beam_index + beams * jnp.arange(batch)[:, None]).reshape(-1)

    def gather(x):
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch * beams:
            return x[flat]
        return x

    return jax.tree.map(gather, tree)


def length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """GNMT length normalisation ``((5 + length) / 6) ** alpha`` (Wu et al., 2016)."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
    step_fn: StepFn,
    state: Any,
    start_tokens: jax.Array,
    *,
    beam_size: int,
    max_len: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    alpha: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with GNMT length normalisation.

    Beams are ranked by their summed log-probabilities while searching; the final
    hypotheses are ordered by ``score / length_penalty(length, alpha)``. A finished beam
    continues with ``pad_id`` at no cost. With ``beam_size=1`` this is greedy decoding.

    Args:
      step_fn, state, start_tokens, max_len, eos_id, pad_id: as in :func:`sample_search`;
        ``state`` is for ``batch`` sequences and is tiled to ``batch * beam_size``.
      beam_size: beams per sequence.
      alpha: length-normalisation exponent (0 = none).

    Returns:
      ``tokens [batch, beam_size, max_len]`` and normalised ``scores [batch, beam_size]``,
      best first.
    """
    chex.assert_rank(start_tokens, 1)
    if beam_size < 1:
        raise ValueError(f"beam_search: 'beam_size' must be >= 1, got {beam_size}")
    batch, k = start_tokens.shape[0], beam_size

    def tile(x):
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch:
            return jnp.repeat(x, k, axis=0)
        return x

    state = jax.tree.map(tile, state)
    tokens = jnp.repeat(start_tokens.astype(jnp.int32), k)
    scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    seqs = jnp.full((batch, k, max_len), pad_id, jnp.int32)
    finished = jnp.zeros((batch, k), bool)
    lengths = jnp.zeros((batch, k), jnp.int32)

    def cond(carry):
        i, _, _, _, _, finished, _ = carry
        return (i < max_len) & ~jnp.all(finished)

    def body(carry):
        i, tokens, state, seqs, scores, finished, lengths = carry
        logits, state = step_fn(state, tokens)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
        pad_row = jnp.full((vocab,), NEG_INF).at[pad_id].set(0.0)
        logp = jnp.where(finished[..., None], pad_row, logp)
        candidates = (scores[..., None] + logp).reshape(batch, k * vocab)
        scores, index = jax.lax.top_k(candidates, k)
        beam, new = index // vocab, (index % vocab).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, beam, axis=1)
        was_finished = take(finished)
        seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1).at[:, :, i].set(new)
        lengths = take(lengths) + (~was_finished).astype(jnp.int32)
        finished = was_finished | ((new == eos_id) if eos_id is not None else False)
        state = _gather_beams(state, beam, batch, k)
        return i + 1, new.reshape(-1), state, seqs, scores, finished, lengths

    carry = (0, tokens, state, seqs, scores, finished, lengths)
    _, _, _, seqs, scores, _, lengths = jax.lax.while_loop(cond, body, carry)
    normalized = scores / length_penalty(jnp.maximum(lengths, 1), alpha)
    order = jnp.argsort(-normalized, axis=1)
    seqs = jnp.take_along_axis(seqs, order[..., None], axis=1)
    return seqs, jnp.take_along_axis(normalized, order, axis=1)


def search(
    step_fn: StepFn,
    state: Any,
    start_tokens: jax.Array,
    *,
    method: str = "greedy",
    max_len: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    beam_size: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Dispatches to greedy / sampling / beam search; returns ``[batch, max_len]`` tokens
    (beam search: the best hypothesis)."""
    if method == "greedy":
        return sample_search(
            step_fn, state, start_tokens, max_len=max_len, eos_id=eos_id, pad_id=pad_id
        )
    if method == "sample":
        return sample_search(
            step_fn,
            state,
            start_tokens,
            max_len=max_len,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            eos_id=eos_id,
            pad_id=pad_id,
        )
    if method == "beam":
        seqs, _ = beam_search(
            step_fn,
            state,
            start_tokens,
            beam_size=beam_size,
            max_len=max_len,
            eos_id=eos_id,
            pad_id=pad_id,
            alpha=alpha,
        )
        return seqs[:, 0]
    raise ValueError(f"search: 'method' must be one of {METHODS}, got {method!r}")


def check_prompts(
    options: Any, prompt: jax.Array, lengths: jax.Array | None, max_new_tokens: int
) -> jax.Array:
    """Each prompt's length ``[batch]`` (``lengths`` clipped to ``[1, prompt_len]``, or
    all ``prompt_len``), after checking the cache fits learned positions."""
    chex.assert_rank(prompt, 2)
    batch, prompt_len = prompt.shape
    if options.positions == "learned":
        check_length(prompt_len + max_new_tokens, options.max_len, "prompt length + max_new_tokens")
    if lengths is None:
        return jnp.full((batch,), prompt_len, jnp.int32)
    chex.assert_shape(lengths, (batch,))
    return jnp.clip(jnp.asarray(lengths, jnp.int32), 1, prompt_len)


def _nnx_module(model: Any, args: tuple) -> tuple[Any, tuple] | None:
    """``(NNX module, remaining args)`` when decoding an NNX model: an
    :mod:`attn_jax.nnx` module (``model, inputs``) or an :class:`attn_jax.nnx.Functional`
    (``model, params, inputs``); ``None`` for linen."""
    from flax import nnx

    from attn_jax.nnx.functional import Functional

    if isinstance(model, nnx.Module):
        return model, args
    if isinstance(model, Functional):
        return model.bind(args[0]), args[1:]
    return None


def generate(model: Any, *args: Any, **kwargs: Any) -> jax.Array:
    """Continues prompts with a language model: ``generate(model, params, prompt, ...)``
    for a linen :class:`~attn_jax.models.TransformerLM`, ``generate(model, prompt, ...)``
    for an :class:`attn_jax.nnx.TransformerLM` (same keyword arguments, see
    :func:`generate_linen`)."""
    nnx_call = _nnx_module(model, args)
    if nnx_call is not None:
        from attn_jax.nnx import decoding

        module, rest = nnx_call
        return decoding.generate(module, *rest, **kwargs)
    return generate_linen(model, *args, **kwargs)


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", *_SEARCH_OPTIONS),
)
def generate_linen(
    model: TransformerLM,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    prompt_lengths: jax.Array | None = None,
    method: str = "greedy",
    eos_id: int | None = None,
    pad_id: int = 0,
    beam_size: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continues ``prompt [batch, prompt_len]`` with a :class:`TransformerLM`.

    The prompts (all but their last tokens) are prefilled into the cache in one call; the
    cache holds ``prompt_len + max_new_tokens`` positions.

    Args:
      prompt_lengths: ``[batch]`` lengths of right-padded prompts (default: all
        ``prompt_len``); each sequence continues from the end of its own prompt.

    Returns:
      ``[batch, max_new_tokens]`` new tokens.
    """
    lengths = check_prompts(model.options, prompt, prompt_lengths, max_new_tokens)
    batch, prompt_len = prompt.shape
    cache = init_cache(model, jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32))
    if prompt_len > 1:
        _, updated = model.apply(
            {"params": params, "cache": cache},
            prompt[:, :-1],
            lengths=None if prompt_lengths is None else lengths - 1,
            decode=True,
            mutable=["cache"],
        )
        cache = updated["cache"]
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]

    def step(cache, tokens):
        logits, updated = model.apply(
            {"params": params, "cache": cache}, tokens[:, None], decode=True, mutable=["cache"]
        )
        return logits[:, 0], updated["cache"]

    return search(
        step,
        cache,
        last,
        method=method,
        max_len=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        beam_size=beam_size,
        alpha=alpha,
        temperature=temperature,
        top_k=top_k,
        rng=rng,
    )


def translate(model: Any, *args: Any, **kwargs: Any) -> jax.Array:
    """Decodes targets with an encoder-decoder: ``translate(model, params, src, ...)`` for
    a linen :class:`~attn_jax.models.EncoderDecoder` or :class:`~attn_jax.models.Seq2SeqRNN`,
    ``translate(model, src, ...)`` for an :class:`attn_jax.nnx.EncoderDecoder` (same
    keyword arguments, see :func:`translate_linen`)."""
    nnx_call = _nnx_module(model, args)
    if nnx_call is not None:
        from attn_jax.nnx import decoding

        module, rest = nnx_call
        return decoding.translate(module, *rest, **kwargs)
    return translate_linen(model, *args, **kwargs)


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_len", "bos_id", *_SEARCH_OPTIONS),
)
def translate_linen(
    model: EncoderDecoder | Seq2SeqRNN,
    params: Any,
    src: jax.Array,
    *,
    max_len: int,
    bos_id: int,
    method: str = "greedy",
    eos_id: int | None = None,
    pad_id: int = 0,
    beam_size: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Decodes targets for ``src`` with an encoder-decoder model.

    Args:
      src: ``[batch, src_len]`` source tokens, or ``[batch, ...]`` whatever the model's
        ``source`` module embeds (e.g. ``[batch, height, width]`` pixels for a
        :class:`~attn_jax.models.PatchEmbedder`); the model checks its rank.

    Returns:
      ``[batch, max_len]`` target tokens (without the leading ``bos_id``).
    """
    if getattr(src, "ndim", 0) < 1:
        raise ValueError("translate: argument 'src' needs a leading batch axis")
    variables = {"params": params}
    if isinstance(model, Seq2SeqRNN):
        state, encoded = model.apply(variables, src, method=Seq2SeqRNN.encode)

        def step(carry, tokens):
            state, encoded = carry
            state, logits, _ = model.apply(
                variables, state, tokens[:, None], encoded, method=Seq2SeqRNN.decode_steps
            )
            return logits[:, 0], (state, encoded)

        carry = (state, encoded)
    elif isinstance(model, EncoderDecoder):
        memory, memory_mask = model.apply(variables, src, method=EncoderDecoder.encode)
        # Creating the cache projects the memory into every cross-attention layer's
        # keys/values, once per source; the steps read them (memory=None).
        dummy = jnp.zeros((src.shape[0], max_len), jnp.int32)
        _, created = model.apply(
            variables,
            dummy,
            memory,
            memory_mask,
            decode=True,
            mutable=["cache"],
            method=EncoderDecoder.decode,
        )

        def step(carry, tokens):
            cache, memory_mask = carry
            logits, updated = model.apply(
                {"params": params, "cache": cache},
                tokens[:, None],
                None,
                memory_mask,
                decode=True,
                mutable=["cache"],
                method=EncoderDecoder.decode,
            )
            return logits[:, 0], (updated["cache"], memory_mask)

        carry = (created["cache"], memory_mask)
    else:
        raise ValueError(f"translate: unsupported model type {type(model).__name__}")
    if isinstance(model, EncoderDecoder) and model.options.positions == "learned":
        check_length(max_len, model.options.max_len, "max_len")
    start = jnp.full((src.shape[0],), bos_id, jnp.int32)
    return search(
        step,
        carry,
        start,
        method=method,
        max_len=max_len,
        eos_id=eos_id,
        pad_id=pad_id,
        beam_size=beam_size,
        alpha=alpha,
        temperature=temperature,
        top_k=top_k,
        rng=rng,
    )
