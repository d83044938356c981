"""RNN sequence-to-sequence model: LSTM/GRU encoder (or none), LSTM decoder attending at
every step; over tokens or any embedded source (e.g. image patches: "show, attend and tell")."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import kernels

__all__ = ["Seq2SeqRNN"]

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class _DecoderCell(nn.Module):
    """One decoder step (Luong et al., 2015, with input feeding).

    ``h_t = LSTM([embed(y_{t-1}); feed_{t-1}])``; ``c_t = Attention(h_t, encoder states)``;
    ``feed_t = tanh(W [c_t; h_t])``; ``logits_t = U feed_t``. Without attention,
    ``feed_t = tanh(W h_t)``.
    """

    vocab_size: int
    embed_dim: int
    hidden_dim: int
    attention: str
    score: str
    attention_units: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, carry, token, encoded):
        (lstm_carry, feed) = carry
        memory, keys, valid = encoded  # [B, S, H], [B, S, U] (additive) or memory, [B, S]
        dense = lambda features, name, bias=True: nn.Dense(
            features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embed",
        )(token)
        lstm_carry, h = nn.OptimizedLSTMCell(
            self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="lstm"
        )(lstm_carry, jnp.concatenate([x, feed.astype(x.dtype)], -1))
        if self.attention == "none":
            feed = jnp.tanh(dense(self.hidden_dim, "combine")(h))
            weights = jnp.zeros(valid.shape, jnp.float32)
        else:
            context, weights = self._attend(h, memory, keys, valid)
            feed = jnp.tanh(dense(self.hidden_dim, "combine")(jnp.concatenate([context, h], -1)))
        logits = dense(self.vocab_size, "output")(feed).astype(jnp.float32)
        return (lstm_carry, feed), (logits, weights)

    def _attend(self, h, memory, keys, valid):
        """``h [B, H]`` over ``memory [B, S, H]`` -> context ``[B, H]``, weights ``[B, S]``."""
        spec = kernels.spec(self.attention)
        interface = spec.capabilities.interface
        h = h.astype(memory.dtype)
        mask = valid[:, None, None, :]  # [B, heads=1, q=1, S]
        values = memory[:, :, None, :]  # [B, S, 1 head, H]
        if interface == "additive":
            query = nn.Dense(
                self.attention_units,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="attention_query",
            )(h)
            v = self.param(
                "attention_v",
                nn.initializers.normal(0.1),
                (1, self.attention_units),
                self.param_dtype,
            )
            out, weights = spec.fn(
                query[:, None, None, :],
                keys[:, :, None, :],
                values,
                v.astype(query.dtype),
                mask=mask,
                return_weights=True,
            )
        elif interface == "multiplicative":
            kwargs = {"score": self.score}
            if self.score == "general":
                weight = self.param(
                    "attention_weight",
                    nn.initializers.lecun_normal(),
                    (self.hidden_dim, self.hidden_dim),
                    self.param_dtype,
                )
                kwargs["weight"] = weight.astype(h.dtype)
            out, weights = spec.fn(
                h[:, None, None, :], values, values, mask=mask, return_weights=True, **kwargs
            )
        else:  # a dot_product kernel, by registry name
            out, weights = spec.fn(
                h[:, None, None, :], values, values, mask=mask, return_weights=True
            )
        return out[:, 0, 0], weights[:, 0, 0]


class Seq2SeqRNN(nn.Module):
    """Encoder RNN over the source; LSTM decoder with attention at every step.

    Attributes:
      src_vocab_size / tgt_vocab_size: vocabularies; ``pad_id`` marks (right) padding.
        ``src_vocab_size`` must be 0 with a ``source`` module.
      embed_dim / hidden_dim: embedding and hidden sizes (a bidirectional encoder uses
        ``hidden_dim // 2`` per direction).
      encoder_cell: ``"lstm"``, ``"gru"`` or ``"none"``: no recurrent encoder, the memory is
        a linear projection of each source embedding to ``hidden_dim`` and the decoder
        starts from their mean (Xu et al., 2015, "show, attend and tell", over image
        features); ``"none"`` needs ``bidirectional=False``.
      bidirectional: bidirectional encoder.
      attention: registry name: ``"additive"`` (Bahdanau), ``"multiplicative"`` (Luong,
        with ``score`` ``"dot"`` or ``"general"``), any ``dot_product`` kernel, or
        ``"none"`` (no attention: the decoder sees only the encoder's final state).
      attention_units: hidden units of the additive score (default ``hidden_dim``).
      source: a module embedding the source instead of tokens: ``source(src) ->
        (embeddings [batch, src_len, embed_dim], valid [batch, src_len] bool or None)``,
        e.g. :class:`~attn_jax.models.PatchEmbedder` over ``[batch, height, width]``
        pixels; ``valid=None``: every position is visible.

    Training uses teacher forcing (``__call__``); :mod:`attn_jax.decode` decodes greedily or
    with beam search through :meth:`encode` and :meth:`decode_steps`.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 128
    encoder_cell: str = "lstm"
    bidirectional: bool = True
    attention: str = "additive"
    score: str = "general"
    attention_units: int | None = None
    pad_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    source: nn.Module | None = None

    def setup(self):
        if self.encoder_cell not in (*CELLS, "none"):
            raise ValueError(
                f"Seq2SeqRNN: 'encoder_cell' must be one of {(*CELLS, 'none')}, "
                f"got {self.encoder_cell!r}"
            )
        if self.encoder_cell == "none" and self.bidirectional:
            raise ValueError(
                "Seq2SeqRNN: 'bidirectional' must be False with encoder_cell='none' (no "
                "recurrent encoder)"
            )
        if self.source is not None and self.src_vocab_size:
            raise ValueError(
                "Seq2SeqRNN: 'src_vocab_size' must be 0 with a 'source' module (which embeds "
                f"the source itself), got {self.src_vocab_size}"
            )
        if self.attention != "none":
            if self.attention not in kernels.available():
                raise ValueError(
                    f"Seq2SeqRNN: 'attention' must be 'none' or a registered kernel "
                    f"({', '.join(kernels.available())}), got {self.attention!r}"
                )
            interface = kernels.capabilities(self.attention).interface
            if interface not in ("additive", "multiplicative", "dot_product"):
                raise ValueError(
                    f"Seq2SeqRNN: 'attention' {self.attention!r} has interface {interface!r}"
                )
        if self.score not in ("dot", "general"):
            raise ValueError(f"Seq2SeqRNN: 'score' must be 'dot' or 'general', got {self.score!r}")
        if self.bidirectional and self.hidden_dim % 2:
            raise ValueError("Seq2SeqRNN: 'hidden_dim' must be even with a bidirectional encoder")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if self.source is None:
            self.src_embed = nn.Embed(self.src_vocab_size, self.embed_dim, **kw)
        cell = CELLS.get(self.encoder_cell)
        if cell is None:  # "none": the memory is a projection of the source embeddings
            self.encoder = nn.Dense(self.hidden_dim, **kw)
        elif self.bidirectional:
            half = self.hidden_dim // 2
            self.encoder = nn.Bidirectional(
                nn.RNN(cell(half, **kw)), nn.RNN(cell(half, **kw)), return_carry=True
            )
        else:
            self.encoder = nn.RNN(cell(self.hidden_dim, **kw), return_carry=True)
        self.bridge = nn.Dense(self.hidden_dim, **kw)
        units = self.attention_units or self.hidden_dim
        if self._additive:  # projected keys W_k h, computed once per source sequence
            self.attention_keys = nn.Dense(units, use_bias=False, **kw)
        self.decoder = nn.scan(
            _DecoderCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(1, nn.broadcast),
            out_axes=1,
        )(
            self.tgt_vocab_size,
            self.embed_dim,
            self.hidden_dim,
            self.attention,
            self.score,
            units,
            self.dtype,
            self.param_dtype,
        )

    @property
    def _additive(self) -> bool:
        return (
            self.attention != "none"
            and kernels.capabilities(self.attention).interface == "additive"
        )

    def _final_hidden(self, carry):
        """The hidden state from an encoder carry (LSTM: ``(c, h)``; GRU: ``h``)."""
        return carry[1] if self.encoder_cell == "lstm" else carry

    def _embed(self, src: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Source embeddings ``[B, S, embed_dim]`` and their ``valid [B, S]`` mask."""
        if self.source is None:
            chex.assert_rank(src, 2, custom_message="src: expected [batch, src_len]")
            return self.src_embed(src), src != self.pad_id
        x, valid = self.source(src)
        chex.assert_rank(x, 3, custom_message="source: expected [batch, src_len, embed_dim]")
        chex.assert_axis_dimension(
            x, 2, self.embed_dim, custom_message="source: expected [batch, src_len, embed_dim]"
        )
        if valid is None:
            valid = jnp.ones(x.shape[:2], bool)
        return x, valid

    def encode(self, src: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array, jax.Array]]:
        """``src [batch, src_len]`` tokens (or what ``source`` takes) -> (initial decoder
        state, encoder outputs).

        The encoder outputs are ``(memory [B, S, hidden], keys, valid [B, S])``; ``keys`` are
        the additive score's projected keys ``[B, S, units]`` (computed once per sequence),
        or ``memory`` itself for other scores.
        """
        x, valid = self._embed(src)
        if self.encoder_cell == "none":
            memory = self.encoder(x)
            weights = valid.astype(memory.dtype)[..., None]
            final = (memory * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        else:
            carry, memory = self.encoder(x, seq_lengths=valid.sum(-1))
            if self.bidirectional:
                final = jnp.concatenate([self._final_hidden(c) for c in carry], -1)
            else:
                final = self._final_hidden(carry)
        memory = memory.astype(self.dtype)  # flax's RNN carries float32 state
        h0 = jnp.tanh(self.bridge(final)).astype(self.dtype)
        state = ((jnp.zeros_like(h0), h0), jnp.zeros_like(h0))  # ((c, h), feed)
        keys = self.attention_keys(memory) if self._additive else memory
        return state, (memory, keys, valid)

    def decode_steps(self, state, tokens: jax.Array, encoded):
        """Runs the decoder over ``tokens [batch, steps]`` from ``state``.

        Returns:
          ``(state, logits [batch, steps, tgt_vocab], weights [batch, steps, src_len])``.
        """
        state, (logits, weights) = self.decoder(state, tokens, encoded)
        return state, logits, weights

    def __call__(self, src: jax.Array, tgt: jax.Array, *, sow_weights: bool = False) -> jax.Array:
        """Teacher-forced logits ``[batch, tgt_len, tgt_vocab]`` for ``tgt`` (shifted right).

        With ``sow_weights``, the alignments ``[batch, 1, tgt_len, src_len]`` are recorded in
        ``('intermediates', 'attention_weights')``.
        """
        chex.assert_rank(tgt, 2, custom_message="tgt: expected [batch, tgt_len]")
        state, encoded = self.encode(src)
        _, logits, weights = self.decode_steps(state, tgt, encoded)
        if sow_weights:
            self.sow("intermediates", "attention_weights", weights[:, None])
        return logits
