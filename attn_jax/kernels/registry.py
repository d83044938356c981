"""Registry of attention kernels: select any kernel by name, know what it supports.

Two kinds of kernel register here.

*Core* kernels (every ``dot_product`` kernel of attn_jax) take one validated
:class:`~attn_jax.kernels.api.AttentionCall` and their own options::

    @register("my_core", capabilities=Capabilities(mask=True, causal=True))
    def my_attention(call, *, block: int = 64):
        mask = call.visibility.dense_mask()  # who sees whom, in the kernel's own form
        ...
        return AttentionOutput(out)

``register`` returns their public function: the ``jax.nn.dot_product_attention`` signature
(plus the options), which goes through the front end
(:func:`attn_jax.kernels.dot_product_attention`): arguments are checked once there and the
kernel implements only its core.

*Plain* kernels are any function with the ``jax.nn`` signature (third-party code)::

    @register("my_kernel", capabilities=Capabilities(mask=True))
    def my_kernel(query, key, value, mask=None, *, scale=None):
        ...

    out = get("my_kernel")(q, k, v, mask=m)

Either way an argument outside the kernel's capabilities raises
:class:`~attn_jax.kernels.checks.UnsupportedArgumentError` (a ``ValueError``) naming it,
instead of being silently ignored. ``interface="dot_product"`` kernels are checked by the
conformance suite in ``tests/kernels`` automatically (the exact ones against the float64
reference).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from attn_jax.kernels.checks import UnsupportedArgumentError

__all__ = [
    "BLOCKWISE_FEATURES",
    "DECODE_FORMS",
    "EVERY_FEATURE",
    "TOKEN_VISIBILITY",
    "Capabilities",
    "KernelSpec",
    "available",
    "capabilities",
    "get",
    "register",
    "spec",
    "unregister",
]

# Capability name -> the keyword arguments it governs.
CAPABILITY_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "mask": ("mask",),
    "bias": ("bias",),
    "causal": ("is_causal",),
    "window": ("local_window_size",),
    "seq_lengths": ("query_seq_lengths", "key_value_seq_lengths"),
    "segments": ("query_segment_ids", "key_value_segment_ids"),
    "positions": ("query_positions", "key_value_positions", "causal_alignment"),
    "dropout": ("dropout_rate",),
    "weights": ("return_weights",),
    "residual": ("return_residual",),
    "score_fn": ("score_fn",),
    "mask_fn": ("mask_fn",),
    "soft_cap": ("logits_soft_cap",),
    "sinks": ("sinks",),
    "mass": ("return_attention_mass",),
}
# What every kernel that reads the visibility model's tokens (positions, validity, segment
# ids) supports: with a dense mask and bias too, a kernel supports every visibility feature.
TOKEN_VISIBILITY = frozenset({"causal", "window", "seq_lengths", "segments", "positions", "gqa"})
# Everything an exact kernel can support (the reference kernel's set).
EVERY_FEATURE = TOKEN_VISIBILITY | {
    "mask",
    "bias",
    "dropout",
    "weights",
    "residual",
    "score_fn",
    "mask_fn",
    "soft_cap",
    "sinks",
    "mass",
}
# What the exact blockwise kernels (flash, chunked, ring) support besides the tokens.
BLOCKWISE_FEATURES = TOKEN_VISIBILITY | {
    "mask",
    "bias",
    "dropout",
    "residual",
    "score_fn",
    "mask_fn",
    "soft_cap",
    "sinks",
    "mass",
}
# How a model layer decodes with the kernel: a KV cache it reads with query positions, a
# rolling cache of the last ``left + 1`` positions (sliding window), or a recurrent state.
DECODE_FORMS = ("kv_cache", "rolling_cache", "recurrent")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a kernel supports.

    Attributes:
      mask: boolean ``mask`` argument.
      bias: additive ``bias`` argument.
      causal: ``is_causal=True``.
      window: ``local_window_size=(left, right)``.
      seq_lengths: ``query_seq_lengths`` / ``key_value_seq_lengths`` padding.
      segments: ``query_segment_ids`` / ``key_value_segment_ids`` (packed sequences).
      positions: explicit ``query_positions`` / ``key_value_positions`` and
        ``causal_alignment="top_left"`` (what decoding from a KV cache uses).
      dropout: ``dropout_rate > 0`` with an explicit ``dropout_rng``.
      gqa: fewer key/value heads than query heads (grouped- or multi-query attention).
      weights: ``return_weights=True`` returns ``[batch..., heads, q_len, kv_len]`` weights.
      residual: ``return_residual=True`` returns the log-sum-exp ``[batch..., q_len, heads]``.
      score_fn: ``score_fn(score, batch, head, q_pos, kv_pos)`` modifies the logits.
      mask_fn: ``mask_fn(batch, head, q_pos, kv_pos)`` hides pairs.
      soft_cap: ``logits_soft_cap=cap``.
      sinks: ``sinks=`` per-head sink logits.
      mass: ``return_attention_mass=True`` returns ``[batch..., heads, kv_len]``.
      exact: computes softmax attention exactly (up to floating point); approximate
        kernels (linear, random features) set this to ``False``.
      interface: calling convention. ``"dot_product"`` kernels share the signature of
        ``jax.nn.dot_product_attention``; other kernels (``"additive"``,
        ``"multiplicative"``, ``"pooling"``) document their own.
      decode: how models decode with it (:data:`DECODE_FORMS`): ``"kv_cache"`` (needs
        ``positions`` and ``seq_lengths``, or else ``mask``: the layer then passes a dense
        mask), ``"rolling_cache"`` or ``"recurrent"`` (the registration names the
        recurrent form).
    """

    mask: bool = False
    bias: bool = False
    causal: bool = False
    window: bool = False
    seq_lengths: bool = False
    segments: bool = False
    positions: bool = False
    dropout: bool = False
    gqa: bool = False
    weights: bool = False
    residual: bool = False
    score_fn: bool = False
    mask_fn: bool = False
    soft_cap: bool = False
    sinks: bool = False
    mass: bool = False
    exact: bool = True
    interface: str = "dot_product"
    decode: str = "kv_cache"

    @classmethod
    def coerce(cls, value: Capabilities | Mapping[str, Any] | Iterable[str]) -> Capabilities:
        """Accepts a ``Capabilities``, a mapping of fields, or an iterable of feature names."""
        if isinstance(value, Capabilities):
            return value
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(value, Mapping):
            items = dict(value)
        elif isinstance(value, Iterable) and not isinstance(value, str):
            items = {str(name).lower(): True for name in value}
        else:
            raise ValueError(
                "register: argument 'capabilities' must be a Capabilities, a mapping or an "
                f"iterable of feature names, got {value!r}"
            )
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(
                f"register: argument 'capabilities' has unknown fields {unknown}; "
                f"known: {sorted(fields)}"
            )
        caps = cls(**items)
        if caps.decode not in DECODE_FORMS:
            raise ValueError(
                f"register: capability 'decode' must be one of {DECODE_FORMS}, got {caps.decode!r}"
            )
        return caps

    def supported(self) -> list[str]:
        """Names of the optional features this kernel supports."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.type in ("bool", bool) and f.name != "exact" and getattr(self, f.name)
        ]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A registered kernel.

    Attributes:
      name: registry name.
      fn: the public function (``jax.nn`` signature; unsupported arguments raise).
      capabilities: what it supports.
      core: for core kernels, ``core(call, **options)``; ``None`` for plain kernels.
      options: the names of the core's own keyword options (block sizes, ...).
      recurrent: for ``decode="recurrent"`` kernels, their recurrent form (an object with
        ``init(...)`` and ``step(...)``, see :mod:`attn_jax.kernels.feature_maps`).
    """

    name: str
    fn: Callable[..., Any]
    capabilities: Capabilities
    core: Callable[..., Any] | None = None
    options: tuple[str, ...] = ()
    recurrent: Any = None


