"""``pip install -e .`` installs configs/, experiments/ and the attn-jax-launch script;
config arguments parse as big_vision's parse_arg."""

import pathlib
import subprocess
import sys

import pytest

from configs import common, mqar

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(sys.executable).parent / "attn-jax-launch"


def test_named_arguments_parse_by_the_defaults_types():
    args = common.parse_arg(
        "quick,seq_len=128,rate=0.5,name=flash,shuffle=false",
        "my.py",
        quick=False,
        seq_len=64,
        rate=0.1,
        name="auto",
        shuffle=True,
        width=(None, int),
    )
    assert args.to_dict() == {
        "quick": True, "seq_len": 128, "rate": 0.5, "name": "flash", "shuffle": False,
        "width": None,
    }  # fmt: skip
    assert common.parse_arg(None, "my.py", quick=False, seq_len=64).to_dict() == {
        "quick": False,
        "seq_len": 64,
    }
    config = mqar.get_config("quick,seq_len=128,num_kv_pairs=8,attention=flash")
    assert (config.data.seq_len, config.data.num_kv_pairs) == (128, 8)
    assert (config.model.attention, config.train.steps) == ("flash", 8)
    assert mqar.get_sweep("quick,seq_len=128") == mqar.get_sweep("quick")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("quick,foo=1", "my.py: unknown config argument 'foo' in 'quick,foo=1'; expected one of"),
        ("fast", "unknown config argument 'fast'"),
        ("seq_len=abc", "my.py: config argument 'seq_len' expects an integer, got 'abc'"),
        ("quick=maybe", "config argument 'quick' expects True or False, got 'maybe'"),
        ("seq_len=1,seq_len=2", "config argument 'seq_len' given twice"),
        ("quick,full", "'quick' and 'full' exclude each other"),
    ],
)
def test_bad_arguments_raise_one_line_naming_file_and_argument(arg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        common.variant(arg, "my.py", seq_len=64)
    assert "\n" not in str(error.value)


def test_configs_experiments_and_launch_import_from_anywhere_without_path_edits(tmp_path):
    code = (
        "import configs.mqar, experiments.reporting, experiments.bench_kernels, launch; "
        "print(configs.mqar.__file__, experiments.reporting.__file__, launch.ROOT)"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    paths = result.stdout.split()
    assert paths == [str(ROOT / "configs/mqar.py"), str(ROOT / "experiments/reporting.py"),
                     str(ROOT)]  # fmt: skip
    for script in (ROOT / "experiments").glob("*.py"):
        assert "sys.path" not in script.read_text(), script


def test_console_script_runs_from_any_directory_with_named_arguments(tmp_path):
    result = subprocess.run(
        [str(SCRIPT), "--config=configs/kernel_demo.py:quick,seq_len=16",
         "--config.kernels=dot_product,flash"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dot_product" in result.stdout and "flash" in result.stdout
    bad = subprocess.run(
        [str(SCRIPT), "--config=configs/mqar.py:quick,seq_len=abc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "config argument 'seq_len' expects an integer" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_default_workdir_spells_out_the_arguments(tmp_path, monkeypatch):
    import launch

    monkeypatch.chdir(tmp_path)  # configs/ is found among the installed configs
    argv = launch.resolve_config(["launch.py", "--config", "configs/mqar.py:quick,seq_len=128"])
    assert argv == ["launch.py", f"--config={ROOT}/configs/mqar.py:quick,seq_len=128"]
    launch.flags.FLAGS(argv)
    try:
        assert launch.default_workdir() == pathlib.Path("runs/mqar_quick_seq_len-128")
        assert launch._CONFIG.value.data.seq_len == 128
    finally:
        launch.flags.FLAGS.unparse_flags()
    assert launch.resolve_config(["launch.py"]) == ["launch.py", f"--config={ROOT}/configs/mqar.py"]
