"""Optimiser and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

import ml_collections
import optax

__all__ = ["make_optimizer"]


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, and global-norm gradient clipping.

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
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw
