"""Flax (linen) models composed from the attention kernels; each selects its kernel by name."""

from attn_jax.models.attention import MultiHeadAttention
from attn_jax.models.blocks import TransformerOptions
from attn_jax.models.encoder import TransformerEncoder
from attn_jax.models.encoder_decoder import EncoderDecoder
from attn_jax.models.encoder_stack import EncoderStack
from attn_jax.models.layer_stack import stack_layer_params, unstack_layer_params
from attn_jax.models.lm import TransformerLM
from attn_jax.models.patches import PatchEmbedder
from attn_jax.models.positions import LearnedPositions, apply_rope, sinusoidal_positions
from attn_jax.models.seq2seq_rnn import Seq2SeqRNN
from attn_jax.models.vit import VisionTransformer

__all__ = [
    "EncoderDecoder",
    "EncoderStack",
    "LearnedPositions",
    "MultiHeadAttention",
    "PatchEmbedder",
    "Seq2SeqRNN",
    "TransformerEncoder",
    "TransformerLM",
    "TransformerOptions",
    "VisionTransformer",
    "apply_rope",
    "sinusoidal_positions",
    "stack_layer_params",
    "unstack_layer_params",
]
