"""Accuracy table: every exact ``dot_product`` kernel vs the float64 reference.

For each kernel, dtype, sequence length and mask setting, the largest absolute error of the
output and of the gradients (query, key, value) against ``attn_jax.kernels.reference``,
next to the conformance suite's tolerance (``tests/kernels/conformance.py``). Writes
``accuracy.json`` and ``accuracy.md`` to --out_dir::

    python experiments/kernel_accuracy.py --seq_lens=128,512 --out_dir=runs/accuracy
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn_jax import kernels
from attn_jax.kernels import reference

TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 5e-2), "float16": (5e-3, 1e-2)}
MASKS = {
    "none": {},
    "causal": {"is_causal": True},
    "padding": {"padding": True},
    "window": {"local_window_size": (32, 0), "is_causal": True},
}
_CAPABILITY_OF = {"is_causal": "causal", "local_window_size": "window", "padding": "seq_lengths"}

_KERNELS = flags.DEFINE_list("kernels", None, "Kernels (default: every exact dot_product one).")
_DTYPES = flags.DEFINE_list("dtypes", list(TOLERANCES), "Input dtypes.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512"], "Sequence lengths (q_len = kv_len).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/kernel_accuracy", "Output directory.")


def measure(
    name: str,
    dtype: str,
    seq_len: int,
    mask: str,
    *,
    batch: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Largest forward and gradient errors of kernel ``name`` on one problem."""
    rng = np.random.RandomState(seed)
    kwargs = dict(MASKS[mask])
    if kwargs.pop("padding", False):
        lengths = rng.randint(seq_len // 2, seq_len + 1, size=batch).astype(np.int32)
        kwargs.update(
            query_seq_lengths=jnp.asarray(lengths), key_value_seq_lengths=jnp.asarray(lengths)
        )
    caps = kernels.capabilities(name)
    if not caps.gqa:
        kv_heads = heads
    q, k, v = (
        jnp.asarray(rng.randn(batch, seq_len, h, head_dim), dtype)
        for h in (heads, kv_heads, kv_heads)
    )
    d_out = jnp.asarray(rng.randn(batch, seq_len, heads, head_dim), dtype)
    kernel = kernels.get(name)
    arrays = {key: val for key, val in kwargs.items() if isinstance(val, jax.Array)}
    static = {key: val for key, val in kwargs.items() if key not in arrays}

    @jax.jit
    def run(q, k, v, arrays):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, **arrays, **static), q, k, v)
        return out, vjp(d_out)

    out, grads = run(q, k, v, arrays)
    expected, expected_grads = reference.dot_product_attention(q, k, v, d_out=d_out, **kwargs)
    err = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)))
    forward_tol, grad_tol = TOLERANCES[dtype]
    grad_err = max(
        err(g, expected_grads[n]) for g, n in zip(grads, ("query", "key", "value"), strict=True)
    )
    forward_err = err(out, expected)
    return {
        "kernel": name,
        "dtype": dtype,
        "seq_len": seq_len,
        "mask": mask,
        "forward_error": forward_err,
        "gradient_error": grad_err,
        "forward_tolerance": forward_tol,
        "gradient_tolerance": grad_tol,
        "within_tolerance": forward_err <= forward_tol and grad_err <= grad_tol,
    }


def supported_masks(name: str) -> list[str]:
    caps = kernels.capabilities(name)
    return [
        m
        for m, kw in MASKS.items()
        if all(getattr(caps, _CAPABILITY_OF[key]) for key in kw if key in _CAPABILITY_OF)
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | dtype | seq_len | mask | forward error | gradient error | within tolerance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['seq_len']} | {r['mask']} | "
            f"{r['forward_error']:.2e} (tol {r['forward_tolerance']:g}) | "
            f"{r['gradient_error']:.2e} (tol {r['gradient_tolerance']:g}) | "
            f"{'yes' if r['within_tolerance'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def run(
    names: Sequence[str], dtypes: Sequence[str], seq_lens: Sequence[int], out_dir: str
) -> list[dict[str, Any]]:
    """Measures every combination and writes ``accuracy.json`` / ``accuracy.md``."""
    rows = [
        measure(name, dtype, seq_len, mask)
        for name in names
        for dtype in dtypes
        for seq_len in seq_lens
        for mask in supported_masks(name)
    ]
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "accuracy.json").write_text(json.dumps(rows, indent=1))
    (path / "accuracy.md").write_text(markdown(rows))
    return rows


def main(argv: Sequence[str]) -> None:
    del argv
    names = _KERNELS.value or kernels.available(interface="dot_product", exact=True)
    for name in names:
        if kernels.capabilities(name).interface != "dot_product":
            raise app.UsageError(f"--kernels: {name!r} does not have the dot_product interface")
    unknown = [d for d in _DTYPES.value if d not in TOLERANCES]
    if unknown:
        raise app.UsageError(f"--dtypes: unknown {unknown}; expected some of {list(TOLERANCES)}")
    rows = run(names, _DTYPES.value, [int(n) for n in _SEQ_LENS.value], _OUT_DIR.value)
    print(markdown(rows))
    print(f"wrote {_OUT_DIR.value}/accuracy.json and accuracy.md")


if __name__ == "__main__":
    app.run(main)
