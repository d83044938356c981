"""Eager calls of the front end run compiled.

Called outside any JAX transformation, :func:`~attn_jax.kernels.dot_product_attention`
would dispatch its dozens of operations one by one (an eager ``flash`` call costs 4x its
compile time). :func:`compiled_call` runs the whole call under one ``jax.jit`` instead:
arrays are its traced inputs and every other argument is static, so each distinct call
compiles once, is cached like any jitted function, and returns what the eager call would.

A call runs as it is (not compiled) when it cannot be compiled faithfully: an argument is
already traced (inside ``jit``, ``grad``, ``vmap``, ...), an argument is a callable
(``score_fn``, ``mask_fn``: a fresh closure per call would recompile every time, and what
it closes over may be traced), a flax ``module`` is given (``sow`` is a side effect), an
argument validated as a concrete number is given as an array, or a kernel outside
``attn_jax`` is asked for (its code may need concrete values).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from attn_jax.kernels import registry

# Checked as concrete Python numbers by the front end, so never traced.
_CONCRETE = ("scale", "dropout_rate", "logits_soft_cap")


def split(arguments: dict[str, Any]) -> tuple[tuple[tuple[str, type, Hashable], ...], dict] | None:
    """``arguments`` as (static items, dynamic arrays), or ``None`` when the call must
    run as it is (see the module docstring)."""
    static, dynamic = [], {}
    for name, value in arguments.items():
        if isinstance(value, jax.core.Tracer):
            return None
        if isinstance(value, jax.Array | np.ndarray):
            if name in _CONCRETE:
                return None
            dynamic[name] = value
            continue
        if isinstance(value, list):  # implementation=["flash", "dot_product"]
            value = tuple(value)
        # jnp.bfloat16 & co. are callable scalar types (with a dtype); other callables
        # are functions.
        if callable(value) and not isinstance(value, type) and not hasattr(value, "dtype"):
            return None
        try:
            hash(value)
        except TypeError:
            return None
        static.append((name, type(value), value))  # the type: True must not hit 1's cache
    return tuple(static), dynamic


def ours(implementation: Any) -> bool:
    """Whether every kernel ``implementation`` may name is one of attn_jax's own."""
    if implementation is None:
        return True
    names = [implementation] if isinstance(implementation, str) else implementation
    try:
        specs = [registry.spec("dot_product" if n == "xla" else n) for n in names]
    except (TypeError, ValueError):
        return False  # the front end reports it
    return all(
        s.core is not None and s.core.__module__.startswith("attn_jax.kernels.") for s in specs
    )


def compiled_call(
    front_end: Callable[..., Any], static: tuple[tuple[str, type, Hashable], ...], dynamic: dict
):
    """``front_end(**static, **dynamic)`` under one cached ``jax.jit``."""
    return _jitted(front_end, static, dynamic)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted(front_end: Callable[..., Any], static: tuple, dynamic: dict):
    return front_end(**{name: value for name, _, value in static}, **dynamic)
