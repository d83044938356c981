"""The attention front end: one signature, validated once, routed through the registry.

:func:`dot_product_attention` takes the arguments of ``jax.nn.dot_product_attention`` (and
flax's ``attention_fn``), plus segment ids, explicit positions and the causal alignment;
checks them once, builds the :class:`~attn_jax.kernels.visibility.Visibility` of the call,
and hands the resulting :class:`AttentionCall` to the kernel chosen by ``implementation``:

- a registry name: that kernel (its own options, e.g. ``block_q=``, may be passed too);
- a list of names: tried in order, falling through on
  :class:`~attn_jax.kernels.checks.UnsupportedArgumentError` ("cannot honour this
  argument");
- ``None``: the dispatch table (:data:`DISPATCH`) picks the fastest registered exact
  kernel that supports the arguments on this backend and shape.

Every registered kernel's public function (``kernels.get(name)``) is this front end with
``implementation=name``. Called eagerly, it runs the whole call compiled
(:mod:`attn_jax.kernels.eager`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.kernels import checks, eager, registry
from attn_jax.kernels import visibility as vis
from attn_jax.kernels.checks import AttentionInputError, UnsupportedArgumentError

__all__ = [
    "DISPATCH",
    "AttentionCall",
    "AttentionOutput",
    "DispatchRule",
    "bind",
    "dispatch",
    "dot_product_attention",
]


class AttentionOutput(NamedTuple):
    """What a core kernel returns: ``out [*batch, q_len, heads, v_dim]`` and, when asked
    for, the log-sum-exp ``residual [*batch, q_len, heads]``, ``weights [*batch, heads,
    q_len, kv_len]`` and the per-key attention ``mass [*batch, heads, kv_len]`` (float32)."""

    out: jax.Array
    residual: jax.Array | None = None
    weights: jax.Array | None = None
    mass: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One attention call, validated: what every core kernel receives.

    Attributes:
      query: ``[*batch, q_len, heads, head_dim]`` (in ``dtype`` if one was given).
      key: ``[*batch, kv_len, kv_heads, head_dim]``.
      value: ``[*batch, kv_len, kv_heads, v_dim]``.
      bias: additive bias of full rank ``[*batch, heads, q_len, kv_len]`` (dimensions of
        size 1 broadcast), or ``None``.
      visibility: who sees whom.
      scale: logit scale.
      dropout_rate, dropout_rng, broadcast_dropout: attention-weight dropout (rate 0: off).
      precision: ``jax.lax.Precision`` for the matmuls.
      out_dtype: dtype of the output.
      score_fn: ``score_fn(score, batch, head, q_pos, kv_pos)``, or ``None``.
      mask_fn: ``mask_fn(batch, head, q_pos, kv_pos)``, or ``None``.
      logits_soft_cap: ``cap`` of ``cap * tanh(logits / cap)``, or ``None``.
      sinks: float32 ``[heads]`` sink logits, or ``None``.
      return_weights, return_residual, return_attention_mass: what the caller wants back.
      finite_kv_padding: the caller promises that keys and values no query sees are
        finite, so :meth:`safe_inputs` leaves them as they are.
      requested: capability -> the argument that asks for it (for error messages).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    visibility: vis.Visibility
    scale: float
    dropout_rate: float
    dropout_rng: jax.Array | None
    broadcast_dropout: bool
    precision: Any
    out_dtype: Any
    return_weights: bool
    return_residual: bool
    requested: dict[str, str]
    residual_like_jax: bool = False
    finite_kv_padding: bool = False
    score_fn: Callable[..., jax.Array] | None = None
    mask_fn: Callable[..., jax.Array] | None = None
    logits_soft_cap: float | None = None
    sinks: jax.Array | None = None
    return_attention_mass: bool = False

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.query.shape[:-3])

    @property
    def heads(self) -> int:
        return self.query.shape[-2]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[-2]

    def outputs(self, result: AttentionOutput) -> jax.Array | tuple[jax.Array, ...]:
        """``result`` as the caller asked for it: the output, then the weights, the residual
        and the attention mass, those requested (the ``jax.nn`` / flax convention)."""
        extras = []
        if self.return_weights:
            extras.append(result.weights)
        if self.return_residual:
            residual = result.residual
            if self.residual_like_jax and residual is not None:  # jax.nn's: no gradient
                residual = jax.lax.stop_gradient(residual.astype(self.key.dtype))
            extras.append(residual)
        if self.return_attention_mass:
            extras.append(result.mass)
        if any(x is None for x in extras):
            raise RuntimeError("the attention kernel did not return what was asked")
        return (result.out, *extras) if extras else result.out

    def safe_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(query, key, value)`` with every token that can neither see nor be seen set to
        zero, so that what padding or masked positions hold (NaN, inf) never reaches the
        output or the gradients (keys and values stay as they are with
        ``finite_kv_padding``: finite values there change nothing)."""
        q_ok, k_ok = self.visibility.reachable(self.kv_heads)
        query, key, value = self.query, self.key, self.value
        if q_ok is not None:
            query = jnp.where(q_ok, query, jnp.zeros((), query.dtype))
        if k_ok is not None and not self.finite_kv_padding:
            key = jnp.where(k_ok, key, jnp.zeros((), key.dtype))
            value = jnp.where(k_ok, value, jnp.zeros((), value.dtype))
        return query, key, value


