"""The helper that runs the processes tests start must leave none of them behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from subprocs import run_in_session

PATIENT_S = 30.0  # "eventually": no loaded machine takes this long to reap a killed process


def _alive(pid: int) -> bool:
    """Running, not a zombie: a killed child whose parent died too is a zombie until someone reaps
    it, and a container's PID 1 may take its time (or never do it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_an_overrunning_command_fails_the_test_and_its_children_are_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; wait"  # the pid appears whole
    # The command must have started its child before it is killed for overrunning; a loaded machine
    # may not even have started bash by the first timeout, so a longer one is tried then.
    for timeout_s in (1.0, 5.0, 25.0):
        with pytest.raises(pytest.fail.Exception, match=f"sleeper did not finish in {timeout_s} s"):
            run_in_session(["bash", "-c", script], cwd=tmp_path, env=dict(os.environ), timeout_s=timeout_s,
                           what="sleeper")
        if pidfile.exists():
            break
    child = int(pidfile.read_text())
    deadline = time.monotonic() + PATIENT_S
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_finished_command_returns_its_code_and_output(tmp_path):
    res = run_in_session(["bash", "-c", "echo hello; exit 3"], cwd=tmp_path, env=dict(os.environ), timeout_s=PATIENT_S,
                         what="echo")
    assert res.returncode == 3 and res.stdout == "hello\n"
