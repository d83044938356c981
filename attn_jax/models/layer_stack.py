"""The layers of a Transformer stack: unrolled or scanned (``nn.scan``), optionally
rematerialised (``nn.remat`` with a named checkpoint policy).

Every stack (:class:`~attn_jax.models.TransformerLM`, :class:`~attn_jax.models.EncoderStack`)
runs its layers through :func:`run_layers`, chosen by two fields of
:class:`~attn_jax.models.TransformerOptions`:

- ``scan_layers=False``: a Python loop, layers named ``layer_0``, ``layer_1``, ...; compile
  time grows with depth. ``scan_layers=True``: one ``nn.scan`` over a module named
  ``layers`` whose variables have a layer axis (:data:`LAYER_AXES`): the layer is compiled
  once, whatever the depth.
- ``remat``: which activations of a layer the backward pass keeps (:data:`REMAT_POLICIES`);
  the others are recomputed from the layer's input, trading compute for memory.

:func:`stack_layer_params` / :func:`unstack_layer_params` convert variables (parameters,
checkpoints, caches, sowed weights) between the two layouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

if TYPE_CHECKING:  # blocks imports this module
    from attn_jax.models.blocks import TransformerOptions

__all__ = [
    "LAYER_AXES",
    "REMAT_POLICIES",
    "SCANNED_NAME",
    "check_layer_options",
    "run_layers",
    "stack_layer_params",
    "unstack_layer_params",
]

# options.remat -> the policy of jax.checkpoint (what the backward pass may keep).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input
    "dots": jax.checkpoint_policies.dots_saveable,  # every matmul output (incl. q.k scores)
    # projections and MLP matmuls only; attention scores and elementwise ops recomputed
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The scanned module, and the layer axis of its variables: parameters and sowed weights
# lead with the layer axis; caches keep the batch first (decoding's beam search tiles and
# reorders every cache array along its leading batch axis), the layers second.
SCANNED_NAME = "layers"
LAYER_AXES: Mapping[str, int] = FrozenDict({"params": 0, "cache": 1, "intermediates": 0})
_UNROLLED_NAME = re.compile(r"layer_(\d+)")


class _Layer(nn.Module):
    """One layer with positional inputs only and its static keyword arguments bound as
    attributes (what ``nn.scan`` and ``nn.remat`` lift); it shares the layer's scope, so
    the variables are the layer's own (``layer_0/attention/...``)."""

    layer_type: type[nn.Module]
    layer_kwargs: FrozenDict
    input_names: tuple[str, ...]
    static_kwargs: FrozenDict
    scanned: bool

    def setup(self):
        self.layer = self.layer_type(**self.layer_kwargs)
        nn.share_scope(self, self.layer)

    def __call__(self, x: jax.Array, *inputs: Any) -> Any:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        y = self.layer(x, **kwargs, **self.static_kwargs)
        return (y, None) if self.scanned else y


def check_layer_options(options: TransformerOptions) -> None:
    """Validates ``options.scan_layers`` and ``options.remat`` (errors name the field)."""
    if not isinstance(options.scan_layers, bool):
        raise ValueError(f"options.scan_layers: expected a bool, got {options.scan_layers!r}")
    if options.remat not in REMAT_POLICIES:
        raise ValueError(
            f"options.remat: expected one of {tuple(REMAT_POLICIES)}, got {options.remat!r}"
        )


