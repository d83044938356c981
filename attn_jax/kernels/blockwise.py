"""Shared plumbing of the blockwise kernels (``flash``, ``chunked``, ``sliding_window``,
``ring``).

They work on a canonical layout: queries ``[B, kv_heads, groups, q_pad, dim]`` (GQA: query
head ``h = kv_head * groups + g``), keys/values ``[B, kv_heads, kv_pad, dim]``, bias
``[B, kv_heads, groups, q_pad, kv_pad]``, mask ``[B or 1, kv_heads or 1, groups or 1,
q_pad, kv_pad]``, and per-token visibility (:class:`~attn_jax.kernels.visibility.Tokens`,
``[B, q_pad]`` / ``[B, kv_pad]``, validity materialised); lengths are padded up to whole
blocks (the padding is invalid). Visibility is evaluated per block from the tokens, never
materialised at full size, and :func:`plan` classifies blocks once per call so that hidden
blocks are skipped.

Every matmul (:func:`matmul`) takes its operands in the inputs' storage dtype (bfloat16 /
float16 stay 16-bit; other dtypes become float32) and accumulates in float32
(``preferred_element_type``), the way GPU tensor cores and TPU MXUs run fastest; scores,
softmax statistics, accumulators and gradients are float32. Kernels with their own
backward pass keep the canonical inputs in the storage dtype; kernels differentiated by
autodiff keep them in float32 (``canonicalize(..., autodiff=True)``), so that the
gradients of the blocks sum in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.kernels import block_features, checks, softmax_core
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.api import AttentionCall
from attn_jax.kernels.visibility import Tokens

__all__ = [
    "BlockLayout",
    "Canonical",
    "Plan",
    "block_scores",
    "block_visible",
    "canonicalize",
    "matmul",
    "online_softmax_result",
    "online_softmax_update",
    "pad_to",
    "plan",
    "slice_tokens",
    "zeros_like_inputs",
]

MASK_VALUE = softmax_core.MASK_VALUE


_NO_FUNCTIONS = block_features.BlockFunctions()


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static description of a blockwise problem (hashable: a static arg of custom derivatives)."""

    q_len: int  # true lengths
    kv_len: int
    kv_heads: int
    groups: int
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    fns: block_features.BlockFunctions = _NO_FUNCTIONS
    precision: Any = None
    dtype: Any = jnp.float32  # storage dtype of the canonical queries, keys and values


