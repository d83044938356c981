"""``auto``: the kernel ``implementation=None`` picks, as a registry name.

Models and configs select kernels by name (``TransformerOptions(attention="auto")``, the
default; ``--config.model.attention=auto``); this entry runs, for each call, the kernel
:func:`attn_jax.kernels.api.dispatch` chooses for the call's backend, shape and arguments
(on CPU ``flash`` from 1,024 queries and keys on, else ``dot_product``). Dispatch falls
back to ``dot_product``, which supports every feature, so ``auto`` does too.
"""

from __future__ import annotations

from attn_jax.kernels import api, registry
from attn_jax.kernels.api import AttentionCall, AttentionOutput
from attn_jax.kernels.registry import EVERY_FEATURE, register


@register("auto", capabilities=EVERY_FEATURE)
def auto_attention(call: AttentionCall) -> AttentionOutput:
    """Exact attention by the fastest registered kernel that honours the call on this
    backend and shape (:data:`attn_jax.kernels.api.DISPATCH`)."""
    chosen = registry.spec(api.dispatch(call))
    result = chosen.core(call)
    return result if isinstance(result, AttentionOutput) else AttentionOutput(result)
