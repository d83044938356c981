"""Seq2SeqRNN: gradients, padding, teacher forcing, recorded alignments, stepwise decoding.

Compilation dominates, so every configuration compiles *one* program (:func:`_analyse`)
that computes everything the property tests below check; the results are cached per
configuration and each test asserts one property on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from attn_jax import decode, kernels
from attn_jax.models import Seq2SeqRNN
from tests.models.random_params import random_params

VOCAB = 13
PAD = 0
BOS = 1
# Right padding: sequence 0 has two pad positions, sequence 1 none.
SRC = np.array([[3, 4, 5, 6, PAD, PAD], [7, 8, 9, 10, 11, 12]], np.int32)
TGT = np.array([[BOS, 2, 3, 4], [BOS, 5, 6, 7]], np.int32)
CHANGED_AT = 2  # teacher forcing: tgt tokens from this step on are changed
TOL = {"float32": 2e-6, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Config:
    attention: str
    encoder_cell: str
    bidirectional: bool
    score: str = "general"
    dtype: str = "float32"

    @property
    def id(self) -> str:
        score = f"-{self.score}" if self.attention == "multiplicative" else ""
        bi = "bi" if self.bidirectional else "uni"
        return f"{self.attention}{score}-{self.encoder_cell}-{bi}-{self.dtype}"

    def model(self) -> Seq2SeqRNN:
        return Seq2SeqRNN(
            VOCAB,
            VOCAB,
            embed_dim=8,
            hidden_dim=16,
            encoder_cell=self.encoder_cell,
            bidirectional=self.bidirectional,
            attention=self.attention,
            score=self.score,
            attention_units=12,
            pad_id=PAD,
            dtype=jnp.dtype(self.dtype),
        )


# Not the full cross product: every attention kind, both cells, both directions.
CONFIGS = [
    Config("additive", "lstm", True),
    Config("multiplicative", "gru", False, score="dot"),
    Config("multiplicative", "lstm", True, score="general"),
    *[
        Config(name, "gru", True)  # the decoder masks padding and sows alignments
        for name in kernels.available(interface="dot_product", exact=True)
        if kernels.capabilities(name).mask and kernels.capabilities(name).weights
    ],
    Config("none", "lstm", False),
    Config("none", "gru", True, dtype="bfloat16"),
]
BF16_ATTENTION = pytest.param(
    Config("additive", "lstm", False, dtype="bfloat16"), id="additive-lstm-uni-bfloat16"
)
PARAMS = [pytest.param(c, id=c.id) for c in CONFIGS] + [BF16_ATTENTION]
ATTENDING = [pytest.param(c, id=c.id) for c in CONFIGS if c.attention != "none"]


@functools.cache
def _analyse(config: Config) -> dict[str, Any]:
    """Gradients and every forward variant the tests compare, in one compiled program."""
    model = config.model()
    params = random_params(model, SRC, TGT, seed=1)
    cotangent = jnp.asarray(np.random.RandomState(2).randn(*TGT.shape, VOCAB), jnp.float32)

    src_token_changed = SRC.copy()
    src_token_changed[0, 1] = 11  # a real (non-pad) position of sequence 0
    src_more_padding = np.pad(SRC, ((0, 0), (0, 3)), constant_values=PAD)
    tgt_future_changed = TGT.copy()
    tgt_future_changed[:, CHANGED_AT:] = (TGT[:, CHANGED_AT:] + 3) % (VOCAB - 2) + 2

    @jax.jit
    def run(params):
        def loss(params):
            logits = model.apply({"params": params}, SRC, TGT)
            return jnp.sum(logits * cotangent), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        # Variants share one batched forward where shapes agree.
        variants, recorded = model.apply(
            {"params": params},
            np.concatenate([SRC, src_token_changed, SRC]),
            np.concatenate([TGT, TGT, tgt_future_changed]),
            sow_weights=True,
            mutable=["intermediates"],
        )
        more_padding = model.apply({"params": params}, src_more_padding, TGT)
        # One token at a time through encode + decode_steps.
        state, encoded = model.apply({"params": params}, SRC, method=Seq2SeqRNN.encode)
        step_logits, step_weights = [], []
        for t in range(TGT.shape[1]):
            state, out, weights = model.apply(
                {"params": params},
                state,
                TGT[:, t : t + 1],
                encoded,
                method=Seq2SeqRNN.decode_steps,
            )
            step_logits.append(out)
            step_weights.append(weights)
        batch = SRC.shape[0]
        return {
            "logits": logits,
            "grads": grads,
            "batched": variants[:batch],
            "src_token_changed": variants[batch : 2 * batch],
            "tgt_future_changed": variants[2 * batch :],
            "weights": recorded["intermediates"]["attention_weights"][0][:batch],
            "more_padding": more_padding,
            "step_logits": jnp.concatenate(step_logits, 1),
            "step_weights": jnp.concatenate(step_weights, 1),
        }

    return jax.tree.map(np.asarray, run(params)) | {"params": params}


def _close(actual, expected, config: Config, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=0,
        atol=TOL[config.dtype],
        err_msg=f"{config.id}: {what}",
    )


@pytest.mark.parametrize("config", PARAMS)
def test_forward_and_gradients(config):
    out = _analyse(config)
    assert out["logits"].shape == (*TGT.shape, VOCAB)
    assert out["logits"].dtype == np.float32
    assert np.all(np.isfinite(out["logits"]))
    assert np.std(out["logits"]) > 1e-3, "logits are (nearly) constant"
    flat = traverse_util.flatten_dict(out["grads"], sep="/")
    params = traverse_util.flatten_dict(out["params"], sep="/")
    assert flat.keys() == params.keys()
    # The projected keys exist only for the additive score.
    assert ("attention_keys/kernel" in params) == (config.attention == "additive")
    if config.attention == "multiplicative":
        assert ("decoder/attention_weight" in flat) == (config.score == "general")
    for name, grad in flat.items():
        assert grad.dtype == params[name].dtype, name
        assert np.all(np.isfinite(grad)), f"{config.id}: non-finite gradient for {name}"
        assert np.any(grad != 0), f"{config.id}: zero gradient for {name}"


@pytest.mark.parametrize("config", PARAMS[:-1])
def test_padded_source_positions_are_ignored(config):
    out = _analyse(config)
    # The pad embedding is only looked up at padded positions: it must not matter.
    pad_row_grad = out["grads"]["src_embed"]["embedding"][PAD]
    np.testing.assert_array_equal(pad_row_grad, 0, err_msg=f"{config.id}: pad embedding")
    # Extra trailing padding (sequence 1 becomes padded too) changes nothing.
    _close(out["more_padding"], out["logits"], config, "logits with 3 more pad columns")
    # Sanity: a real source token does matter, for its own sequence only.
    diff = np.abs(out["src_token_changed"] - out["batched"]).max(axis=(1, 2))
    assert diff[0] > 1e-3, f"{config.id}: logits ignore a real source token"
    assert diff[1] <= TOL[config.dtype], f"{config.id}: another sequence's source leaked"


@pytest.mark.parametrize("config", PARAMS[:-1])
def test_teacher_forcing_is_causal(config):
    out = _analyse(config)
    _close(out["batched"], out["logits"], config, "batched forward")
    changed, base = out["tgt_future_changed"], out["batched"]
    _close(changed[:, :CHANGED_AT], base[:, :CHANGED_AT], config, "logits before the change")
    step_diff = np.abs(changed - base).max(axis=(0, 2))
    assert np.all(step_diff[CHANGED_AT:] > 1e-3), f"{config.id}: {step_diff}"


@pytest.mark.parametrize("config", ATTENDING)
def test_sown_alignments(config):
    out = _analyse(config)
    weights = out["weights"]
    assert weights.shape == (SRC.shape[0], 1, TGT.shape[1], SRC.shape[1])
    valid = (SRC != PAD)[:, None, None, :]
    np.testing.assert_array_equal(np.where(valid, 0, weights), 0)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(
        weights.sum(-1), 1.0, atol=1e-5 if config.dtype == "float32" else 1e-2
    )
    assert np.std(weights[valid.repeat(TGT.shape[1], 2)]) > 1e-4, "uniform alignments"
    _close(out["step_weights"], weights[:, 0], config, "stepwise vs teacher-forced weights")


@pytest.mark.parametrize("config", PARAMS[:-1])
def test_stepwise_decoding_matches_teacher_forcing(config):
    out = _analyse(config)
    _close(out["step_logits"], out["logits"], config, "decode_steps one token at a time")


def test_translate_beam_of_one_is_greedy():
    config = CONFIGS[0]
    model, params = config.model(), _analyse(config)["params"]
    run = functools.partial(decode.translate, model, params, SRC, max_len=6, bos_id=BOS)
    free = np.asarray(run(method="greedy"))
    eos = int(free[0, 2])  # so that sequence 0 stops after three tokens
    greedy = np.asarray(run(method="greedy", eos_id=eos, pad_id=PAD))
    beam = np.asarray(run(method="beam", beam_size=1, eos_id=eos, pad_id=PAD))
    np.testing.assert_array_equal(beam, greedy)
    first_eos = list(free[0]).index(eos)
    assert eos != PAD and first_eos < free.shape[1] - 1, "EOS should cut sequence 0 short"
    np.testing.assert_array_equal(greedy[0, : first_eos + 1], free[0, : first_eos + 1])
    assert np.all(greedy[0, first_eos + 1 :] == PAD)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("encoder_cell", {"encoder_cell": "rnn"}),
        ("score", {"score": "concat"}),
        ("attention", {"attention": "pooling"}),  # a kernel with another interface
        ("hidden_dim", {"hidden_dim": 15, "bidirectional": True}),
    ],
)
def test_invalid_config_names_the_field(field, overrides):
    model = dataclasses.replace(CONFIGS[0].model(), **overrides)
    with pytest.raises(ValueError, match=f"'{field}'"):
        jax.eval_shape(model.init, jax.random.key(0), SRC, TGT)


def test_unknown_attention_kernel():
    model = dataclasses.replace(CONFIGS[0].model(), attention="nope")
    with pytest.raises(ValueError, match=r"Seq2SeqRNN: 'attention'.*additive.*got 'nope'"):
        jax.eval_shape(model.init, jax.random.key(0), SRC, TGT)


def test_odd_hidden_dim_is_fine_without_bidirectional():
    model = dataclasses.replace(CONFIGS[0].model(), hidden_dim=15, bidirectional=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), SRC, TGT)
    assert shapes["params"]["bridge"]["kernel"].shape == (15, 15)
