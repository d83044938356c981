"""Optimiser and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

__all__ = ["FIXED_PARAMS", "decay_mask", "hidden_matrices", "make_optimizer", "width_factor"]

# Parameters that are drawn once and never trained (a random-feature kernel's projection,
# used under stop_gradient): weight decay must not shrink them either.
FIXED_PARAMS = ("random_features",)


def decay_mask(params: Any) -> Any:
    """``True`` for every parameter weight decay applies to (all but :data:`FIXED_PARAMS`)."""

    def decays(path, _):
        return not any(getattr(k, "key", None) in FIXED_PARAMS for k in path)

    return jax.tree_util.tree_map_with_path(decays, params)


def hidden_matrices(params: Any) -> Any:
    """``True`` for the hidden weight matrices (every parameter of two or more axes except
    embedding tables, named ``embedding``, and :data:`FIXED_PARAMS`): those whose fan-in
    grows with the model width. Biases, norms and embeddings are ``False``."""

    def hidden(path, value):
        keys = [getattr(k, "key", None) for k in path]
        fixed = any(k in FIXED_PARAMS for k in keys)
        return getattr(value, "ndim", 0) >= 2 and keys[-1] != "embedding" and not fixed

    return jax.tree_util.tree_map_with_path(hidden, params)


def width_factor(optim: ml_collections.ConfigDict, width: int | None = None) -> float:
    """``optim.lr_reference_width / width`` when ``optim.lr_reference_width`` is set
    (> 0), else 1: the factor on the learning rate of the hidden matrices.

    That is muP's width rule for Adam (Yang et al., 2022): an Adam step moves every weight
    by about the learning rate, so a hidden layer's output moves in proportion to its
    fan-in, the width; scaling their rate as ``1 / width`` keeps the change per step the
    same at every width, while embeddings, biases and norms (whose fan-in does not grow)
    keep ``optim.learning_rate``. One learning rate, tuned at the reference width, then
    serves every width.
    """
    reference = optim.get("lr_reference_width", 0)
    if not reference:
        return 1.0
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(
            "config.optim.lr_reference_width: needs a model with a positive integer "
            f"config.model.width, got {width!r}"
        )
    return reference / width


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, width: int | None = None
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, and global-norm gradient clipping;
    weight decay skips :data:`FIXED_PARAMS`.

    Fields: ``learning_rate``, ``warmup_steps``, ``weight_decay``, ``b1``, ``b2``,
    ``grad_clip`` (0 disables), ``end_learning_rate_factor`` (cosine floor),
    ``lr_reference_width`` (0 disables; else the :func:`hidden_matrices` learn at
    ``learning_rate * lr_reference_width / width``, ``width`` being the model's:
    :func:`width_factor`).
    """
    peak = optim.learning_rate
    factor = width_factor(optim, width)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),
        end_value=peak * optim.get("end_learning_rate_factor", 0.0),
    )
    adamw = optax.adamw(
        schedule,
        b1=optim.get("b1", 0.9),
        b2=optim.get("b2", 0.999),
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    steps = [adamw]
    if factor != 1.0:
        steps.append(optax.masked(optax.scale(factor), hidden_matrices))
    if optim.grad_clip > 0:
        steps.insert(0, optax.clip_by_global_norm(optim.grad_clip))
    return optax.chain(*steps) if len(steps) > 1 else adamw
