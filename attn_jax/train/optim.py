"""Optimiser and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

__all__ = ["FIXED_PARAMS", "decay_mask", "make_optimizer"]

# Parameters that are drawn once and never trained (a random-feature kernel's projection,
# used under stop_gradient): weight decay must not shrink them either.
FIXED_PARAMS = ("random_features",)


def decay_mask(params: Any) -> Any:
    """``True`` for every parameter weight decay applies to (all but :data:`FIXED_PARAMS`)."""

    def decays(path, _):
        return not any(getattr(k, "key", None) in FIXED_PARAMS for k in path)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, and global-norm gradient clipping;
    weight decay skips :data:`FIXED_PARAMS`.

    Fields: ``learning_rate``, ``warmup_steps``, ``weight_decay``, ``b1``, ``b2``,
    ``grad_clip`` (0 disables), ``end_learning_rate_factor`` (cosine floor).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * optim.get("end_learning_rate_factor", 0.0),
    )
    adamw = optax.adamw(
        schedule,
        b1=optim.get("b1", 0.9),
        b2=optim.get("b2", 0.999),
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw
