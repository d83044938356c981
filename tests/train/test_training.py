"""The training loop: devices, resume, checkpoints, NaN guard, host reads, launcher errors."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attn_jax.train import loop
from attn_jax.train.checkpoints import Checkpoints
from attn_jax.train.loop import TrainingDivergedError, train_and_evaluate
from attn_jax.train.metrics import MetricsWriter
from attn_jax.train.parallelism import DataParallel
from attn_jax.train.state import Divergence
from attn_jax.train.sweep import apply_overrides
from attn_jax.train.validate import ConfigError, validate_train_config
from configs import mqar
from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _quick(**overrides):
    config = mqar.get_config("quick")
    config.data.vocab_size = 256  # small embeddings: fast to compile and to checkpoint
    return apply_overrides(config, overrides)


def _losses(workdir, split="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["split"] == split]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed quick run (steps 8, checkpoints at 4 and 8) and its result."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, train_and_evaluate(_quick(), workdir)


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    """A private copy of the finished run's workdir."""
    shutil.copytree(finished_run[0], tmp_path / "run")
    return tmp_path / "run"


def test_quick_run_writes_every_output(finished_run):
    tmp_path, result = finished_run
    assert result["step"] == 8 and result["resumed_from"] is None
    assert set(result["eval"]) >= {"loss", "accuracy"}
    for name in ("config.json", "versions.json", "metrics.jsonl", "learning_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert list((tmp_path / "tensorboard").iterdir())
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert {"jax", "flax", "optax", "git_commit"} <= set(versions)
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [4, 8]


def test_rerun_resumes_at_the_end(finished_copy):
    again = train_and_evaluate(_quick(), finished_copy)
    assert again["resumed_from"] == 8 and again["step"] == 8


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
    assert jax.local_device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    train_and_evaluate(_quick(**{"train.num_devices": 1}), tmp_path / "one")
    train_and_evaluate(_quick(**{"train.num_devices": 8}), tmp_path / "eight")
    np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(tmp_path / "eight"), rtol=2e-5)
    np.testing.assert_allclose(
        _losses(tmp_path / "one", "eval"), _losses(tmp_path / "eight", "eval"), rtol=2e-5
    )


def _final_params(workdir):
    """(step, params) of the newest checkpoint in ``workdir``, restored as raw arrays."""
    ckpt = Checkpoints(pathlib.Path(workdir) / "checkpoints", keep=3)
    step = ckpt.steps()[-1]
    restored = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), loader=ocp.args.JsonRestore()),
    )
    ckpt.close()
    assert restored["loader"] == {"next_index": step}  # the data loader's state, saved too
    return step, restored["state"]["params"]