def run_layers(
    layer_type: type[nn.Module],
    options: TransformerOptions,
    x: jax.Array,
    *,
    layer_kwargs: Mapping[str, Any] | None = None,
    deterministic: bool = True,
    decode: bool = False,
    sow_weights: bool = False,
    **inputs: Any,
) -> jax.Array:
    """``options.num_layers`` layers ``layer_type(options, **layer_kwargs)`` over ``x``.

    Called from a module's ``nn.compact`` method: the layers become its submodules
    (``layer_0 ...``, or ``layers`` when scanned).

    Args:
      layer_type: the layer class (:class:`~attn_jax.models.blocks.EncoderLayer` or
        :class:`~attn_jax.models.blocks.DecoderLayer`).
      options: :class:`~attn_jax.models.TransformerOptions` (``num_layers``,
        ``scan_layers``, ``remat``).
      x: ``[batch, length, width]``, the carry from layer to layer.
      layer_kwargs: further attributes of every layer (e.g. ``is_causal``).
      deterministic / decode / sow_weights: static keyword arguments of every layer.
      **inputs: the layer's other keyword arguments, the same for every layer (arrays or
        ``None``: masks, positions, segment ids, lengths, the memory).

    Returns:
      ``[batch, length, width]``.
    """
    check_layer_options(options)
    names = tuple(sorted(inputs))
    args = tuple(inputs[n] for n in names)
    static = FrozenDict(deterministic=deterministic, decode=decode, sow_weights=sow_weights)
    layer = _Layer
    if options.remat != "none":
        # prevent_cse is only needed outside scan (jax's advice for remat inside scan).
        layer = nn.remat(
            layer, policy=REMAT_POLICIES[options.remat], prevent_cse=not options.scan_layers
        )
    attributes = dict(
        layer_type=layer_type,
        layer_kwargs=FrozenDict({"options": options, **(layer_kwargs or {})}),
        input_names=names,
        static_kwargs=static,
        scanned=options.scan_layers,
    )
    if not options.scan_layers:
        for i in range(options.num_layers):
            x = layer(**attributes, name=f"layer_{i}")(x, *args)
        return x
    scanned = nn.scan(
        layer,
        variable_axes=dict(LAYER_AXES),
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=options.num_layers,
    )
    x, _ = scanned(**attributes, name=SCANNED_NAME)(x, *args)
    return x


def stack_layer_params(tree: Mapping[str, Any], axis: int = 0) -> dict[str, Any]:
    """Unrolled variables to the scanned layout: wherever ``tree`` (a nested mapping, at
    any depth) holds ``layer_0 ... layer_{n-1}``, they become one ``layers`` entry whose
    arrays are stacked along ``axis`` (``[n, ...]`` for ``axis=0``).

    Args:
      tree: one collection, e.g. ``variables["params"]`` of a ``scan_layers=False``
        model (or a checkpoint of one).
      axis: the layer axis, :data:`LAYER_AXES` of the collection (``1`` for ``'cache'``).

    Returns:
      The same tree for a ``scan_layers=True`` model (plain nested dicts).
    """
    out: dict[str, Any] = {}
    layers: dict[int, Any] = {}
    for key, value in tree.items():
        match = _UNROLLED_NAME.fullmatch(str(key))
        if match and isinstance(value, Mapping):
            layers[int(match.group(1))] = value
        elif isinstance(value, Mapping):
            out[key] = stack_layer_params(value, axis)
        else:
            out[key] = value
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(
                f"stack_layer_params: argument 'tree' has layers {sorted(layers)}; expected "
                f"layer_0 ... layer_{len(layers) - 1}"
            )
        if SCANNED_NAME in out:
            raise ValueError(f"stack_layer_params: 'tree' has both layer_i and {SCANNED_NAME!r}")
        stacked = [_plain(layers[i]) for i in range(len(layers))]
        out[SCANNED_NAME] = jax.tree.map(lambda *xs: jnp.stack(xs, axis), *stacked)
    return out


def unstack_layer_params(tree: Mapping[str, Any], axis: int = 0) -> dict[str, Any]:
    """The inverse of :func:`stack_layer_params`: every ``layers`` entry (arrays with the
    layer axis ``axis``) becomes ``layer_0 ... layer_{n-1}``.

    Also gives a scanned model's sowed weights per layer (``'intermediates'``, axis 0), as
    an unrolled model records them, e.g. for :func:`attn_jax.viz.collect_attention`.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == SCANNED_NAME and isinstance(value, Mapping):
            leaves = jax.tree.leaves(value)
            count = leaves[0].shape[axis] if leaves else 0
            for i in range(count):
                name = f"layer_{i}"
                if name in tree:
                    raise ValueError(f"unstack_layer_params: 'tree' has both {key!r} and {name}")
                out[name] = _plain(jax.tree.map(lambda x, i=i: jnp.take(x, i, axis), value))
        elif isinstance(value, Mapping):
            out[key] = unstack_layer_params(value, axis)
        else:
            out[key] = value
    return out


def _plain(tree: Any) -> Any:
    """Nested mappings as plain dicts (FrozenDicts and dicts compare alike in a tree map)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
