"""A stack of pre-LayerNorm encoder layers over embeddings (used by every encoder)."""

from __future__ import annotations

import flax.linen as nn
import jax

from attn_jax.models.blocks import EncoderLayer, TransformerOptions
from attn_jax.models.layer_stack import run_layers

__all__ = ["EncoderStack"]


class EncoderStack(nn.Module):
    """``options.num_layers`` bidirectional :class:`EncoderLayer` s and a final LayerNorm
    (unrolled or scanned, rematerialised or not: ``options.scan_layers``, ``options.remat``,
    see :mod:`attn_jax.models.layer_stack`)."""

    options: TransformerOptions

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        kv_lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        sow_weights: bool = False,
    ) -> jax.Array:
        """``x [batch, length, width]`` -> ``[batch, length, width]``.

        ``mask`` broadcasts to ``[batch, heads, length, length]`` (e.g. key padding
        ``[batch, 1, 1, length]``); ``kv_lengths [batch]`` are the valid lengths of
        right-padded inputs, for kernels that take lengths instead of masks.
        """
        o = self.options
        x = nn.Dropout(o.dropout_rate)(x, deterministic=deterministic)
        x = run_layers(
            EncoderLayer,
            o,
            x,
            mask=mask,
            kv_lengths=kv_lengths,
            positions=positions,
            deterministic=deterministic,
            sow_weights=sow_weights,
        )
        return nn.LayerNorm(dtype=o.dtype, param_dtype=o.param_dtype, name="final_norm")(x)
