"""README stays true: CI runs its test command verbatim, and its Python snippets run."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert len(commands) == 2, "the Quickstart has exactly two commands"
    assert commands[1] == test_command
    assert "launch.py" in commands[0]


def test_python_snippets_run(tmp_path):
    snippets = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(snippets) >= 3
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(snippets))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