def _launch(workdir, *flags, env=None, audit=None):
    """launch.py on the quick MQAR config; with ``audit``, what the process writes under
    ``workdir`` through Python is recorded in that JSON file (tests/train/write_audit.py)."""
    wrapper = [str(ROOT / "tests" / "train" / "write_audit.py"), str(audit), str(workdir)]
    return subprocess.Popen(
        [
            sys.executable,
            *(wrapper if audit else []),
            str(ROOT / "launch.py"),
            f"--config={ROOT}/configs/mqar.py:quick",
            "--config.data.vocab_size=256",
            f"--workdir={workdir}",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": xla_flags(), **(env or {})},
    )


def test_killed_run_resumes_to_bit_identical_parameters(tmp_path):
    flags = ("--config.train.steps=12", "--config.train.checkpoint_every=1")
    full = _launch(tmp_path / "full", *flags)
    assert full.wait(timeout=300) == 0, full.stderr.read()
    interrupted = _launch(tmp_path / "killed", *flags)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    rng = np.random.default_rng()
    target = int(rng.integers(1, 10))  # kill after a random number of checkpoints
    while time.time() < deadline and interrupted.poll() is None:
        done = (
            [p for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
        )
        if len(done) >= target:
            interrupted.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    interrupted.wait(timeout=60)
    resumed = _launch(tmp_path / "killed", *flags)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    step_a, params_a = _final_params(tmp_path / "full")
    step_b, params_b = _final_params(tmp_path / "killed")
    assert step_a == step_b == 12
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


def _digest(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_corrupted_latest_checkpoint_is_skipped_with_a_message(finished_copy, capsys):
    tmp_path = finished_copy
    latest = tmp_path / "checkpoints" / "8"
    for path in latest.rglob("*"):
        if path.is_file():
            path.write_bytes(b"corrupted")
    result = train_and_evaluate(_quick(), tmp_path)
    out = capsys.readouterr().out
    assert "checkpoint at step 8 is unreadable" in out and "falling back" in out
    assert result["resumed_from"] == 4 and result["step"] == 8
    (kept,) = (tmp_path / "unreadable_checkpoints").iterdir()  # moved aside, not deleted
    assert kept.name.startswith("8_") and any(kept.rglob("*"))


def test_nan_loss_stops_and_leaves_the_last_checkpoint_intact(finished_copy):
    tmp_path = finished_copy
    before = _digest(tmp_path / "checkpoints")
    diverging = _quick(**{"train.steps": 16, "optim.learning_rate": 1e30})
    with pytest.raises(TrainingDivergedError, match=r"loss is (nan|inf) at step (9|1[0-6]); .*"):
        train_and_evaluate(diverging, tmp_path)
    assert _digest(tmp_path / "checkpoints") == before


def _skip_final_outputs(monkeypatch) -> None:
    """No final evaluation, attention or learning-curve plots: seconds saved per run."""
    monkeypatch.setattr(loop, "_final_evaluation", lambda *args: {})
    monkeypatch.setattr(loop, "plot_learning_curve", lambda *args: None)


def _poison_steps(monkeypatch, poisoned: set[int]) -> None:
    """Tasks built by the loop whose loss is NaN at the ``poisoned`` steps (counting from
    1) only: their batches hold a token id beyond the vocabulary, embedded as NaN
    (``jnp.take`` fills out-of-range rows with NaN). The compiled step is the plain one."""
    build_task = loop.build_task

    def build(config):
        task = build_task(config)
        batch_fn = task.train.batch

        def batch(step, batch_size):
            batch = batch_fn(step, batch_size)
            if step + 1 in poisoned:
                batch["inputs"] = np.full_like(batch["inputs"], 10**6)
            return batch

        task.train.batch = batch
        return task

    monkeypatch.setattr(loop, "build_task", build)


def test_divergence_between_reads_names_its_step_and_freezes_the_state(tmp_path, monkeypatch):
    """The losses of steps 5 and 6 are NaN; the host reads at log steps (4, 8) and before
    checkpoints (3, 6): the error comes before checkpoint 6, names step 5 (the first) and
    the last good checkpoint 3; the state after step 4 is kept on the devices from then on."""
    _skip_final_outputs(monkeypatch)
    _poison_steps(monkeypatch, {5, 6})
    states = []  # (step counter, parameters) after each train step, for this test only
    original = DataParallel.train

    def train(self, state, divergence, batch):
        state, divergence, metrics = original(self, state, divergence, batch)
        states.append(jax.tree.map(np.copy, self.host((state.step, state.params))))
        return state, divergence, metrics

    monkeypatch.setattr(DataParallel, "train", train)
    config = _quick(**{"train.log_every": 4, "train.checkpoint_every": 3, "train.eval_every": 8})
    with pytest.raises(TrainingDivergedError) as error:
        train_and_evaluate(config, tmp_path)
    message = str(error.value)
    assert message.startswith("loss is nan at step 5; stopping.")
    assert "last good checkpoint (step 3) is intact" in message
    assert "lower config.optim.learning_rate or check the data" in message
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [3]  # none after step 5
    assert [int(step) for step, _ in states] == [1, 2, 3, 4, 4, 4]  # steps 5 and 6 frozen
    kept = jax.tree.leaves(states[3][1])
    for _, params in states[4:]:
        for a, b in zip(kept, jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
    _, saved = _final_params(tmp_path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_the_divergence_record_keeps_the_first_non_finite_step():
    record = Divergence.none()
    for step, loss, grad_norm in [(1, 2.0, 1.0), (2, 1.5, np.inf), (3, np.nan, np.nan)]:
        record = record.record(jnp.int32(step), jnp.float32(loss), jnp.float32(grad_norm))
    assert (int(record.step), float(record.loss), float(record.grad_norm)) == (2, 1.5, np.inf)
    fine = Divergence.none().record(jnp.int32(7), jnp.float32(0.5), jnp.float32(1.0))
    assert int(fine.step) == 0


def test_the_host_reads_the_devices_only_at_log_eval_and_checkpoint_steps(tmp_path, monkeypatch):
    """Every device -> host read goes through the strategy's ``host``: counted between
    train steps, there is none after steps other than log (3, 6), checkpoint (5) and eval
    steps (8, the last)."""
    _skip_final_outputs(monkeypatch)
    trained, read_after = [0], set()
    train, host = DataParallel.train, DataParallel.host

    def counting_train(self, *args):
        trained[0] += 1
        return train(self, *args)

    def counting_host(self, tree):
        read_after.add(trained[0])
        return host(self, tree)

    monkeypatch.setattr(DataParallel, "train", counting_train)
    monkeypatch.setattr(DataParallel, "host", counting_host)
    config = _quick(**{"train.log_every": 3, "train.checkpoint_every": 5, "train.eval_every": 8})
    result = train_and_evaluate(config, tmp_path)
    assert result["step"] == trained[0] == 8
    assert read_after == {3, 5, 6, 8}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["step"], r["split"]) for r in records] == [
        (3, "train"),
        (6, "train"),
        (8, "train"),
        (8, "eval"),
    ]


def test_sigterm_saves_stops_and_leaves_no_prefetch_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "stop_requested", lambda: True)  # as if SIGTERM had come
    result = train_and_evaluate(_quick(), tmp_path)
    assert result["interrupted"] and result["step"] == 1
    assert Checkpoints(tmp_path / "checkpoints", keep=3).steps() == [1]
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_progress_rates_count_the_steps_since_the_last_line(tmp_path, monkeypatch, capsys):
    clock = iter([100.0, 104.0])
    monkeypatch.setattr("attn_jax.train.metrics.time.perf_counter", lambda: next(clock))
    writer = MetricsWriter(tmp_path, total_steps=30)
    writer.progress(10, {"loss": 1.0}, tokens_per_step=1000)
    line = writer.progress(20, {"loss": 0.5}, tokens_per_step=1000)  # 10 steps in 4 s
    writer.close()
    assert "2.50 steps/s | 2,500 tokens/s | ETA 0m04s" in line


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.learning_rate", -1.0, "config.optim.learning_rate"),
        ("model.attention", "nope", "config.model.attention: unknown kernel 'nope'"),
        ("train.batch_size", 12, "config.train.batch_size: 12 is not divisible by the 8"),
        ("data.num_kv_pairs", 40, "config.data.seq_len"),
        ("model.num_heads", 3, "config.model.width"),
        ("data.name", "imagenet", "config.data.name"),
    ],
)
def test_invalid_config_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(_quick(**{key: value}), num_devices=8)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.optim.learning_rate=-1", "config.optim.learning_rate"),
        ("--config.model.attention=nope", "config.model.attention"),
        ("--config.train.batch_size=12", "config.train.batch_size"),
        ("--config.model.nosuchkey=1", "--config.model.nosuchkey: no such key"),
        ("--no_such_flag", "no_such_flag"),
        ("--sweep_parallel=2", "--sweep_parallel: only applies with --sweep"),
        ("--sweep --sweep_parallel=3", "--sweep_parallel: sweep parallel: 3 groups cannot"),
        ("--process_id=1", "need --distributed"),
    ],
)
def test_launcher_rejects_bad_input_before_writing_anything(tmp_path, flag, message):
    workdir = tmp_path / "run"
    env = {"XLA_FLAGS": xla_flags(devices=8)}
    process = _launch(workdir, *flag.split(), env=env)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not workdir.exists()


