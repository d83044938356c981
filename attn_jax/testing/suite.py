"""``check_kernel``: the conformance suite on any attention callable (by registry name, or
any function with ``jax.nn.dot_product_attention``'s signature), and ``conformance_cases``
for pytest parametrisation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.testing import checks
from attn_jax.testing.cases import CASES, Case

KINDS = ("values", "strict", "padding", "vmap")
STRICT_MODES: dict[str, Callable[[], Any]] = {
    "x64": lambda: jax.enable_x64(True),
    "rank_promotion_raise": lambda: jax.numpy_rank_promotion("raise"),
}
# The strict modes run on broadcast masks and biases, cross segments and decoding positions
# (int64 lengths and positions meet int32 indices; every broadcast must be explicit).
STRICT_CASES = (
    "random_mask_broadcast_heads",
    "bias_broadcast_and_causal",
    "segments_cross",
    "decode_positions_window",
)
# Under jax.vmap (over the batch, over the heads): cases whose arguments do not depend on
# the batch, with GQA; the kernel's options (block sizes) decide how many blocks run.
VMAP_CASES = ("gqa", "no_mask")
# NaN / inf are planted where no query looks: padded keys, hidden columns, empty rows.
PADDING_CASES = (
    "padding_empty_keys",
    "masked_columns",
    "segments_window_lengths",
    "decode_positions_window",
)


@dataclasses.dataclass(frozen=True)
class ConformanceCase:
    """One check of the suite: ``kind`` (``"values"``: values and gradients against the
    float64 reference; ``"strict"``: the same under a strict JAX ``mode``; ``"padding"``:
    NaN / inf where no query looks never reach outputs or gradients; ``"vmap"``: under
    ``jax.vmap`` over the batch and over the heads, equal to the kernel's own) on ``case``
    in ``dtype``."""

    kind: str
    case: Case
    dtype: str = "float32"
    mode: str | None = None

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.kind, self.case.name, self.dtype, self.mode) if x)

    @property
    def decoding(self) -> bool:
        """A decoding step: queries at explicit positions of a cache, or a single query."""
        return self.case.positions or self.case.q_len == 1


def conformance_cases(
    dtypes: Sequence[Any] = ("float32", "bfloat16"),
    *,
    decode: bool = True,
    kinds: Iterable[str] = KINDS,
) -> list[ConformanceCase]:
    """Every check of the suite: each case in each dtype, the strict JAX modes (float32),
    NaN / inf in padding (float32) and vmap (float32); ``decode=False`` leaves out
    decoding steps."""
    kinds = set(kinds)
    if unknown := kinds - set(KINDS):
        raise ValueError(f"kinds: expected some of {KINDS}, got {sorted(unknown)}")
    names = [jnp.dtype(d).name for d in dtypes]
    if unknown := [n for n in names if n not in (jnp.dtype(t).name for t in checks.TOLERANCES)]:
        raise ValueError(f"dtypes: expected float32, bfloat16 or float16, got {unknown}")
    out: list[ConformanceCase] = []
    if "values" in kinds:
        out += [ConformanceCase("values", c, n) for n in names for c in CASES]
    if "strict" in kinds:
        out += [
            ConformanceCase("strict", c, "float32", mode)
            for c in CASES
            if c.name in STRICT_CASES
            for mode in STRICT_MODES
        ]
    if "padding" in kinds:
        out += [ConformanceCase("padding", c) for c in CASES if c.name in PADDING_CASES]
    if "vmap" in kinds:
        out += [ConformanceCase("vmap", c) for c in CASES if c.name in VMAP_CASES]
    return [c for c in out if decode or not c.decoding]


def _resolve(fn_or_name: str | Callable[..., Any], options: dict[str, Any]):
    """``(kernel, supported)``: the callable (``options`` bound) and the capabilities it
    claims (``None``: read from its signature)."""
    if isinstance(fn_or_name, str):
        from attn_jax import kernels

        kernel, supported = kernels.get(fn_or_name), kernels.capabilities(fn_or_name).supported()
        return functools.partial(kernel, **options) if options else kernel, set(supported)
    if not callable(fn_or_name):
        raise TypeError(f"fn_or_name: expected a registry name or a callable, got {fn_or_name!r}")
    return functools.partial(fn_or_name, **options) if options else fn_or_name, None


def _missing_parameters(kernel: Callable[..., Any], case: Case) -> list[str]:
    """Keyword arguments the case passes that ``kernel``'s signature does not take."""
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    _, kwargs = checks.make_inputs(case, jnp.float32)
    return sorted(k for k in kwargs if k not in params)


def check_kernel(
    fn_or_name: str | Callable[..., Any],
    *,
    dtypes: Sequence[Any] = ("float32", "bfloat16"),
    cases: Iterable[ConformanceCase] | None = None,
    decode: bool = True,
    **kernel_options: Any,
) -> dict[str, list[str]]:
    """Runs the conformance suite on ``fn_or_name`` and raises ``AssertionError`` naming the
    first failing check (``kind-case-dtype[-mode]``) with its error.

    ``fn_or_name``: a registered kernel's name (what its capabilities leave out must be
    refused with a ``ValueError``), or any callable with the signature of
    ``jax.nn.dot_product_attention``: ``fn(query, key, value, bias=None, mask=None, *,
    is_causal=..., ...)`` on ``[batch..., len, heads, head_dim]`` arrays (checks that pass
    a keyword its signature lacks are skipped). ``cases``: a subset of
    :func:`conformance_cases` (default: all of them in ``dtypes``, without decoding steps
    when ``decode=False``). ``kernel_options`` are passed to every call (``rng=`` for
    ``performer``, block sizes).

    Returns ``{"passed": [ids], "skipped": ["id: reason", ...]}``.
    """
    kernel, supported = _resolve(fn_or_name, kernel_options)
    cases = conformance_cases(dtypes, decode=decode) if cases is None else list(cases)
    record = isinstance(fn_or_name, str)  # the registry's kernels feed the error summary
    report: dict[str, list[str]] = {"passed": [], "skipped": []}
    for check in cases:
        try:
            skipped = _check_one(kernel, supported, check, record)
        except AssertionError as err:
            raise AssertionError(f"{check.id}: {err}") from err
        except Exception as err:  # a crash is a failed check too, named like one
            raise AssertionError(f"{check.id}: {type(err).__name__}: {err}") from err
        if skipped:
            report["skipped"].append(f"{check.id}: {skipped}")
        else:
            report["passed"].append(check.id)
    return report


def _check_one(
    kernel: Callable[..., Any], supported: set[str] | None, check: ConformanceCase, record: bool
) -> str | None:
    """Runs one check; returns why it was skipped, or ``None``."""
    case = check.case
    if supported is not None and case.needs() - supported:
        if check.kind == "padding":
            return f"needs {sorted(case.needs() - supported)}"
        checks.check_unsupported_raises(kernel, case)
        return None
    if missing := _missing_parameters(kernel, case):
        return f"the signature lacks {missing}"
    if check.kind == "padding":
        checks.check_padding_never_leaks(kernel, case)
        return None
    if check.kind == "vmap":
        checks.check_vmap(kernel, case)
        return None
    dtype = jnp.dtype(check.dtype).type
    with STRICT_MODES[check.mode]() if check.mode else contextlib.nullcontext():
        checks.check_against_reference(kernel, case, dtype, record=record and not check.mode)
    return None
