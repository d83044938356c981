"""An NNX model behind linen's functional ``init`` / ``apply``, so that the training
loop (``launch.py`` with ``config.model.api="nnx"``), its checkpoints, resume and sweeps
run NNX models as they run linen ones.

Each ``apply`` merges the given parameters into the model's graph and calls the NNX
module: what runs is the NNX code. The parameters are the linen layout
(:mod:`attn_jax.nnx.convert`), so a checkpoint of either API restores into the other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from attn_jax.nnx.convert import merge_params, nnx_twin

__all__ = ["Functional"]


@dataclasses.dataclass(frozen=True)
class Functional:
    """The NNX twin of ``linen`` (a linen model: :func:`attn_jax.nnx.convert.nnx_twin`)
    with linen's ``init`` / ``apply``.

    Attributes of the linen model (``options``, ``vocab_size``, ...) read through;
    ``clone(**changes)`` changes them. ``init`` is the linen model's (the same parameters
    for the same key); ``apply`` runs the NNX module.
    """

    linen: nn.Module

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.linen, name)

    def clone(self, **changes: Any) -> Functional:
        return Functional(self.linen.clone(**changes))

    def build(self, rng: jax.Array, in_channels: int | None = None) -> nnx.Module:
        """A new NNX module initialised from ``rng`` (``in_channels``: a ViT's)."""
        cls, kwargs = nnx_twin(self.linen, _shapes(in_channels))
        return cls(**kwargs, rngs=nnx.Rngs(params=rng))

    def init(self, rng: jax.Array, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``{"params": ...}``: the linen model's initial parameters for ``rng`` (so a
        run's starting point, and with it its results, do not depend on the API)."""
        return {"params": self.linen.init(rng, *args, **kwargs)["params"]}

    def bind(self, params: Any) -> nnx.Module:
        """The NNX module holding ``params`` (the linen layout)."""
        embedding = params.get("patch_embedding") if hasattr(params, "get") else None
        channels = None if embedding is None else int(embedding["kernel"].shape[2])
        return merge_params(_abstract(self, channels), params)

    def apply(
        self,
        variables: dict[str, Any],
        *args: Any,
        rngs: dict[str, jax.Array] | None = None,
        mutable: Any = False,
        method: Any = None,
        **kwargs: Any,
    ) -> Any:
        """linen's ``apply``: ``variables["params"]``; ``rngs={"dropout": key}``;
        ``mutable=["intermediates"]`` returns ``(out, {"intermediates": ...})`` with what
        ``sow_weights=True`` recorded; ``method``: a method (or its name) of the model."""
        module = self.bind(variables["params"])
        fn = module if method is None else getattr(module, getattr(method, "__name__", method))
        if rngs is not None:
            kwargs["rngs"] = nnx.Rngs(**rngs)
        collections = [] if mutable is False else list(mutable)
        unknown = sorted(set(collections) - {"intermediates"})
        if unknown:
            raise ValueError(f"Functional.apply: mutable collections {unknown} are linen-only")
        if not collections:
            return fn(*args, **kwargs)
        out, intermediates = nnx.capture(fn, nnx.Intermediate)(*args, **kwargs)
        return out, {"intermediates": nnx.to_pure_dict(intermediates)}


def _shapes(in_channels: int | None) -> dict[str, Any] | None:
    """What :func:`nnx_twin` reads of a ViT's parameters (its input channels)."""
    if in_channels is None:
        return None
    shape = (1, 1, in_channels, 1)
    return {"patch_embedding": {"kernel": jax.ShapeDtypeStruct(shape, "float32")}}


@functools.lru_cache(maxsize=64)
def _abstract(model: Functional, in_channels: int | None) -> nnx.Module:
    """The model's graph with abstract parameters (built once per model)."""
    return nnx.eval_shape(lambda: model.build(jax.random.key(0), in_channels))
