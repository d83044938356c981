"""Random parameters for a Flax module without running (and compiling) ``module.init``.

``init`` of the recurrent models compiles slowly (seconds each), so the model tests build
their parameters from ``jax.eval_shape`` (tracing only) filled with seeded normal values.
LayerNorm scales are ``1 + noise`` so the networks stay well-conditioned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def random_params(module: Any, *args: Any, seed: int = 0, std: float = 0.3, **kwargs: Any):
    """``module.init(key, *args, **kwargs)['params']`` shapes filled with seeded noise."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
    rng = np.random.RandomState(seed)

    def fill(path, s):
        noise = rng.normal(0.0, std, s.shape)
        if getattr(path[-1], "key", None) == "scale":
            noise = 1.0 + noise
        return jnp.asarray(noise, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
