"""Registry of attention kernels: select any kernel by name, know what it supports.

A kernel is registered with :func:`register`, which wraps it so that an argument the
kernel cannot honour raises a ``ValueError`` that names the argument instead of being
silently ignored. Third-party code registers its own kernels the same way::

    from attn_jax import kernels

    @kernels.register("my_kernel", capabilities=kernels.Capabilities(mask=True))
    def my_kernel(query, key, value, mask=None, *, scale=None):
        ...

    out = kernels.get("my_kernel")(q, k, v, mask=m)

Kernels with ``interface="dot_product"`` take ``(query, key, value, bias=None, mask=None,
**options)`` with the layout of ``jax.nn.dot_product_attention`` and are checked by the
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

__all__ = [
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
_CAPABILITY_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "mask": ("mask",),
    "bias": ("bias",),
    "causal": ("is_causal",),
    "window": ("local_window_size",),
    "seq_lengths": ("query_seq_lengths", "key_value_seq_lengths"),
    "dropout": ("dropout_rate",),
    "weights": ("return_weights",),
    "residual": ("return_residual",),
}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a kernel supports.

    Attributes:
      mask: boolean ``mask`` argument.
      bias: additive ``bias`` argument.
      causal: ``is_causal=True`` (bottom-right aligned).
      window: ``local_window_size=(left, right)``.
      seq_lengths: ``query_seq_lengths`` / ``key_value_seq_lengths`` padding.
      dropout: ``dropout_rate > 0`` with an explicit ``dropout_rng``.
      gqa: fewer key/value heads than query heads (grouped- or multi-query attention).
      weights: ``return_weights=True`` returns ``[batch..., heads, q_len, kv_len]`` weights.
      residual: ``return_residual=True`` returns the log-sum-exp ``[batch..., q_len, heads]``.
      exact: computes softmax attention exactly (up to floating point); approximate
        kernels (linear, random features) set this to ``False``.
      interface: calling convention. ``"dot_product"`` kernels share the signature of
        ``jax.nn.dot_product_attention``; other kernels (``"additive"``,
        ``"multiplicative"``, ``"pooling"``) document their own.
    """

    mask: bool = False
    bias: bool = False
    causal: bool = False
    window: bool = False
    seq_lengths: bool = False
    dropout: bool = False
    gqa: bool = False
    weights: bool = False
    residual: bool = False
    exact: bool = True
    interface: str = "dot_product"

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
        return cls(**items)

    def supported(self) -> list[str]:
        """Names of the optional features this kernel supports."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.type in ("bool", bool) and f.name != "exact" and getattr(self, f.name)
        ]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A registered kernel: its name, the checked callable, and its capabilities."""

    name: str
    fn: Callable[..., Any]
    capabilities: Capabilities


_REGISTRY: dict[str, KernelSpec] = {}


def _is_active(argument: str, value: Any) -> bool:
    """Whether ``value`` asks for the feature behind ``argument`` (``None``/off is inactive)."""
    if argument == "dropout_rate" and isinstance(value, int | float | np.number):
        return float(value) != 0.0
    return value is not None and value is not False


def _checked(name: str, fn: Callable[..., Any], caps: Capabilities) -> Callable[..., Any]:
    """Wraps ``fn`` so unsupported arguments raise instead of being dropped."""
    signature = inspect.signature(fn)
    parameters = signature.parameters
    takes_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    governed = {arg: cap for cap, args in _CAPABILITY_ARGUMENTS.items() for arg in args}

    def refuse(arg: str) -> None:
        cap = governed.get(arg)
        if cap is not None and not getattr(caps, cap):
            raise ValueError(
                f"attention kernel {name!r} does not support argument {arg!r} "
                f"(capability {cap!r}); it supports {caps.supported()}"
            )
        raise ValueError(f"attention kernel {name!r} has no argument {arg!r}")

    def check(arg: str, value: Any) -> None:
        cap = governed.get(arg)
        if cap is not None and not getattr(caps, cap) and _is_active(arg, value):
            refuse(arg)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        passed = {}
        for arg, value in kwargs.items():
            check(arg, value)  # whatever the signature (a **kwargs parameter included)
            unsupported = arg in governed and not getattr(caps, governed[arg])
            if (takes_var_kwargs or arg in parameters) and not unsupported:
                passed[arg] = value
            elif _is_active(arg, value):
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
                raise ValueError(
                    f"attention kernel {name!r} does not support grouped-query attention: "
                    f"argument 'key' has {kv_heads[0]} heads but 'query' has {q_heads[0]}"
                )
        return fn(*args, **passed)

    wrapper.capabilities = caps  # type: ignore[attr-defined]
    wrapper.kernel_name = name  # type: ignore[attr-defined]
    return wrapper


def register(
    name: str,
    capabilities: Capabilities | Mapping[str, Any] | Iterable[str] | None = None,
    *,
    override: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an attention kernel under ``name``.

    Args:
      name: registry name, e.g. ``"dot_product"``.
      capabilities: what the kernel supports, as a :class:`Capabilities`, a mapping of its
        fields (``{"mask": True, "exact": False}``) or feature names (``{"mask", "causal"}``);
        arguments outside it raise ``ValueError``. Default: no optional feature, exact.
      override: replace an existing registration of the same name.

    Returns:
      A decorator returning the checked kernel (the function callers should use).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: argument 'name' must be a non-empty string, got {name!r}")
    capabilities = Capabilities() if capabilities is None else Capabilities.coerce(capabilities)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not override:
            raise ValueError(
                f"attention kernel {name!r} is already registered; pass override=True to replace"
            )
        checked = _checked(name, fn, capabilities)
        _REGISTRY[name] = KernelSpec(name=name, fn=checked, capabilities=capabilities)
        return checked

    return decorator


def unregister(name: str) -> None:
    """Removes ``name`` from the registry (for tests and interactive use)."""
    spec(name)
    del _REGISTRY[name]


def spec(name: str) -> KernelSpec:
    """The :class:`KernelSpec` registered as ``name``; ``ValueError`` naming the choices if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
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