_REGISTRY: dict[str, KernelSpec] = {}


def is_active(argument: str, value: Any) -> bool:
    """Whether ``value`` asks for the feature behind ``argument`` (``None``/off is inactive)."""
    if argument == "dropout_rate" and isinstance(value, int | float | np.number):
        return float(value) != 0.0
    if argument == "causal_alignment":
        return value != "bottom_right"
    return value is not None and value is not False


def refusal(name: str, caps: Capabilities, argument: str, capability: str) -> str:
    return (
        f"attention kernel {name!r} does not support argument {argument!r} "
        f"(capability {capability!r}); it supports {caps.supported()}"
    )


def _checked(name: str, fn: Callable[..., Any], caps: Capabilities) -> Callable[..., Any]:
    """Wraps a plain kernel ``fn`` so unsupported arguments raise instead of being dropped."""
    signature = inspect.signature(fn)
    parameters = signature.parameters
    takes_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    governed = {arg: cap for cap, args in CAPABILITY_ARGUMENTS.items() for arg in args}

    def refuse(arg: str) -> None:
        cap = governed.get(arg)
        if cap is not None and not getattr(caps, cap):
            raise UnsupportedArgumentError(refusal(name, caps, arg, cap))
        raise UnsupportedArgumentError(f"attention kernel {name!r} has no argument {arg!r}")

    def check(arg: str, value: Any) -> None:
        cap = governed.get(arg)
        if cap is not None and not getattr(caps, cap) and is_active(arg, value):
            refuse(arg)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        passed = {}
        for arg, value in kwargs.items():
            check(arg, value)  # whatever the signature (a **kwargs parameter included)
            unsupported = arg in governed and not getattr(caps, governed[arg])
            if (takes_var_kwargs or arg in parameters) and not unsupported:
                passed[arg] = value
            elif is_active(arg, value):
                refuse(arg)
            # else: an inactive argument for a feature the kernel lacks is a no-op: dropped.
        bound = signature.bind_partial(*args, **passed).arguments
        for arg, value in bound.items():
            if arg not in kwargs:  # passed positionally
                check(arg, value)
        if caps.interface == "dot_product" and not caps.gqa:
            query, key = bound.get("query"), bound.get("key")
            q_heads, kv_heads = np.shape(query)[-2:-1], np.shape(key)[-2:-1]
            if q_heads and kv_heads and q_heads != kv_heads:
                raise UnsupportedArgumentError(
                    f"attention kernel {name!r} does not support grouped-query attention: "
                    f"argument 'key' has {kv_heads[0]} heads but 'query' has {q_heads[0]}"
                )
        return fn(*args, **passed)

    wrapper.capabilities = caps  # type: ignore[attr-defined]
    wrapper.kernel_name = name  # type: ignore[attr-defined]
    return wrapper


