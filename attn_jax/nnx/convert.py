"""Converters between the linen models (:mod:`attn_jax.models`) and their NNX twins
(:mod:`attn_jax.nnx`): the same hyperparameters, the same parameter tree.

Parameters keep their linen paths in NNX (``layer_0/attention/query/kernel``), so a
conversion copies arrays and never reshapes them; a scanned linen model
(``options.scan_layers``) converts to the unrolled NNX layout
(:func:`attn_jax.models.unstack_layer_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from attn_jax import models
from attn_jax.models.layer_stack import stack_layer_params, unstack_layer_params
from attn_jax.nnx.attention import MultiHeadAttention
from attn_jax.nnx.encoder import TransformerEncoder
from attn_jax.nnx.encoder_decoder import EncoderDecoder
from attn_jax.nnx.lm import TransformerLM
from attn_jax.nnx.vit import VisionTransformer

__all__ = ["from_linen", "merge_params", "nnx_twin", "params_of", "to_linen"]

_MHA_FIELDS = (
    "num_kv_heads", "head_dim", "out_features", "attention", "attention_kwargs", "is_causal",
    "cross_attention", "rope", "dropout_rate", "logits_soft_cap", "sinks", "kv_budget",
    "kv_recent", "use_bias", "dtype", "param_dtype",
)  # fmt: skip


def _unrolled(options: models.TransformerOptions) -> models.TransformerOptions:
    return dataclasses.replace(options, scan_layers=False)


def nnx_twin(
    model: nn.Module, params: Mapping[str, Any] | None = None
) -> tuple[type[nnx.Module], dict[str, Any]]:
    """The NNX class and constructor arguments (without ``rngs``) of the linen ``model``;
    ``params`` supplies what linen infers from the inputs (the attention layer's
    ``in_features``, the ViT's ``in_channels``)."""
    if isinstance(model, models.TransformerLM):
        return TransformerLM, dict(
            vocab_size=model.vocab_size,
            options=_unrolled(model.options),
            cross_attention=model.cross_attention,
        )
    if isinstance(model, models.TransformerEncoder):
        return TransformerEncoder, dict(
            vocab_size=model.vocab_size,
            num_classes=model.num_classes,
            options=_unrolled(model.options),
            pooling=model.pooling,
            pad_id=model.pad_id,
        )
    if isinstance(model, models.EncoderDecoder):
        if model.source is not None:
            raise ValueError(
                "from_linen: an EncoderDecoder with a 'source' module (images) has no NNX "
                "twin yet; the NNX EncoderDecoder reads source tokens"
            )
        return EncoderDecoder, dict(
            src_vocab_size=model.src_vocab_size,
            tgt_vocab_size=model.tgt_vocab_size,
            options=_unrolled(model.options),
            pad_id=model.pad_id,
        )
    if isinstance(model, models.VisionTransformer):
        channels = 1 if params is None else params["patch_embedding"]["kernel"].shape[2]
        return VisionTransformer, dict(
            num_classes=model.num_classes,
            patch_size=model.patch_size,
            options=_unrolled(model.options),
            pooling=model.pooling,
            in_channels=channels,
        )
    if isinstance(model, models.MultiHeadAttention):
        if params is None:
            raise ValueError("from_linen: a MultiHeadAttention needs its params (in_features)")
        kwargs = {name: getattr(model, name) for name in _MHA_FIELDS}
        kwargs["in_features"] = params["query"]["kernel"].shape[0]
        kwargs["kv_features"] = params["key"]["kernel"].shape[0]
        return MultiHeadAttention, dict(num_heads=model.num_heads, **kwargs)
    raise ValueError(
        f"from_linen: argument 'model' must be a TransformerLM, TransformerEncoder, "
        f"EncoderDecoder, VisionTransformer or MultiHeadAttention, got {type(model).__name__}"
    )


def params_of(module: nnx.Module) -> dict[str, Any]:
    """The parameters of an NNX twin as the linen model's ``params`` (a nested dict)."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def merge_params(module: nnx.Module, params: Mapping[str, Any]) -> nnx.Module:
    """A copy of ``module`` holding ``params`` (the linen layout), which must have exactly
    its parameters' paths, shapes and dtypes (``ValueError`` naming the first that does
    not)."""
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    mine = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    theirs = nnx.traversals.flatten_mapping(_plain(params))
    for path in sorted(set(mine) | set(theirs), key=str):
        where = "/".join(map(str, path))
        if path not in theirs:
            raise ValueError(f"params: missing parameter {where!r}")
        if path not in mine:
            raise ValueError(f"params: unexpected parameter {where!r} for {type(module).__name__}")
        want, got = mine[path], theirs[path]
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            raise ValueError(
                f"params: {where!r} is {got.dtype}{list(got.shape)}, expected "
                f"{want.dtype}{list(want.shape)}"
            )
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, _plain(params))
    return nnx.merge(graphdef, state, rest)


def from_linen(model: nn.Module, params: Mapping[str, Any]) -> nnx.Module:
    """The NNX twin of a linen ``model`` holding its ``params`` (``variables["params"]``).

    Example::

        params = linen_lm.init(key, tokens)["params"]
        lm = attn_jax.nnx.from_linen(linen_lm, params)   # an attn_jax.nnx.TransformerLM
        lm(tokens) == linen_lm.apply({"params": params}, tokens)
    """
    params = _plain(params)
    if getattr(getattr(model, "options", None), "scan_layers", False):
        params = unstack_layer_params(params)
    cls, kwargs = nnx_twin(model, params)
    abstract = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    return merge_params(abstract, params)


def to_linen(module: nnx.Module, *, scan_layers: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The linen twin of an :mod:`attn_jax.nnx` model and its ``params``
    (``scan_layers=True``: the scanned linen layout)."""

    options = lambda: dataclasses.replace(module.options, scan_layers=scan_layers)
    if isinstance(module, TransformerLM):
        linen = models.TransformerLM(module.vocab_size, options(), module.cross_attention)
    elif isinstance(module, TransformerEncoder):
        linen = models.TransformerEncoder(
            module.vocab_size, module.num_classes, options(), module.pooling, module.pad_id
        )
    elif isinstance(module, EncoderDecoder):
        linen = models.EncoderDecoder(
            module.src_vocab_size, module.tgt_vocab_size, options(), module.pad_id
        )
    elif isinstance(module, VisionTransformer):
        linen = models.VisionTransformer(
            module.num_classes, module.patch_size, options(), module.pooling
        )
    elif isinstance(module, MultiHeadAttention):
        linen = models.MultiHeadAttention(
            module.num_heads, **{name: getattr(module, _MHA_ATTRIBUTE.get(name, name))
                                 for name in _MHA_FIELDS}
        )  # fmt: skip
        return linen, params_of(module)
    else:
        raise ValueError(
            f"to_linen: argument 'module' must be an attn_jax.nnx model, got "
            f"{type(module).__name__}"
        )
    params = params_of(module)
    return linen, stack_layer_params(params) if scan_layers else params


# NNX attributes that differ in name from the linen layer's.
_MHA_ATTRIBUTE = {"sinks": "sink_mode"}


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
