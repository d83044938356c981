"""Decoding an :mod:`attn_jax.nnx` model with the searches of :mod:`attn_jax.decode`
(greedy, sampling, beam): :func:`attn_jax.decode.generate` and
:func:`attn_jax.decode.translate` call these for an NNX module.

The module is split into its graph (static under ``jax.jit``) and state; inside the
compiled program a copy gets a cache (``init_cache``), and the search carries the
:class:`flax.nnx.Cache` state from step to step, so the caller's module is left as it was.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import decode
from attn_jax.models.positions import check_length
from attn_jax.nnx.encoder_decoder import EncoderDecoder
from attn_jax.nnx.lm import TransformerLM

__all__ = ["generate", "translate"]

_STATIC = ("graphdef", *decode._SEARCH_OPTIONS)


def generate(model: TransformerLM, prompt: jax.Array, **kwargs: Any) -> jax.Array:
    """:func:`attn_jax.decode.generate` for an NNX :class:`~attn_jax.nnx.TransformerLM`
    (the same keyword arguments)."""
    if not isinstance(model, TransformerLM):
        raise ValueError(
            f"generate: argument 'model' must be an attn_jax.nnx.TransformerLM, got "
            f"{type(model).__name__}"
        )
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, **kwargs)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_new_tokens"))
def _generate(graphdef, state, prompt, *, max_new_tokens, prompt_lengths=None, rng=None,
              **search):  # fmt: skip
    model = nnx.merge(graphdef, state)
    lengths = decode.check_prompts(model.options, prompt, prompt_lengths, max_new_tokens)
    batch, prompt_len = prompt.shape
    model.init_cache(batch, prompt_len + max_new_tokens)
    if prompt_len > 1:
        model(
            prompt[:, :-1],
            lengths=None if prompt_lengths is None else lengths - 1,
            decode=True,
        )
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def step(cache, tokens):
        copy = nnx.merge(graphdef, cache, rest)
        logits = copy(tokens[:, None], decode=True)
        return logits[:, 0], nnx.state(copy, nnx.Cache)

    return decode.search(step, cache, last, max_len=max_new_tokens, rng=rng, **search)


def translate(model: EncoderDecoder, src: jax.Array, **kwargs: Any) -> jax.Array:
    """:func:`attn_jax.decode.translate` for an NNX :class:`~attn_jax.nnx.EncoderDecoder`
    (the same keyword arguments)."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError(
            f"translate: argument 'model' must be an attn_jax.nnx.EncoderDecoder, got "
            f"{type(model).__name__}"
        )
    graphdef, state = nnx.split(model)
    return _translate(graphdef, state, src, **kwargs)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_len", "bos_id"))
def _translate(graphdef, state, src, *, max_len, bos_id, rng=None, **search):
    model = nnx.merge(graphdef, state)
    if model.options.positions == "learned":
        check_length(max_len, model.options.max_len, "max_len")
    memory, memory_mask = model.encode(src)
    model.init_cache(src.shape[0], max_len, memory=memory)
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def step(carry, tokens):  # the mask rides along: beam search tiles and reorders it
        cache, memory_mask = carry
        copy = nnx.merge(graphdef, cache, rest)
        logits = copy.decode(tokens[:, None], None, memory_mask, decode=True)
        return logits[:, 0], (nnx.state(copy, nnx.Cache), memory_mask)

    start = jnp.full((src.shape[0],), bos_id, jnp.int32)
    carry = (cache, memory_mask)
    return decode.search(step, carry, start, max_len=max_len, rng=rng, **search)