def _is_core(fn: Callable[..., Any]) -> bool:
    parameters = list(inspect.signature(fn).parameters)
    return bool(parameters) and parameters[0] == "call"


def _core_options(name: str, core: Callable[..., Any]) -> tuple[str, ...]:
    parameters = list(inspect.signature(core).parameters.values())[1:]
    for p in parameters:
        if p.kind is not p.KEYWORD_ONLY:
            raise ValueError(
                f"register: kernel {name!r}: options after 'call' must be keyword-only, "
                f"got {p.name!r}"
            )
    return tuple(p.name for p in parameters)


def register(
    name: str,
    capabilities: Capabilities | Mapping[str, Any] | Iterable[str] | None = None,
    *,
    override: bool = False,
    recurrent: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an attention kernel under ``name``.

    Args:
      name: registry name, e.g. ``"dot_product"``.
      capabilities: what the kernel supports, as a :class:`Capabilities`, a mapping of its
        fields (``{"mask": True, "exact": False}``) or feature names (``{"mask", "causal"}``);
        arguments outside it raise ``ValueError``. Default: no optional feature, exact.
      override: replace an existing registration of the same name.
      recurrent: the recurrent form of a ``decode="recurrent"`` kernel.

    Returns:
      A decorator returning the kernel's public function (what callers should use): a
      core kernel (first parameter ``call``) bound to the front end, or a plain kernel
      wrapped so that unsupported arguments raise.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: argument 'name' must be a non-empty string, got {name!r}")
    capabilities = Capabilities() if capabilities is None else Capabilities.coerce(capabilities)
    if capabilities.decode == "recurrent" and recurrent is None:
        raise ValueError(f"register: kernel {name!r} decodes 'recurrent' but gives no recurrent")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not override:
            raise ValueError(
                f"attention kernel {name!r} is already registered; pass override=True to replace"
            )
        if _is_core(fn):
            from attn_jax.kernels import api  # the front end imports this module

            options = _core_options(name, fn)
            public = api.bind_kernel(name, fn, options)
            entry = KernelSpec(name, public, capabilities, fn, options, recurrent)
        else:
            public = _checked(name, fn, capabilities)
            entry = KernelSpec(name, public, capabilities, recurrent=recurrent)
        _REGISTRY[name] = entry
        return public

    return decorator


def unregister(name: str) -> None:
    """Removes ``name`` from the registry (for tests and interactive use)."""
    spec(name)
    del _REGISTRY[name]


def spec(name: str) -> KernelSpec:
    """The :class:`KernelSpec` registered as ``name``; ``ValueError`` naming the choices if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention kernel {name!r}; available: {', '.join(available())}"
        ) from None


def get(name: str) -> Callable[..., Any]:
    """The kernel registered as ``name`` (checked: unsupported arguments raise)."""
    return spec(name).fn


def capabilities(name: str) -> Capabilities:
    """The :class:`Capabilities` of kernel ``name``."""
    return spec(name).capabilities


def available(*, interface: str | None = None, exact: bool | None = None) -> list[str]:
    """Sorted names of registered kernels, optionally filtered by interface and exactness."""
    return sorted(
        n
        for n, s in _REGISTRY.items()
        if (interface is None or s.capabilities.interface == interface)
        and (exact is None or s.capabilities.exact == exact)
    )
