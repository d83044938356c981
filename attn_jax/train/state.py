"""The training state: a plain pytree (checkpointed and replicated as is), and the
on-device record of a divergence that travels beside it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["Divergence", "TrainState"]


@flax.struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params``, optimiser state and the base RNG key data.

    The RNG for step ``s`` on device ``d`` is ``fold_in(fold_in(key(rng), s), d)``: it
    depends only on the step and the device, so resumed runs reproduce uninterrupted ones.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)


@flax.struct.dataclass
class Divergence:
    """The first step whose loss or gradient norm was NaN/inf, kept on device by the train
    step so that the host reads it only now and then (never checkpointed).

    ``step`` is 0 while every step was finite; otherwise the number of that step (the
    ``step``-th update, counting from 1), with its ``loss`` and ``grad_norm``.
    """

    step: jax.Array  # int32 scalar
    loss: jax.Array  # float32 scalar
    grad_norm: jax.Array  # float32 scalar

    @classmethod
    def none(cls) -> Divergence:
        """No divergence yet."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            loss=jnp.zeros((), jnp.float32),
            grad_norm=jnp.zeros((), jnp.float32),
        )

    def record(self, step: jax.Array, loss: jax.Array, grad_norm: jax.Array) -> Divergence:
        """This record, or step ``step``'s values if they are the first NaN/inf ones."""
        first = (self.step == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        new = Divergence(
            step=step.astype(jnp.int32),
            loss=loss.astype(jnp.float32),
            grad_norm=grad_norm.astype(jnp.float32),
        )
        return jax.tree.map(lambda a, b: jnp.where(first, a, b), new, self)
