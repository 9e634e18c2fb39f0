"""Running a command a test starts, so that nothing it starts outlives the test."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def run_in_session(cmd: Sequence[str], *, cwd: Path | str, env: dict[str, str], timeout_s: float,
                   what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, output captured; its whole process group is killed by id when
    it overruns ``timeout_s`` (the test then fails, naming ``what``) or when the test is interrupted."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout_s} s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, "")
