"""The helper that runs the processes tests start must leave none of them behind."""

from __future__ import annotations

import os
import time

import pytest
from subprocs import run_in_session


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_overrunning_command_fails_the_test_and_its_children_are_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    with pytest.raises(pytest.fail.Exception, match="sleeper did not finish in 1.0 s"):
        run_in_session(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], cwd=tmp_path, env=dict(os.environ),
                       timeout_s=1.0, what="sleeper")
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_finished_command_returns_its_code_and_output(tmp_path):
    res = run_in_session(["bash", "-c", "echo hello; exit 3"], cwd=tmp_path, env=dict(os.environ), timeout_s=10,
                         what="echo")
    assert res.returncode == 3 and res.stdout == "hello\n"
