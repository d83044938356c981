"""What the attention features cost, and what block sparsity from ``mask_fn`` buys.

Three measurements, in one process, contenders of one problem timed in turn
(:mod:`experiments.bench_kernels`'s timing and memory helpers):

1. **Block sparsity** at ``--sparse_len`` (default 8,192): ``flash`` with a document mask
   given as ``mask_fn`` (documents of ``--doc_len`` tokens: about 90% of the blocks
   hidden) against the same kernel given the pattern as a dense boolean ``mask`` (which
   ``flash`` also reads block by block and skips), the same kernel given it as a dense
   additive ``bias`` (every block computed: dense masking without block sparsity), and
   ``dot_product`` with the dense mask. Forward and forward + backward; compiled scratch
   memory (``memory_analysis``) at half and full length shows what grows with ``N``.
2. **Feature cost** in ``flash`` at ``--cost_len`` (default 4,096): soft-cap, sinks,
   dropout and a score function (ALiBi), each against plain ``flash``.
3. **Accuracy**: the largest error of each feature against the float64 reference, per
   dtype and kernel (values and gradients), at a small size.

Writes ``bench_features.json`` and ``bench_features.md`` to ``--out_dir``::

    python experiments/bench_features.py                 # ~10 minutes on 2 CPU cores
    python experiments/bench_features.py --quick         # ~1 minute, small lengths
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn_jax import kernels
from attn_jax.kernels import blockwise, patterns
from attn_jax.kernels import reference as ref
from experiments import bench_kernels, reporting

FEATURES = ("soft_cap", "sinks", "dropout", "alibi")


def _document_mask(doc_len: int) -> Callable[..., jax.Array]:
    return lambda b, h, qp, kp: qp // doc_len == kp // doc_len


def hidden_fraction(length: int, doc_len: int, block_q: int, block_k: int) -> float:
    """The fraction of ``block_q x block_k`` blocks the document mask hides."""
    shape = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
    q = jnp.zeros(shape.shape, shape.dtype)
    call = kernels.api.bind(q, q, q, mask_fn=_document_mask(doc_len))
    plan = blockwise.plan(blockwise.canonicalize(call, block_q=block_q, block_k=block_k))
    return 1.0 - float(plan.count.sum()) / plan.classes.size


def sparsity_contenders(length: int, doc_len: int) -> dict[str, Callable[..., jax.Array]]:
    """Name -> ``fn(q, k, v)``: the same document pattern in four forms."""
    positions = np.arange(length) // doc_len
    dense = jnp.asarray(positions[:, None] == positions[None, :])
    bias = jnp.where(dense, 0.0, -1e9).astype(jnp.float32)
    flash = kernels.flash_attention
    return {
        "flash mask_fn": lambda q, k, v: flash(q, k, v, mask_fn=_document_mask(doc_len)),
        "flash dense mask": lambda q, k, v: flash(q, k, v, mask=dense),
        "flash dense bias (every block)": lambda q, k, v: flash(q, k, v, bias=bias),
        "dot_product dense mask": lambda q, k, v: kernels.dense_attention(q, k, v, mask=dense),
    }


def cost_contenders(heads: int) -> dict[str, Callable[..., jax.Array]]:
    """Name -> ``fn(q, k, v)``: plain flash and flash with one feature each."""
    flash = kernels.flash_attention
    sinks = jnp.linspace(-1.0, 1.0, heads)
    alibi = patterns.alibi(patterns.alibi_slopes(heads))
    rng = jax.random.key(0)
    return {
        "flash": lambda q, k, v: flash(q, k, v, is_causal=True),
        "soft_cap": lambda q, k, v: flash(q, k, v, is_causal=True, logits_soft_cap=30.0),
        "sinks": lambda q, k, v: flash(q, k, v, is_causal=True, sinks=sinks),
        "dropout": lambda q, k, v: flash(
            q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=rng
        ),
        "alibi": lambda q, k, v: flash(q, k, v, is_causal=True, score_fn=alibi),
    }


def timed(
    table: dict[str, Callable[..., jax.Array]],
    *,
    length: int,
    heads: int,
    dim: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """``{name: {mode: {seconds, scratch_bytes, status}}}`` for both modes, float32."""
    out: dict[str, dict[str, Any]] = {name: {} for name in table}
    budget = 0.8 * bench_kernels.available_bytes()
    for mode in ("forward", "forward_backward"):
        prepared = [
            bench_kernels.prepare(
                fn,
                length=length,
                dim=dim,
                dtype="float32",
                mode=mode,
                batch=1,
                heads=heads,
                budget=budget,
            )
            for fn in table.values()
        ]
        for name, result in zip(table, bench_kernels._timed(prepared, repeats), strict=True):
            out[name][mode] = result
    return out


def scratch_bytes(fn: Callable[..., jax.Array], length: int, heads: int, dim: int) -> int:
    """Compiled forward + backward scratch of ``fn`` at ``length``."""
    shape = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
    compiled = jax.jit(grad).lower(shape, shape, shape).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def accuracy() -> list[dict[str, Any]]:
    """The largest error of each feature against float64, per kernel and dtype."""
    rng = np.random.RandomState(0)
    b, n, m, h, kvh, d = 2, 33, 41, 4, 2, 16
    base = [rng.randn(b, n, h, d), rng.randn(b, m, kvh, d), rng.randn(b, m, kvh, d)]
    cotangent = rng.randn(b, n, h, d)
    table = jnp.asarray(rng.randn(h, 32), jnp.float32)
    t5 = patterns.t5_relative_bias(table)
    docs = patterns.document_mask(jnp.asarray(np.arange(m)[None, :] // 9 * np.ones((b, 1), int)))
    sinks = jnp.asarray(rng.randn(h), jnp.float32)
    features = {
        "score_fn (T5 buckets)": dict(score_fn=t5),
        "mask_fn (documents)": dict(mask_fn=docs),
        "logits_soft_cap": dict(logits_soft_cap=2.0),
        "sinks": dict(sinks=sinks),
    }
    rows = []
    for feature, kwargs in features.items():
        expected, grads = ref.dot_product_attention(
            *base, d_out=cotangent, is_causal=True,
            **{k: (np.asarray(v) if k == "sinks" else v) for k, v in kwargs.items()},
        )  # fmt: skip
        for name in ("dot_product", "flash", "chunked", "ring"):
            for dtype in (jnp.float32, jnp.bfloat16):
                q, k, v = (jnp.asarray(x, dtype) for x in base)
                fn = lambda q, k, v, name=name, kw=kwargs: kernels.dot_product_attention(
                    q, k, v, is_causal=True, implementation=name, **kw
                )
                out, vjp = jax.vjp(fn, q, k, v)
                dq, dk, dv = vjp(jnp.asarray(cotangent, dtype))
                err = lambda x, y: float(np.abs(np.asarray(x, np.float64) - y).max())
                rows.append(
                    dict(
                        feature=feature,
                        kernel=name,
                        dtype=jnp.dtype(dtype).name,
                        forward=err(out, expected),
                        gradient=max(
                            err(dq, grads["query"]), err(dk, grads["key"]), err(dv, grads["value"])
                        ),
                    )
                )
    return rows


def run(
    *,
    sparse_len: int,
    doc_len: int,
    cost_len: int,
    heads: int,
    dim: int,
    repeats: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Every measurement; writes the outputs and returns the report."""
    report: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "sparse_len": sparse_len,
        "doc_len": doc_len,
        "cost_len": cost_len,
        "heads": heads,
        "head_dim": dim,
        "hidden_fraction": hidden_fraction(sparse_len, doc_len, 512, 256),
    }
    sparse = sparsity_contenders(sparse_len, doc_len)
    report["sparsity"] = timed(sparse, length=sparse_len, heads=heads, dim=dim, repeats=repeats)
    half = sparsity_contenders(sparse_len // 2, doc_len)
    report["scratch_half_and_full"] = {
        name: [
            scratch_bytes(half[name], sparse_len // 2, heads, dim),
            scratch_bytes(sparse[name], sparse_len, heads, dim),
        ]
        for name in ("flash mask_fn", "flash dense mask")
    }
    costs = cost_contenders(heads)
    report["cost"] = timed(costs, length=cost_len, heads=heads, dim=dim, repeats=repeats)
    report["accuracy"] = accuracy()
    reporting.write_outputs(out_dir, "bench_features", report, markdown(report))
    return report


def _ratio(rows: dict[str, Any], name: str, base: str, mode: str) -> str:
    a, b = rows[name][mode].get("seconds"), rows[base][mode].get("seconds")
    return "n/a" if a is None or b is None else f"{b / a:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    sparse, cost = report["sparsity"], report["cost"]
    lines = [
        f"# Attention features ({report['device']})\n",
        f"## Block sparsity: documents of {report['doc_len']} tokens at N = "
        f"{report['sparse_len']:,} ({100 * report['hidden_fraction']:.1f}% of 512 x 256 blocks "
        f"hidden), {report['heads']} heads of {report['head_dim']}\n",
    ]
    rows = []
    for name, modes in sparse.items():
        f, fb = modes["forward"], modes["forward_backward"]
        rows.append([
            name,
            f"{f.get('seconds', float('nan')) * 1e3:.0f}",
            f"{fb.get('seconds', float('nan')) * 1e3:.0f}",
            _ratio(sparse, "flash mask_fn", name, "forward"),
            _ratio(sparse, "flash mask_fn", name, "forward_backward"),
        ])  # fmt: skip
    lines.append(
        reporting.markdown_table(
            ["pattern as", "forward ms", "fwd+bwd ms", "mask_fn speed-up fwd", "fwd+bwd"], rows
        )
    )
    mib = lambda x: f"{x / 2**20:.1f}"
    scratch = [
        [name, mib(a), mib(b), f"{b / a:.2f}x"]
        for name, (a, b) in report["scratch_half_and_full"].items()
    ]
    lines.append("\nForward + backward scratch (MiB) at N/2 and N:\n")
    lines.append(reporting.markdown_table(["pattern as", "N/2", "N", "ratio"], scratch))
    lines.append(f"\n## Feature cost in flash (causal, N = {report['cost_len']:,})\n")
    rows = []
    for name in FEATURES:
        rows.append([
            name,
            f"{cost[name]['forward'].get('seconds', float('nan')) * 1e3:.0f}",
            f"{cost[name]['forward_backward'].get('seconds', float('nan')) * 1e3:.0f}",
            _ratio(cost, "flash", name, "forward"),
            _ratio(cost, "flash", name, "forward_backward"),
        ])  # fmt: skip
    base = cost["flash"]
    lines.append(
        f"plain flash: forward {base['forward'].get('seconds', float('nan')) * 1e3:.0f} ms, "
        f"fwd+bwd {base['forward_backward'].get('seconds', float('nan')) * 1e3:.0f} ms\n\n"
    )
    lines.append(
        reporting.markdown_table(
            ["feature", "forward ms", "fwd+bwd ms", "time / plain fwd", "fwd+bwd"], rows
        )
    )
    lines.append("\n## Largest error against float64 (values; gradients of q, k, v)\n")
    acc = [
        [r["feature"], r["kernel"], r["dtype"], f"{r['forward']:.1e}", f"{r['gradient']:.1e}"]
        for r in report["accuracy"]
    ]
    lines.append(reporting.markdown_table(["feature", "kernel", "dtype", "forward", "grad"], acc))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    reporting.start(argv)
    f = flags.FLAGS
    quick = f.quick
    report = run(
        sparse_len=1024 if quick else f.sparse_len,
        doc_len=f.doc_len // 8 if quick else f.doc_len,
        cost_len=512 if quick else f.cost_len,
        heads=f.heads,
        dim=f.head_dim,
        repeats=f.repeats,
        out_dir=f.out_dir,
    )
    print(markdown(report))


if __name__ == "__main__":
    flags.DEFINE_bool("quick", False, "About a minute: N = 1,024 and 512.")
    flags.DEFINE_integer("sparse_len", 8192, "Sequence length of the block-sparsity runs.")
    flags.DEFINE_integer("doc_len", 820, "Document length (820 of 8,192: ~90% hidden).")
    flags.DEFINE_integer("cost_len", 4096, "Sequence length of the feature-cost runs.")
    flags.DEFINE_integer("heads", 4, "Attention heads.")
    flags.DEFINE_integer("head_dim", 64, "Head dimension.")
    flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median).")
    flags.DEFINE_string("out_dir", "runs/bench_features", "Output directory.")
    app.run(main)