def storage_dtype(*arrays: jax.Array) -> Any:
    """The dtype the matmuls take their operands in: the inputs' common 16-bit float dtype
    (bfloat16 or float16), else float32."""
    dtype = jnp.result_type(*arrays)
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def matmul(layout: BlockLayout, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` with both operands in the storage dtype (``layout.dtype``)
    and float32 accumulation and result. Its gradient (autodiff) is computed the same way
    and returned in the operands' own dtypes, so float32 operands get float32 gradients."""
    if jnp.dtype(layout.dtype) == jnp.float32:
        return _einsum(spec, layout.dtype, layout.precision, a, b)
    return _matmul_16(spec, layout.dtype, layout.precision, a, b)


def _einsum(spec: str, dtype: Any, precision: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(
        spec,
        a.astype(dtype),
        b.astype(dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _matmul_16(spec, dtype, precision, a, b):
    return _einsum(spec, dtype, precision, a, b)


def _matmul_16_fwd(spec, dtype, precision, a, b):
    return _einsum(spec, dtype, precision, a, b), (a, b)


def _matmul_16_bwd(spec, dtype, precision, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    da = _einsum(f"{out},{sb}->{sa}", dtype, precision, g, b)
    db = _einsum(f"{sa},{out}->{sb}", dtype, precision, a, g)
    return da.astype(a.dtype), db.astype(b.dtype)


_matmul_16.defvjp(_matmul_16_fwd, _matmul_16_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """Block classes of one call (:func:`~attn_jax.kernels.visibility.block_classes`) and,
    per query block, its key blocks that are not hidden: ``order [nq, nk]`` (visible first,
    increasing), ``count [nq]``."""

    classes: jax.Array
    order: jax.Array
    count: jax.Array


@dataclasses.dataclass
class Canonical:
    """Inputs in the canonical layout, padded to whole blocks: queries, keys and values in
    their storage dtype (``layout.dtype``), bias float32, ``sinks [1, kv_heads, groups, 1]``
    float32; the arrays ``score_fn`` and ``mask_fn`` close over (``score_consts`` get
    gradients), and the fused dropout's ``seed`` (uint32 ``[2]``)."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    q_tokens: Tokens
    k_tokens: Tokens
    layout: BlockLayout
    batch_shape: tuple[int, ...]
    heads: int
    out_dtype: Any
    sinks: jax.Array | None = None
    score_consts: tuple = ()
    mask_consts: tuple = ()
    seed: jax.Array | None = None


def classify(
    layout: BlockLayout, q_tok: Tokens, k_tok: Tokens, mask, block_q: int, block_k: int
) -> jax.Array:
    """:func:`~attn_jax.kernels.visibility.block_classes` of ``block_q`` x ``block_k``
    blocks, with the layout's causal flag and window."""
    return vis.block_classes(
        q_tok,
        k_tok,
        mask,
        block_q=block_q,
        block_k=block_k,
        is_causal=layout.is_causal,
        window=layout.window,
    )


def plan(c: Canonical) -> Plan:
    """Classifies the blocks of ``c`` (from its tokens, mask and ``mask_fn``)."""
    layout = c.layout
    classes = classify(layout, c.q_tokens, c.k_tokens, c.mask, layout.block_q, layout.block_k)
    if layout.fns.mask_fn is not None:
        hidden, full = block_features.mask_fn_classes(
            layout.fns,
            layout.kv_heads,
            layout.groups,
            c.q_tokens,
            c.k_tokens,
            c.mask_consts,
            layout.block_q,
            layout.block_k,
        )
        classes = block_features.combine_classes(classes, hidden, full)
    order, count = vis.visible_blocks(classes)
    return Plan(classes, order, count)


def block_scores(layout: BlockLayout, q_blk, k_blk, bias_blk) -> jax.Array:
    """Scaled scores ``[b, h, g, n, m]`` of queries ``[b, h, g, n, d]`` against keys
    ``[b, h, m, d]``, plus the block's bias (or ``None``), in float32."""
    s = matmul(layout, "bhgqd,bhkd->bhgqk", q_blk, k_blk) * jnp.float32(layout.scale)
    return s if bias_blk is None else s + bias_blk


def online_softmax_update(layout: BlockLayout, state, s, visible, v_blk, keep=None):
    """Folds one block of scores ``s [b, h, g, n, m]`` (where ``visible``; ``None``: all of
    it) and its values ``v_blk [b, h, m, dv]`` into the running ``(max [b, h, g, n], total,
    acc [.., dv])``; ``keep``: the dropout keep mask of the weights that reach the values."""
    m, total, acc = state
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    correction = jnp.exp(m - m_new)
    pv = plain_matmul(layout, "bhgqk,bhkd->bhgqd", dropped(p, keep), v_blk)
    return m_new, total * correction + p.sum(-1), acc * correction[..., None] + pv


def plain_matmul(layout: BlockLayout, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`matmul` for kernels whose derivatives are a JVP that JAX transposes: operands
    in the storage dtype, float32 result; its JVP is two :func:`linear_matmul` products, so
    that forward mode, reverse mode (their transposes) and higher orders all multiply
    16-bit operands."""
    if jnp.dtype(layout.dtype) == jnp.float32:
        return _einsum(spec, layout.dtype, layout.precision, a, b)
    return _matmul_jvp(spec, layout.dtype, layout.precision, a, b)


def linear_matmul(layout: BlockLayout, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` as a term of a tangent: operands in the storage dtype and the
    product rounded to it (float32 accumulation within), returned as float32. Its transpose
    (the backward pass) then multiplies 16-bit cotangents too; a float32 product would
    transpose into float32 x 16-bit matmuls."""
    return _einsum_to(spec, layout.dtype, layout.precision, a, b).astype(jnp.float32)


def _einsum_to(spec: str, dtype: Any, precision: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(
        spec, a.astype(dtype), b.astype(dtype), precision=precision, preferred_element_type=dtype
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _matmul_jvp(spec, dtype, precision, a, b):
    return _einsum(spec, dtype, precision, a, b)


@_matmul_jvp.defjvp
def _matmul_jvp_rule(spec, dtype, precision, primals, tangents):
    a, b = primals
    ta, tb = tangents
    out = _einsum(spec, dtype, precision, a, b)
    product = lambda x, y: _einsum_to(spec, dtype, precision, x, y).astype(jnp.float32)
    return out, product(ta, b) + product(a, tb)


def online_softmax_init(stats: tuple[int, ...], dv: int, sinks, *like):
    """The running ``(max, total, acc)`` before any key: empty, or the sink's logit
    (``sinks [1, h, g, 1]``) with its weight ``exp(0) = 1`` and no value."""
    acc = zeros_like_inputs((*stats, dv), *like)
    if sinks is None:
        empty = zeros_like_inputs(stats, *like)
        return empty + MASK_VALUE, empty, acc
    m = jnp.broadcast_to(sinks, stats) + zeros_like_inputs(stats, *like)
    return m, zeros_like_inputs(stats, *like, fill=1.0), acc


def online_softmax_result(m, total, acc) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a finished running softmax; rows that saw no key give 0 and 0."""
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe[..., None], jnp.where(seen, m + jnp.log(safe), 0.0)


def zeros_like_inputs(shape: tuple[int, ...], *like: Any, fill: float = 0.0):
    """A float32 constant that carries the (shard_map) variance of every array in ``like``
    (pytrees allowed), so loop carries keep one type when the inputs are sharded."""
    leaves = [a for a in jax.tree.leaves(like) if jnp.issubdtype(a.dtype, jnp.floating)]
    tie = sum(a.reshape(-1)[0].astype(jnp.float32) * 0.0 for a in leaves)
    return jnp.full(shape, fill, jnp.float32) + tie


def pad_to(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """``x`` padded with ``value`` at the end of ``axis`` up to ``size``."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def canonical_tokens(
    t: Tokens,
    batch_shape: tuple[int, ...],
    length: int,
    padded: int,
    index: jax.Array | None = None,
) -> Tokens:
    """``t`` (``[*batch or 1s, length]``) as ``[B, padded]`` with validity materialised
    (``False`` on the padding) and the sequence ``index`` (default ``0 .. padded - 1``)."""
    batch = math.prod(batch_shape)

    def flat(x):
        return jnp.broadcast_to(x, (*batch_shape, length)).reshape(batch, length)

    valid = jnp.ones((batch, length), bool) if t.valid is None else flat(t.valid)
    if index is None:
        index = jnp.arange(padded, dtype=jnp.int32)
    return Tokens(
        pad_to(flat(t.positions), 1, padded),
        pad_to(valid, 1, padded, False),
        None if t.segment_ids is None else pad_to(flat(t.segment_ids), 1, padded),
        pad_to(jnp.asarray(index, jnp.int32).reshape(1, -1), 1, padded),
    )


def slice_tokens(t: Tokens, start: Any, size: int) -> Tokens:
    """Tokens ``start .. start + size`` of ``[B, n]`` tokens."""
    return t.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1))


def canonicalize(
    call: AttentionCall,
    *,
    block_q: int,
    block_k: int,
    tokens: tuple[Tokens, Tokens] | None = None,
    autodiff: bool = False,
    function_block: tuple[int, int] | None = None,
    axis_name: str | None = None,
) -> Canonical:
    """Brings a validated call to the canonical layout, blocks of ``block_q`` x
    ``block_k`` (clipped to the lengths; lengths padded up to whole blocks).

    ``autodiff``: the kernel is differentiated by JAX through its blocks (no custom VJP):
    queries, keys and values are kept in float32 (the matmuls still take 16-bit operands),
    so that their gradients sum over blocks in float32.

    ``tokens`` replaces ``call.visibility.tokens()`` (ring attention on a device's shard);
    invalid tokens are then zeroed by their validity alone.

    ``function_block``: the ``(rows, columns)`` of the blocks ``score_fn`` and ``mask_fn``
    are evaluated on, when not ``block_q x block_k`` (ring attention's tiles);
    ``axis_name``: inside ``shard_map`` over it, they are traced and called on block inputs
    varying over it.
    """
    checks.check_block_sizes(block_q=block_q, block_k=block_k)
    batch_shape = call.batch_shape
    if tokens is None:
        query, key, value = call.safe_inputs()
        tokens = call.visibility.tokens()
    else:
        zero = lambda x, t: x if t.valid is None else jnp.where(t.valid[..., None, None], x, 0)
        query = zero(call.query, tokens[0])
        key, value = zero(call.key, tokens[1]), zero(call.value, tokens[1])
    q_len, heads, dim = query.shape[-3:]
    kv_len, kv_heads = key.shape[-3], key.shape[-2]
    batch = math.prod(batch_shape)
    groups = heads // kv_heads
    bq, bk = min(block_q, q_len), min(block_k, kv_len)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    dtype = storage_dtype(query, key, value)
    f32 = lambda x: x.astype(jnp.float32)
    store = f32 if autodiff else (lambda x: x.astype(dtype))

    q = store(query).reshape(batch, q_len, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    k = store(key).reshape(batch, kv_len, kv_heads, dim).transpose(0, 2, 1, 3)
    v = store(value).reshape(batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = pad_to(q, 3, nq * bq), pad_to(k, 2, nk * bk), pad_to(v, 2, nk * bk)

    bias = None
    if call.bias is not None:
        full = jnp.broadcast_to(f32(call.bias), (*batch_shape, heads, q_len, kv_len))
        bias = full.reshape(batch, kv_heads, groups, q_len, kv_len)
        bias = pad_to(pad_to(bias, 3, nq * bq), 4, nk * bk)
    mask = None
    if call.visibility.mask is not None:
        m = call.visibility.mask  # [*batch or 1s, heads or 1, q_len or 1, kv_len or 1]
        ones = (1,) * len(batch_shape)
        lead = batch_shape if m.shape[:-3] != ones else ones
        head_shape = (kv_heads, groups) if m.shape[-3] != 1 else (1, 1)
        m = jnp.broadcast_to(m, (*lead, m.shape[-3], q_len, kv_len))
        mask = m.reshape(math.prod(lead), *head_shape, q_len, kv_len)
        mask = pad_to(pad_to(mask, 3, nq * bq, False), 4, nk * bk, False)
    q_tokens, k_tokens = tokens
    layout = BlockLayout(
        q_len=q_len,
        kv_len=kv_len,
        kv_heads=kv_heads,
        groups=groups,
        block_q=bq,
        block_k=bk,
        num_q_blocks=nq,
        num_k_blocks=nk,
        scale=call.scale,
        is_causal=call.visibility.is_causal,
        window=call.visibility.window,
        precision=call.precision,
        dtype=dtype,
    )
    layout, extras = _block_functions(call, layout, batch, function_block or (bq, bk), axis_name)
    return Canonical(
        query=q,
        key=k,
        value=v,
        bias=bias,
        mask=mask,
        q_tokens=canonical_tokens(q_tokens, batch_shape, q_len, nq * bq),
        k_tokens=canonical_tokens(k_tokens, batch_shape, kv_len, nk * bk),
        layout=layout,
        batch_shape=batch_shape,
        heads=heads,
        out_dtype=call.out_dtype,
        **extras,
    )


def _block_functions(
    call: AttentionCall, layout: BlockLayout, batch: int, block: tuple, axis_name: str | None
):
    """``layout`` with the call's score pipeline (``score_fn`` and ``mask_fn`` converted at
    the shapes of a ``block`` of ``(rows, columns)``), and the :class:`Canonical` fields
    that go with it."""
    example = block_features.varying_inputs(
        block_features.example_block(layout.kv_heads, layout.groups, batch, *block), axis_name
    )
    scores = jnp.zeros((batch, layout.kv_heads, layout.groups, *block))
    scores = block_features.varying_inputs([scores], axis_name)[0]
    score_fn, score_consts = block_features.convert(call.score_fn, (scores, *example))
    mask_fn, mask_consts = block_features.convert(call.mask_fn, example)
    fns = block_features.BlockFunctions(
        score_fn=score_fn,
        mask_fn=mask_fn,
        soft_cap=call.logits_soft_cap,
        dropout_rate=call.dropout_rate,
        broadcast_dropout=call.broadcast_dropout,
        axis_name=axis_name,
    )
    sinks = None
    if call.sinks is not None:
        sinks = call.sinks.reshape(1, layout.kv_heads, layout.groups, 1)
    seed = None if call.dropout_rate == 0.0 else block_features.seed_words(call.dropout_rng)
    extras = dict(
        sinks=sinks,
        score_consts=score_consts,
        mask_consts=tuple(jax.lax.stop_gradient(x) for x in mask_consts),
        seed=seed,
    )
    return dataclasses.replace(layout, fns=fns), extras


def dropped(p: jax.Array, keep: jax.Array | None) -> jax.Array:
    """The weights ``p`` that reach the values: zero where dropout drops them (their
    ``1 / (1 - rate)`` scale is applied to the output by :func:`restore`)."""
    return p if keep is None else jnp.where(keep, p, 0.0)


def restore(out: jax.Array, c: Canonical) -> jax.Array:
    """``[B, kv_heads, groups, q_pad, dv]`` -> ``[batch..., q_len, heads, dv]``, times
    dropout's ``1 / (1 - rate)`` (the blocks only zero the dropped weights)."""
    out = out[:, :, :, : c.layout.q_len]
    if c.seed is not None:
        out = out * jnp.float32(block_features.dropout_scale(c.layout.fns))
    _, kv_heads, groups, q_len, dv = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(*c.batch_shape, q_len, kv_heads * groups, dv)
    return out.astype(c.out_dtype)


def restore_lse(lse: jax.Array, c: Canonical) -> jax.Array:
    """``[B, kv_heads, groups, q_pad]`` -> ``[batch..., q_len, heads]``."""
    lse = lse[..., : c.layout.q_len]
    _, kv_heads, groups, q_len = lse.shape
    return lse.transpose(0, 3, 1, 2).reshape(*c.batch_shape, q_len, kv_heads * groups)


def block_visible(
    layout: BlockLayout,
    q_tok: Tokens,
    k_tok: Tokens,
    mask_block: jax.Array | None,
    mask_consts: tuple = (),
) -> jax.Array:
    """``[B, 1 or kv_heads, 1 or groups, n, m]`` visibility of query tokens ``[B, n]`` to
    key tokens ``[B, m]``, with the block's slice of the dense mask and ``mask_fn``."""
    ok = vis.visible(q_tok, k_tok, is_causal=layout.is_causal, window=layout.window)
    ok = ok[:, None, None]
    if mask_block is not None:
        ok = ok & mask_block
    return block_features.apply_mask_fn(
        layout.fns, ok, layout.kv_heads, layout.groups, q_tok, k_tok, mask_consts
    )


def block_logits(
    layout: BlockLayout, q_blk, k_blk, bias_blk, q_tok, k_tok, score_consts, *, autodiff=False
):
    """Float32 logits ``[b, h, g, n, m]`` of queries ``[b, h, g, n, d]`` against keys
    ``[b, h, m, d]``: scaled, plus the bias block, through ``score_fn`` and the soft cap
    (``autodiff``: the kernel is differentiated by reverse-mode autodiff, :func:`matmul`)."""
    scores = (matmul if autodiff else plain_matmul)(layout, "bhgqd,bhkd->bhgqk", q_blk, k_blk)
    return block_features.logits(
        layout.fns, layout.scale, scores, bias_blk, q_tok, k_tok, score_consts
    )


def block_keep(layout: BlockLayout, seed, q_tok: Tokens, k_tok: Tokens):
    """The block's dropout keep mask (``None`` without dropout)."""
    return block_features.keep(layout.fns, seed, layout.kv_heads, layout.groups, q_tok, k_tok)


def slice_block(x: jax.Array | None, q_start: Any, k_start: Any, layout: BlockLayout):
    """``x[..., q_start:+block_q, k_start:+block_k]`` of a canonical mask/bias."""
    if x is None:
        return None
    return jax.lax.dynamic_slice(
        x, block_start(q_start, k_start), (*x.shape[:3], layout.block_q, layout.block_k)
    )


def block_start(q_start: Any, k_start: Any) -> tuple[jax.Array, ...]:
    """The int32 start ``(0, 0, 0, q_start, k_start)`` of a block of a canonical
    ``[B, h, g, q, kv]`` array (one index type, also under ``jax_enable_x64``)."""
    return tuple(jnp.asarray(i, jnp.int32) for i in (0, 0, 0, q_start, k_start))


def restore_mass(mass: jax.Array, c: Canonical) -> jax.Array:
    """``[B, kv_heads, groups, kv_pad]`` -> ``[batch..., heads, kv_len]``."""
    mass = mass[..., : c.layout.kv_len]
    return mass.reshape(*c.batch_shape, c.heads, c.layout.kv_len)


def key_mass(c: Canonical, plan: Plan, lse: jax.Array) -> jax.Array:
    """The attention mass ``[B, kv_heads, groups, kv_pad]`` every key receives (its weights
    ``exp(logit - lse)`` summed over the queries of each head), block by block over the
    blocks ``plan`` does not hide; ``lse [B, kv_heads, groups, q_pad]`` is the forward's.
    Computed without gradients."""
    return key_mass_of(
        c.layout, plan, c.query, c.key, c.bias, c.score_consts, c.q_tokens, c.k_tokens,
        c.mask, c.mask_consts, lse,
    )  # fmt: skip


def key_mass_of(
    layout: BlockLayout,
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    bias: jax.Array | None,
    score_consts: tuple,
    q_tokens: Tokens,
    k_tokens: Tokens,
    mask: jax.Array | None,
    mask_consts: tuple,
    lse: jax.Array,
) -> jax.Array:
    """:func:`key_mass` of queries ``q [B, h, g, q_pad, d]`` against keys ``k [B, h,
    kv_pad, d]`` (with their bias, tokens and dense mask, each or ``None``)."""
    q, k, bias, lse = jax.lax.stop_gradient((q, k, bias, lse))
    consts = jax.lax.stop_gradient(score_consts)
    bq, bk = layout.block_q, layout.block_k

    def query_block(iq, mass):
        q0 = iq * bq
        q_blk = jax.lax.dynamic_slice_in_dim(q, q0, bq, axis=3)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, q0, bq, axis=3)
        q_tok = slice_tokens(q_tokens, q0, bq)

        def key_block(t, mass):
            jk = plan.order[iq, t]
            k0 = jk * bk
            k_tok = slice_tokens(k_tokens, k0, bk)
            k_blk = jax.lax.dynamic_slice_in_dim(k, k0, bk, axis=2)
            s = block_logits(
                layout, q_blk, k_blk, slice_block(bias, q0, k0, layout), q_tok, k_tok, consts
            )
            shown = block_visible(
                layout, q_tok, k_tok, slice_block(mask, q0, k0, layout), mask_consts
            )
            p = jnp.where(shown, jnp.exp(jnp.minimum(s - lse_blk[..., None], 0.0)), 0.0)
            column = jax.lax.dynamic_slice_in_dim(mass, k0, bk, axis=3) + p.sum(-2)
            return jax.lax.dynamic_update_slice_in_dim(mass, column, k0, axis=3)

        return jax.lax.fori_loop(0, plan.count[iq], key_block, mass)

    init = zeros_like_inputs((*q.shape[:3], k.shape[2]), q, k)
    return jax.lax.fori_loop(0, layout.num_q_blocks, query_block, init)
