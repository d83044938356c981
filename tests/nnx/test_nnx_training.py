"""launch.py's loop with config.model.api="nnx": the NNX models train, checkpoint, resume
bit-identically and sweep as the linen ones do, and match them."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attn_jax import nnx as attn_nnx
from attn_jax.train import tasks
from attn_jax.train.checkpoints import Checkpoints
from attn_jax.train.loop import train_and_evaluate
from attn_jax.train.sweep import apply_overrides, product, run_sweep
from configs import listops, mqar


def _quick(**overrides):
    config = mqar.get_config("quick")
    config.data.vocab_size = 256
    config.train.num_devices = 1
    return apply_overrides(config, {"model.api": "nnx", **overrides})


def _params(workdir: pathlib.Path, step: int):
    ckpt = Checkpoints(workdir / "checkpoints", keep=3)
    restored = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), loader=ocp.args.JsonRestore()),
    )
    ckpt.close()
    return restored["state"]["params"]


def _losses(workdir: pathlib.Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["split"] == "train"]


@pytest.fixture(scope="module")
def api_sweep(tmp_path_factory):
    """A sweep over ``model.api``: the quick MQAR run with linen (trial_000) and NNX
    (trial_001)."""
    workdir = tmp_path_factory.mktemp("api_sweep")
    trials = product(**{"model.api": ["linen", "nnx"]})
    return workdir, run_sweep(_quick(), trials, workdir, train_and_evaluate)


def test_a_sweep_over_the_api_trains_linen_and_nnx_to_the_same_losses(api_sweep):
    workdir, rows = api_sweep
    assert [row["model.api"] for row in rows] == ["linen", "nnx"]
    linen_dir, nnx_dir = workdir / "trial_000", workdir / "trial_001"
    np.testing.assert_allclose(_losses(linen_dir), _losses(nnx_dir), rtol=1e-5)
    # The checkpoints have one layout: either API's restores into the other.
    linen_params, nnx_params = _params(linen_dir, 8), _params(nnx_dir, 8)
    assert jax.tree.structure(linen_params) == jax.tree.structure(nnx_params)
    for a, b in zip(jax.tree.leaves(linen_params), jax.tree.leaves(nnx_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_an_nnx_run_resumes_from_a_checkpoint_to_bit_identical_parameters(api_sweep, tmp_path):
    workdir = api_sweep[0] / "trial_001"
    assert isinstance(tasks.build_task(_quick()).model, attn_nnx.Functional)
    # Killed after the step-4 checkpoint: only it survives.
    shutil.copytree(workdir, tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "8")
    resumed = train_and_evaluate(_quick(), tmp_path / "killed")
    assert resumed["resumed_from"] == 4 and resumed["step"] == 8
    for a, b in zip(
        jax.tree.leaves(_params(workdir, 8)),
        jax.tree.leaves(_params(tmp_path / "killed", 8)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_config_model_api_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config\.model\.api: expected one of"):
        tasks.build_task(_quick(**{"model.api": "haiku"}))
    with pytest.raises(ValueError, match=r"config\.model\.scan_layers"):
        tasks.build_task(_quick(**{"model.scan_layers": True}))
    rnn = apply_overrides(listops.get_config("quick"), {"model.api": "nnx"})
    assert isinstance(tasks.build_task(rnn).model, attn_nnx.Functional)
