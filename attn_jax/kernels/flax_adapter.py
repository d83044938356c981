"""Use any registered kernel as flax's ``attention_fn``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import api, registry

__all__ = ["flax_attention_fn"]


def flax_attention_fn(kernel: str | Callable[..., Any] = "dot_product", **kernel_kwargs: Any):
    """Adapts a ``dot_product``-interface kernel to ``flax.linen`` attention modules.

    ``nn.MultiHeadDotProductAttention(attention_fn=flax_attention_fn("dot_product"), ...)``
    behaves like flax's default attention, and so does
    ``flax.nnx.MultiHeadAttention(attention_fn=flax_attention_fn(...))``. Flax's float masks
    are converted to booleans (non-zero = attend), ``deterministic=True`` turns dropout off,
    ``is_causal`` (passed by ``nnx.MultiHeadAttention``) is forwarded, and when flax asks
    for the weights to be sown (``module`` given), they are stored as
    ``('intermediates', 'attention_weights')`` like flax does (in NNX: ``module.sow`` of an
    ``nnx.Intermediate``).

    Args:
      kernel: registry name or a kernel function with the ``dot_product`` interface.
      **kernel_kwargs: extra fixed keyword arguments (e.g. ``is_causal=True``, or
        ``causal_alignment="top_left"`` for flax's own alignment when ``q_len != kv_len``).

    Returns:
      A function with flax's ``attention_fn`` signature.
    """
    fn = registry.get(kernel) if isinstance(kernel, str) else kernel

    def attention_fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        force_fp32_for_softmax: bool = False,
        qk_attn_weights_einsum: Any = None,
        attn_weights_value_einsum: Any = None,
        is_causal: bool = False,
    ) -> jax.Array:
        # force_fp32_for_softmax is always honoured: every attn_jax softmax runs in float32.
        del force_fp32_for_softmax
        for name, value_ in (
            ("qk_attn_weights_einsum", qk_attn_weights_einsum),
            ("attn_weights_value_einsum", attn_weights_value_einsum),
        ):
            if value_ is not None:
                raise ValueError(f"attn_jax kernels do not support flax argument {name!r}")
        kwargs = dict(kernel_kwargs)
        if is_causal:
            kwargs["is_causal"] = True
        if mask is not None:
            kwargs["mask"] = jnp.asarray(mask).astype(bool)
        if bias is not None:
            kwargs["bias"] = bias
        if dtype is not None:
            kwargs["dtype"] = dtype
        if precision is not None:
            kwargs["precision"] = precision
        if not deterministic and dropout_rate > 0.0:
            kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
            if broadcast_dropout:
                if "broadcast_dropout" not in inspect.signature(fn).parameters:
                    raise ValueError(
                        f"kernel {getattr(fn, 'kernel_name', fn)!r} has no argument "
                        "'broadcast_dropout': build the flax module with broadcast_dropout=False"
                    )
                kwargs["broadcast_dropout"] = True
        if module is None:
            return fn(query, key, value, **kwargs)
        out, weights = fn(query, key, value, return_weights=True, **kwargs)
        api.sow_weights(module, weights)
        return out

    return attention_fn
