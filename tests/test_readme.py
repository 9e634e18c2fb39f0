"""Every command block of the README runs as written (shortened by overrides), so none can drift.

Each ```bash block runs in a fresh copy of the checkout with bash -e. Rewrites, and only these:
installs are skipped (the test environment has them; the test command itself is not re-run),
training commands get short-run overrides, and a Ray cluster or torchrun rendezvous gets free
ports, its own temp dir and HOME (where `ray get-auth-token --generate` writes), and is stopped by
its own process ids instead of `ray stop`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from subprocs import run_in_session

REPO = Path(__file__).resolve().parent.parent
SHORT = ("--train.steps=4 --outer.inner_steps=2 --train.eval_every=4 --train.eval_batches=1 --train.warmup_steps=1 "
         "--data.max_bytes=1500000 --checkpoint.every=0 --logging.progress=false --topology.round_timeout_s=120.0")
TRAINING = re.compile(r"(distrain (simulate|train|prepare)|-m distrain\.launch\.(simulate|torchrun|ray))\b(?!.*--help)")
BLOCK_TIMEOUT_S = 900


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def logical_lines(block: str) -> list[str]:
    return block.replace("\\\n", " ").splitlines()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def rewrite(block: str, ports: dict[str, int], temp: Path) -> str:
    out = []
    for line in logical_lines(block):
        line = strip_comment(line)
        line = re.sub(r"pip install [^&]*(&&|$)", "", line).strip()  # the environment is installed
        if not line:
            continue
        if line.startswith("ray start"):
            line += (f" --port={ports['gcs']} --dashboard-port={ports['dash']} --dashboard-host=127.0.0.1"
                     f" --temp-dir={temp} --disable-usage-stats --include-dashboard=true"
                     f" --dashboard-agent-listen-port={ports['agent']} --dashboard-agent-grpc-port={ports['agent_grpc']}"
                     f" --runtime-env-agent-port={ports['runtime_env']} --metrics-export-port={ports['metrics']}")
        if line.startswith("ray stop"):
            continue  # the test stops exactly its own cluster
        line = line.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{ports['dash']}")
        line = line.replace("127.0.0.1:29400", f"127.0.0.1:{ports['rdzv']}")
        if TRAINING.search(line):
            line += " " + SHORT
        if line.startswith("distrain profile-sp"):
            line += " --repeats 1 --validate 1"
        out.append(line)
    return "\n".join(out) + "\n"


def cluster_pids(mark: str) -> set[int]:
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.add(int(d.name))
            except OSError:
                continue
    return found - {os.getpid()}


def stop(mark: str) -> None:
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while cluster_pids(mark) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the checkout's tracked files (runs/ and .cache/ appear in it, not in the repo)."""
    root = tmp_path_factory.mktemp("readme") / "distrain"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    return root


BLOCKS = bash_blocks((REPO / "README.md").read_text())


def test_the_readme_has_its_launch_blocks():
    text = "\n".join(BLOCKS)
    for needed in ("distrain simulate", "-m distrain.launch.torchrun", "-m distrain.launch.ray", "ray job submit", "ray start"):
        assert needed in text


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, checkout, tmp_path):
    block = BLOCKS[index]
    if "python -m pytest" in block:
        pytest.skip("the test command is what runs this test")
    if ("deepspeed" in block and importlib.util.find_spec("deepspeed") is None) or \
            ("ray " in block and importlib.util.find_spec("ray") is None):
        pytest.skip("an optional dependency of this block is not installed")
    temp = Path(f"/tmp/dtrm{os.getpid()}_{index}")  # short: Ray's socket paths must fit 107 bytes
    ports = {name: free_port() for name in ("gcs", "dash", "rdzv", "agent", "agent_grpc", "runtime_env", "metrics")}
    script = rewrite(block, ports, temp)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    try:
        res = run_in_session(["bash", "-e", "-c", script], cwd=checkout, env=env, timeout_s=BLOCK_TIMEOUT_S,
                             what=f"block {index}:\n{script}\n")
    finally:
        stop(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert res.returncode == 0, f"block {index}:\n{script}\n--- output ---\n{res.stdout[-4000:]}"
