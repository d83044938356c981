"""Runs every registered kernel on a small problem and tabulates error and speed.

``python -m attn_jax.demo`` (or ``python launch.py``) prints, per kernel: its interface,
what it supports, the largest error against the float64 reference, and the median time of
the jitted forward pass on this machine.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import kernels
from attn_jax.kernels import reference

__all__ = ["DemoRow", "format_table", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoRow:
    name: str
    interface: str
    exact: bool
    supports: str
    max_error: float | None
    milliseconds: float | None
    note: str = ""


def _example(
    interface: str, caps: kernels.Capabilities, batch: int, seq_len: int, dtype: Any
) -> tuple[Callable[[Callable[..., Any]], jax.Array], np.ndarray] | None:
    """``(call, expected)``: ``call(kernel)`` runs the kernel; ``expected`` is float64."""
    rng = np.random.RandomState(0)
    heads, dim = 4, 32
    kv_heads = 2 if caps.gqa else heads
    arr = lambda *shape: jnp.asarray(rng.randn(*shape), dtype)
    if interface in ("dot_product", "multiplicative"):
        q, k, v = (
            arr(batch, seq_len, heads, dim),
            arr(batch, seq_len, kv_heads, dim),
            arr(batch, seq_len, kv_heads, dim),
        )
        kwargs = {"is_causal": True} if caps.causal else {}
        if interface == "dot_product":
            expected = reference.dot_product_attention(q, k, v, **kwargs)

            def call(fn):
                # Random-feature kernels take an explicit key.
                keyed = "rng" in inspect.signature(fn).parameters
                return fn(q, k, v, **kwargs, **({"rng": jax.random.key(0)} if keyed else {}))

            return call, expected
        weight = arr(heads, dim, dim) / np.sqrt(dim)
        kwargs.update(score="general", weight=weight, scale=1 / np.sqrt(dim))
        expected = reference.multiplicative_attention(q, k, v, **kwargs)
        return (lambda fn: fn(q, k, v, **kwargs)), expected
    if interface == "additive":
        length = min(seq_len, 64)  # additive scores are [batch, heads, q, kv, units]
        q, k = arr(batch, length, heads, dim), arr(batch, length, kv_heads, dim)
        v, score_vector = arr(batch, length, kv_heads, dim), arr(heads, dim)
        expected = reference.additive_attention(q, k, v, score_vector)
        return (lambda fn: fn(q, k, v, score_vector)), expected
    if interface == "pooling":
        values, query = arr(batch, seq_len, kv_heads, dim), arr(heads, dim)
        lengths = jnp.asarray(rng.randint(1, seq_len + 1, size=batch))
        expected = reference.attention_pooling(values, query=query, lengths=lengths)
        return (lambda fn: fn(values, query=query, lengths=lengths)), expected
    return None


def _median_ms(fn: Callable[[], jax.Array], repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def run_demo(
    names: list[str] | None = None, *, batch: int = 2, seq_len: int = 128, dtype: Any = "float32"
) -> list[DemoRow]:
    """Runs each kernel in ``names`` (default: all registered) and returns a row each."""
    rows = []
    for name in names or kernels.available():
        spec = kernels.spec(name)
        caps = spec.capabilities
        supports = ",".join(caps.supported())
        example = _example(caps.interface, caps, batch, seq_len, jnp.dtype(dtype))
        if example is None:
            rows.append(
                DemoRow(
                    name,
                    caps.interface,
                    caps.exact,
                    supports,
                    None,
                    None,
                    "no demo for this interface",
                )
            )
            continue
        call, expected = example
        jitted = jax.jit(lambda fn=spec.fn, call=call: call(fn))
        out = np.asarray(jitted(), np.float64)
        error = float(np.max(np.abs(out - expected)))
        rows.append(DemoRow(name, caps.interface, caps.exact, supports, error, _median_ms(jitted)))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """Markdown table of :func:`run_demo` rows."""
    lines = [
        "| kernel | interface | exact | supports | max abs error vs float64 | forward ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        err = "n/a" if r.max_error is None else f"{r.max_error:.2e}"
        ms = r.note or ("n/a" if r.milliseconds is None else f"{r.milliseconds:.2f}")
        lines.append(f"| {r.name} | {r.interface} | {r.exact} | {r.supports} | {err} | {ms} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run_demo()))
