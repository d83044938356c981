"""Runs a Python program recording what this process writes inside a directory.

    python tests/train/write_audit.py AUDIT.json WATCHED_DIR PROGRAM.py ARGS...

Python's audit hooks see every ``open`` for writing, ``mkdir``, ``rename``/``replace``,
``remove`` and ``rmtree`` made through Python; at exit the paths under ``WATCHED_DIR`` go to
``AUDIT.json``. (Native writers such as tensorstore are not seen: orbax lets only process 0
call them.)
"""

import atexit
import json
import os
import runpy
import sys

audit_path, watched, program, *arguments = sys.argv[1:]
watched = os.path.realpath(watched)
written: list[str] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _note(path) -> None:
    if isinstance(path, int):  # a file descriptor
        return
    path = os.path.realpath(os.fsdecode(path))
    if path.startswith(watched + os.sep):  # inside it (creating it is not writing in it)
        written.append(path)


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            _note(path)
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        _note(args[0])
    elif event == "os.rename":
        _note(args[0])
        _note(args[1])


def _save() -> None:
    with open(audit_path, "w") as f:
        json.dump(sorted(set(written)), f)


atexit.register(_save)
sys.addaudithook(_hook)
sys.argv = [program, *arguments]
sys.path[0] = os.path.dirname(os.path.abspath(program))  # as if PROGRAM had been run itself
runpy.run_path(program, run_name="__main__")