def test_two_processes_train_like_one_process_with_all_their_devices(tmp_path):
    """Multi-host on CPU: two processes of 2 devices each (jax.distributed, gloo; one set up
    by flags, one by JAX_* environment variables) give the losses of one process with 4
    devices; only process 0 writes checkpoints and metrics."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {"XLA_FLAGS": xla_flags(devices=2)}
    from_flags = _launch(  # process 0 from flags, process 1 from the environment
        tmp_path / "two",
        "--distributed",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        "--process_id=0",
        env=env,
        audit=tmp_path / "writes_0.json",
    )
    from_environment = _launch(
        tmp_path / "two",
        "--distributed",
        env={
            **env,
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1",
        },
        audit=tmp_path / "writes_1.json",
    )
    workers = [from_flags, from_environment]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
    assert "step 8/8" in outputs[0][0] and "step 8/8" not in outputs[1][0]
    writes = [json.loads((tmp_path / f"writes_{i}.json").read_text()) for i in (0, 1)]
    assert writes[1] == []  # process 1 wrote nothing in the workdir
    names = {pathlib.Path(p).name for p in writes[0]}
    assert {"metrics.jsonl", "config.json", "learning_curve.png"} <= names
    assert any("/checkpoints/" in p for p in writes[0])
    train_and_evaluate(_quick(**{"train.num_devices": 4}), tmp_path / "one")
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=2e-5)
    np.testing.assert_allclose(
        _losses(tmp_path / "two", "eval"), _losses(tmp_path / "one", "eval"), rtol=2e-5
    )
    assert _final_params(tmp_path / "two")[0] == 8


def test_sigterm_stops_a_parallel_sweep_with_a_checkpoint_per_running_trial(tmp_path):
    flags = (
        "--config.train.steps=100000",
        "--config.train.checkpoint_every=100000",
        "--config.train.eval_every=100000",
        "--sweep",
        "--sweep_parallel=2",
    )
    sweep = _launch(tmp_path, *flags, env={"XLA_FLAGS": xla_flags(devices=2)})
    seen = set()
    for line in sweep.stdout:
        seen |= {name for name in ("[trial_000] step", "[trial_001] step") if name in line}
        if len(seen) == 2:
            break
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, err
    assert "sweep interrupted" in err and "rerun the same command" in err
    for trial in ("trial_000", "trial_001"):
        assert f"[{trial}] SIGTERM: saving a checkpoint" in out
        (saved,) = Checkpoints(tmp_path / trial / "checkpoints", keep=3).steps()
        assert 0 < saved < 100000
        assert not (tmp_path / trial / "result.json").exists()