def _requested(visibility: vis.Visibility, bias, heads, kv_heads, given: dict) -> dict[str, str]:
    """Capability -> argument name, for what this call asks of a kernel."""
    wants: dict[str, str] = {}
    for capability, arguments in registry.CAPABILITY_ARGUMENTS.items():
        for argument in arguments:
            if argument in given and registry.is_active(argument, given[argument]):
                wants.setdefault(capability, argument)
    if bias is not None:
        wants["bias"] = "bias"
    if visibility.mask is not None:
        wants["mask"] = "mask"
    if heads != kv_heads:
        wants["gqa"] = "key"
    return wants


def bind(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    **arguments: Any,
) -> AttentionCall:
    """Checks the arguments of :func:`dot_product_attention` (errors name the argument)
    and returns the :class:`AttentionCall`.

    ``arguments`` are the keyword arguments of :func:`dot_product_attention` (without
    ``module``, ``implementation`` and kernel options), with its defaults.
    """
    defaults = _call_arguments()
    unknown = sorted(set(arguments) - set(defaults))
    if unknown:
        checks.fail(unknown[0], f"not an argument of dot_product_attention ({sorted(defaults)})")
    a = {**defaults, **arguments}
    given = {"bias": bias, "mask": mask, **a}
    if np.shape(query)[-3:-2] == np.shape(key)[-3:-2]:
        given.pop("causal_alignment")  # the alignments agree when q_len == kv_len
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    checks.check_qkv(query, key, value)
    if a["dtype"] is None:
        checks.check_same_dtype(query, key, value)
        out_dtype = query.dtype
    else:
        out_dtype = jnp.dtype(a["dtype"])
        query, key, value = (x.astype(out_dtype) for x in (query, key, value))
    batch_shape = tuple(query.shape[:-3])
    q_len, heads, head_dim = query.shape[-3:]
    kv_len, kv_heads = key.shape[-3:-1]
    target = (*batch_shape, heads, q_len, kv_len)
    if bias is not None:
        bias = jnp.asarray(bias)
        checks.check_broadcastable(bias, target, "bias")
        bias = checks.full_rank(bias, target, "bias")
    visibility = vis.build(
        batch_shape, heads, q_len, kv_len, mask=mask, **{k: a[k] for k in vis.BUILD_ARGUMENTS}
    )
    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    try:
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        checks.fail("scale", f"expected a concrete float, got {scale!r}")
    rate = 0.0 if a["deterministic"] else _dropout_rate(a["dropout_rate"])
    if rate > 0.0 and a["dropout_rng"] is None:
        checks.fail("dropout_rng", "a jax.random key is required when dropout_rate > 0")
    given["dropout_rate"] = rate
    for name in ("score_fn", "mask_fn"):
        if a[name] is not None and not callable(a[name]):
            checks.fail(name, f"expected a callable or None, got {a[name]!r}")
    return AttentionCall(
        query=query,
        key=key,
        value=value,
        bias=bias,
        visibility=visibility,
        scale=scale,
        dropout_rate=rate,
        dropout_rng=a["dropout_rng"] if rate > 0.0 else None,
        broadcast_dropout=bool(a["broadcast_dropout"]),
        # Hashable: blockwise kernels carry it in their static layouts.
        precision=tuple(p) if isinstance(p := a["precision"], list) else p,
        out_dtype=out_dtype,
        return_weights=bool(a["return_weights"]),
        return_residual=bool(a["return_residual"]),
        residual_like_jax=_residual_mode(a["return_residual"]),
        requested=_requested(visibility, bias, heads, kv_heads, given),
        finite_kv_padding=_flag(a["finite_kv_padding"], "finite_kv_padding"),
        score_fn=a["score_fn"],
        mask_fn=a["mask_fn"],
        logits_soft_cap=_soft_cap(a["logits_soft_cap"]),
        sinks=_sinks(a["sinks"], heads),
        return_attention_mass=_flag(a["return_attention_mass"], "return_attention_mass"),
    )


