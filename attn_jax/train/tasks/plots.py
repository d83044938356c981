"""Example attention plots written at the end of training (``WORKDIR/attention/*.png``)."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from attn_jax import kernels, viz
from attn_jax.models import unstack_layer_params
from attn_jax.train.tasks.base import weights_kernel

__all__ = ["plot_layers", "sowed_attention", "weights_model"]


def weights_model(model: nn.Module) -> nn.Module | None:
    """``model`` with a kernel that returns its weights (see :func:`weights_kernel`): the
    same parameters and outputs (block sizes and other arguments the substitute does not
    take are dropped); ``None`` when its kernel is approximate."""
    options = getattr(model, "options", None)
    if options is None:
        return model
    kernel = weights_kernel(options.attention)
    if kernel is None:
        return None
    if kernel == options.attention:
        return model
    accepted = inspect.signature(kernels.get(kernel)).parameters
    kwargs = {k: v for k, v in (options.attention_kwargs or {}).items() if k in accepted}
    return model.clone(
        options=dataclasses.replace(options, attention=kernel, attention_kwargs=kwargs or None)
    )


def sowed_attention(
    model: nn.Module, params: Any, *args: Any, **kwargs: Any
) -> dict[str, np.ndarray]:
    """``{layer name: [batch, heads, q_len, kv_len]}`` recorded by one (jitted) forward
    pass; ``kwargs`` are static. Scanned layers (``options.scan_layers``) are named as
    unrolled ones (``layer_0``, ...)."""

    @jax.jit
    def forward(params, *args):
        _, state = model.apply(
            {"params": params}, *args, sow_weights=True, mutable=["intermediates"], **kwargs
        )
        return state["intermediates"]

    return viz.collect_attention(unstack_layer_params(forward(params, *args)))


def plot_layers(
    layers: dict[str, np.ndarray],
    directory: pathlib.Path,
    prefix: str,
    *,
    example: int = 0,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str = "",
    x_name: str = "key",
    y_name: str = "query",
    trim: tuple[int, int] | None = None,
) -> list[pathlib.Path]:
    """One PNG per layer (a grid of its heads) for batch row ``example``.

    ``trim``: ``(q_len, kv_len)`` to cut padding off the weights before drawing.
    """
    paths = []
    for name, weights in layers.items():
        w = weights[example]
        if trim is not None:
            w = w[:, : trim[0], : trim[1]]
        filename = f"{prefix}_{name.replace('/', '_')}.png"
        paths.append(
            viz.save_attention(
                directory / filename,
                w,
                x_labels=x_labels,
                y_labels=y_labels,
                title=f"{title} {name}".strip(),
                x_name=x_name,
                y_name=y_name,
            )
        )
    return paths
