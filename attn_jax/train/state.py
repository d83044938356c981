"""The training state: a plain pytree (checkpointed and replicated as is)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

__all__ = ["TrainState"]


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