@functools.cache
def _call_arguments() -> dict[str, Any]:
    """The keyword arguments of :func:`dot_product_attention` that :func:`bind` checks,
    with their defaults (one signature for both)."""
    skip = {"query", "key", "value", "bias", "mask", "module", "implementation"}
    return {
        name: p.default
        for name, p in inspect.signature(dot_product_attention).parameters.items()
        if name not in skip and p.kind is p.KEYWORD_ONLY
    }


def _residual_mode(value: Any) -> bool:
    """Whether ``return_residual`` asks for jax.nn's residual (``"jax.nn"``)."""
    if value == "jax.nn":
        return True
    if isinstance(value, bool | np.bool_):
        return False
    checks.fail("return_residual", f"expected a bool or 'jax.nn', got {value!r}")


def _flag(value: Any, name: str) -> bool:
    """``value`` as a Python bool (numpy bools too); anything else names ``name``."""
    if not isinstance(value, bool | np.bool_):
        checks.fail(name, f"expected True or False, got {value!r}")
    return bool(value)


def _soft_cap(cap: Any) -> float | None:
    """``logits_soft_cap`` as a positive Python float (``None`` stays)."""
    if cap is None:
        return None
    try:
        value = float(cap)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        value = None
    if value is None or np.ndim(cap) != 0 or not value > 0.0 or not math.isfinite(value):
        checks.fail("logits_soft_cap", f"expected a concrete positive float or None, got {cap!r}")
    return value


def _sinks(sinks: Any, heads: int) -> jax.Array | None:
    """``sinks`` (a float or an array broadcastable to ``[heads]``) as float32 ``[heads]``."""
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating) and not jnp.issubdtype(
        sinks.dtype, jnp.integer
    ):
        checks.fail("sinks", f"expected a float or a float array [heads], got dtype {sinks.dtype}")
    if sinks.ndim > 1 or (sinks.ndim == 1 and sinks.shape[0] not in (1, heads)):
        checks.fail("sinks", f"expected a scalar or shape [{heads}] (per head), got {sinks.shape}")
    return jnp.broadcast_to(sinks.astype(jnp.float32), (heads,))


def _dropout_rate(rate: Any) -> float:
    """``rate`` as a Python float in ``[0, 1)`` (numpy and concrete 0-d jax scalars too)."""
    try:
        value = float(rate)
    except (TypeError, jax.errors.ConcretizationTypeError):
        value = None
    if value is None or np.ndim(rate) != 0 or not 0.0 <= value < 1.0:
        checks.fail("dropout_rate", f"expected a concrete float in [0, 1), got {rate!r}")
    return value


def check_supported(spec: registry.KernelSpec, call: AttentionCall) -> None:
    """Raises :class:`UnsupportedArgumentError` if ``spec`` cannot honour ``call``."""
    caps = spec.capabilities
    if caps.interface != "dot_product":
        raise UnsupportedArgumentError(
            f"attention kernel {spec.name!r} has interface {caps.interface!r}, not 'dot_product'"
        )
    for capability, argument in call.requested.items():
        if capability == "gqa":
            if not caps.gqa:
                raise UnsupportedArgumentError(
                    f"attention kernel {spec.name!r} does not support grouped-query attention: "
                    f"argument 'key' has {call.kv_heads} heads but 'query' has {call.heads}"
                )
        elif not getattr(caps, capability):
            raise UnsupportedArgumentError(registry.refusal(spec.name, caps, argument, capability))


def _run(spec: registry.KernelSpec, call: AttentionCall, raw: dict, options: dict):
    """Runs one kernel: a core on the validated call, a plain kernel on the raw arguments."""
    if spec.core is None:
        return spec.fn(*raw.pop("__args__"), **raw, **options)
    check_supported(spec, call)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise AttentionInputError(
            f"attention kernel {spec.name!r} has no argument {unknown[0]!r} "
            f"(its options: {list(spec.options)})"
        )
    result = spec.core(call, **options)
    if not isinstance(result, AttentionOutput):  # a bare output array
        result = AttentionOutput(result)
    return call.outputs(result)


@dataclasses.dataclass(frozen=True)
class DispatchRule:
    """Use ``kernel`` for calls with at least these lengths (and whose arguments it
    supports)."""

    kernel: str
    min_q_len: int = 0
    min_kv_len: int = 0

    def applies(self, call: AttentionCall) -> bool:
        return call.visibility.q_len >= self.min_q_len and call.visibility.kv_len >= self.min_kv_len


# implementation=None: the first rule (per backend) that applies and whose kernel supports
# the call. Derived from experiments/bench_kernels.py on a 2-core x86 CPU (README,
# "Dispatch"): `flash` overtakes the dense kernel from 1,024 queries x 1,024 keys, forward
# and backward, causal or not; below that, and for everything only the dense kernel does
# (dropout, returned weights), `dot_product`. GPU and TPU have not been measured here: they
# use the dense XLA kernel until they are.
DISPATCH: dict[str, tuple[DispatchRule, ...]] = {
    "cpu": (DispatchRule("flash", min_q_len=1024, min_kv_len=1024), DispatchRule("dot_product")),
}
_DEFAULT_RULES = (DispatchRule("dot_product"),)


def dispatch(call: AttentionCall, backend: str | None = None) -> str:
    """The kernel ``implementation=None`` runs for ``call`` on ``backend`` (default: jax's)."""
    rules = DISPATCH.get(backend or jax.default_backend(), _DEFAULT_RULES)
    for rule in rules:
        if not rule.applies(call):
            continue
        try:
            check_supported(registry.spec(rule.kernel), call)
        except (UnsupportedArgumentError, ValueError):
            continue
        return rule.kernel
    return "dot_product"


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_value_segment_ids: jax.Array | None = None,
    query_positions: jax.Array | None = None,
    key_value_positions: jax.Array | None = None,
    causal_alignment: str = "bottom_right",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = False,
    dtype: Any = None,
    precision: Any = None,
    score_fn: Callable[..., jax.Array] | None = None,
    mask_fn: Callable[..., jax.Array] | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | float | None = None,
    return_weights: bool = False,
    return_residual: bool | str = False,
    return_attention_mass: bool = False,
    deterministic: bool = False,
    finite_kv_padding: bool = False,
    module: Any = None,
    implementation: str | Sequence[str] | None = None,
    **kernel_options: Any,
) -> jax.Array | tuple[jax.Array, ...]:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v``, with optional
    score and mask functions, logit soft-capping and attention sinks.

    A drop-in for ``jax.nn.dot_product_attention`` and ``flax.linen.dot_product_attention``
    (same layouts and arguments), with one difference stated precisely: ``is_causal`` and
    ``local_window_size`` are aligned **bottom-right** by default (query ``i`` of ``q_len``
    sits at key position ``i + kv_len - q_len``, what a KV cache needs); pass
    ``causal_alignment="top_left"`` for the alignment of ``jax.nn`` and flax (query ``i``
    at key position ``i``). The two agree when ``q_len == kv_len``.

    Args:
      query: ``[batch..., q_len, heads, head_dim]``.
      key: ``[batch..., kv_len, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA:
        query head ``h`` uses kv head ``h // (heads // kv_heads)``).
      value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
      bias: additive logits bias broadcastable to ``[batch..., heads, q_len, kv_len]``.
      mask: boolean, broadcastable to ``[batch..., heads, q_len, kv_len]``; True = attend.
      scale: logit scale; default ``1 / sqrt(head_dim)``.
      is_causal: a query sees keys at positions ``<=`` its own.
      local_window_size: ``w`` or ``(left, right)``: a query at position ``p`` sees keys at
        positions ``p - left .. p + right``.
      query_seq_lengths: ``[batch...]`` valid query lengths (padded rows give zeros).
      key_value_seq_lengths: ``[batch...]`` valid key/value lengths.
      query_segment_ids: ``[batch..., q_len]`` integer segment ids of packed sequences:
        queries only see keys of their own segment.
      key_value_segment_ids: ``[batch..., kv_len]``; defaults to ``query_segment_ids``
        when ``q_len == kv_len``.
      query_positions: ``[batch..., q_len]`` integer positions of the queries (default: by
        ``causal_alignment``); e.g. ``cache_length + arange(q_len)`` per sequence.
      key_value_positions: ``[batch..., kv_len]`` integer positions of the keys (default
        ``0 .. kv_len - 1``).
      causal_alignment: ``"bottom_right"`` (default) or ``"top_left"``: the default query
        positions.
      dropout_rate: dropout on the attention weights; needs ``dropout_rng``.
      dropout_rng: ``jax.random`` key for dropout.
      broadcast_dropout: share the dropout pattern across batch dimensions and heads
        (flax).
      dtype: compute/output dtype (default: the query's dtype for the output).
      precision: ``jax.lax.Precision`` for the matmuls.
      score_fn: ``score_fn(score, batch, head, q_pos, kv_pos) -> score``, applied to the
        float32 logits ``q . k * scale + bias`` (ALiBi, T5 buckets, ...; see
        :mod:`attn_jax.kernels.patterns`). Its arguments are arrays that broadcast against
        each other to the shape of the logits being computed (a block of them in the
        blockwise kernels; ranks unspecified), so it must be elementwise: ``batch`` is the
        row-major flattened batch index, ``head`` the query head, ``q_pos`` / ``kv_pos``
        the positions of the visibility model (right when decoding from a cache). Arrays
        it closes over (a learned table) get gradients.
      mask_fn: ``mask_fn(batch, head, q_pos, kv_pos) -> bool`` (True = attend), combined
        with the other visibility arguments; the same broadcasting contract. Blockwise
        kernels classify blocks from it once per call (evaluated block by block, never as
        a ``q_len x kv_len`` array), skip blocks it hides and do not evaluate it on blocks
        it shows entirely. Keys it hides from every query must hold finite values.
      logits_soft_cap: ``cap``: logits become ``cap * tanh(logits / cap)`` (Gemma 2),
        after ``score_fn`` and before masking.
      sinks: attention-sink logits, a float or ``[heads]`` (learned: gets gradients): one
        extra logit per head that takes softmax mass but has no value (gpt-oss);
        ``sinks=0.0`` is "softmax + 1" (``exp(s) / (1 + sum exp(s))``). Rows that see no
        key give zeros; the residual includes the sink.
      return_weights: also return float32 weights ``[batch..., heads, q_len, kv_len]``.
      return_residual: also return the log-sum-exp ``[batch..., q_len, heads]``: ``True``
        in float32 and with its true gradient (a loss may use it, e.g. z-loss);
        ``"jax.nn"`` as ``jax.nn.dot_product_attention`` returns it, in the key's dtype and
        with its gradient stopped.
      return_attention_mass: also return the float32 attention mass each key receives,
        ``[batch..., heads, kv_len]``: the weights summed over queries (before dropout,
        without the sink; ``.sum(-2)`` sums heads). Blockwise kernels compute it block by
        block; no gradient flows through it.
      deterministic: turn dropout off (flax's ``attention_fn`` convention).
      finite_kv_padding: a promise that every key and value no query sees (padding past
        ``key_value_seq_lengths``, masked-out or out-of-window keys) is finite, e.g. the
        zeros of a KV cache's unused slots. Kernels then skip the pass that zeroes them (a
        read and write of all of ``key`` and ``value``, most of a decoding step's cost);
        outputs and gradients are unchanged for finite values, NaN or inf there would
        reach them. Default False: whatever padding holds is harmless.
      module: a flax module to ``sow`` the weights into as ``('intermediates',
        'attention_weights')``; flax passes it when called with ``sow_weights=True``.
        With ``deterministic`` and ``module`` this function can be passed directly as
        ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` (masks must then be
        boolean; :func:`attn_jax.kernels.flax_attention_fn` converts flax's float masks).
      implementation: ``None`` (the fastest kernel that supports the arguments on this
        backend and shape, see :data:`DISPATCH`), a registry name (``"xla"`` means
        ``"dot_product"``, as in ``jax.nn``), or a list of names tried in order.
      **kernel_options: options of the one kernel named by ``implementation`` (e.g.
        ``block_q=`` for ``"flash"``).

    Returns:
      ``[batch..., q_len, heads, v_head_dim]``, then the weights, residual and attention
      mass, those requested, in that order.
      Query rows with no visible key give zeros (and zero weights); what padded or masked
      positions hold never reaches outputs or gradients (unless ``finite_kv_padding``
      promised it finite).
    """
    raw = {k: v for k, v in locals().items() if k in _call_arguments()}
    if module is None and eager.ours(implementation):
        parts = eager.split(
            {
                "query": query, "key": key, "value": value, "bias": bias, "mask": mask,
                "implementation": implementation, **raw, **kernel_options,
            }
        )  # fmt: skip
        if parts is not None:
            return eager.compiled_call(dot_product_attention, *parts)
    names = _implementations(implementation)
    if kernel_options and (names is None or len(names) != 1):
        raise AttentionInputError(
            f"argument {next(iter(kernel_options))!r}: kernel options need one named "
            "implementation (implementation='flash', ...)"
        )
    call = bind(query, key, value, bias, mask, **raw)
    # A plain kernel gets the arguments as given, those that ask for something; dropout
    # after `deterministic`.
    plain_raw = {
        k: v
        for k, v in raw.items()
        if v is not None
        and registry.is_active(k, v)
        and k not in ("deterministic", "finite_kv_padding")  # a hint, not a request
    }
    if call.dropout_rate == 0.0:
        for name in ("dropout_rate", "dropout_rng", "broadcast_dropout"):
            plain_raw.pop(name, None)
    if module is not None:  # flax's sow_weights: the weights are needed
        requested = {**call.requested, "weights": "module"}
        call = dataclasses.replace(call, return_weights=True, requested=requested)
        plain_raw["return_weights"] = True
    if names is None:
        names = [dispatch(call)]
    failures = []
    for name in names:
        spec = registry.spec(name)
        try:
            outputs = _run(
                spec,
                call,
                {"__args__": (query, key, value, bias, mask), **plain_raw},
                kernel_options,
            )
            break
        except UnsupportedArgumentError as error:
            if len(names) == 1:
                raise
            failures.append(f"{name}: {error}")
    else:
        raise UnsupportedArgumentError(
            "argument 'implementation': no kernel of "
            + f"{names} can honour this call; "
            + "; ".join(failures)
        )
    if module is None:
        return outputs
    sow_weights(module, outputs[1])
    if not return_weights:
        outputs = (outputs[0], *outputs[2:])
    return outputs if len(outputs) > 1 else outputs[0]


def sow_weights(module: Any, weights: jax.Array) -> None:
    """Records ``weights`` the way the calling flax API does: linen modules sow into the
    ``'intermediates'`` collection as ``attention_weights``, NNX modules into an
    ``nnx.Intermediate`` of that name."""
    from flax import nnx

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)


def _implementations(implementation: Any) -> list[str] | None:
    if implementation is None:
        return None
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    if not names or not all(isinstance(n, str) for n in names):
        raise AttentionInputError(
            f"argument 'implementation': expected None, a kernel name or a list of names, got "
            f"{implementation!r}"
        )
    names = ["dot_product" if n == "xla" else n for n in names]
    for name in names:
        try:
            spec = registry.spec(name)
        except ValueError as error:
            raise AttentionInputError(f"argument 'implementation': {error}") from None
        if spec.capabilities.interface != "dot_product":
            raise AttentionInputError(
                f"argument 'implementation': {name!r} has interface "
                f"{spec.capabilities.interface!r}, not 'dot_product'"
            )
    return names


def bind_kernel(name: str, core: Callable[..., Any], options: tuple[str, ...]):
    """The public function of core kernel ``name``: the front end with
    ``implementation=name``, whose signature lists the kernel's own options."""
    front = inspect.signature(dot_product_attention)
    keep = [p for n, p in front.parameters.items() if n not in ("implementation", "kernel_options")]
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for n, p in inspect.signature(core).parameters.items()
        if n in options
    ]

    @functools.wraps(core)
    def kernel(query, key, value, bias=None, mask=None, **kwargs):
        if kwargs.pop("implementation", None) not in (None, name):
            raise AttentionInputError(
                f"argument 'implementation': this function is kernel {name!r}; use "
                "kernels.dot_product_attention to choose another"
            )
        return dot_product_attention(query, key, value, bias, mask, implementation=name, **kwargs)

    kernel.__signature__ = front.replace(parameters=keep + own)  # type: ignore[attr-defined]
    kernel.__doc__ = (core.__doc__ or "") + (
        "\n\n    Takes every argument of :func:`attn_jax.kernels.dot_product_attention` (those "
        "outside\n    its capabilities raise ``UnsupportedArgumentError`` naming them).\n"
    )
    kernel.kernel_name = name  # type: ignore[attr-defined]
    del kernel.__wrapped__  # inspect.signature must read __signature__, not the core's
    return kernel
