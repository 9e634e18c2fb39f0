"""``distrain compare`` overlays runs; the progress bar and per-round lines never share a terminal line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrain.cli import main
from distrain.cli.compare import COMPARE_AXES, CompareError, compare_runs, figure, load_run, table
from distrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def fake_run(root: Path, name: str, algorithm: str, wire: list[float], losses: list[float], replicas: int = 4,
             step_s: float = 1.0) -> Path:
    """A run directory in the runner's format: config.toml + metrics.jsonl (val at 0 and each round)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(textwrap.dedent(f"""\
        [run]
        name = "{name}"
        [outer]
        algorithm = "{algorithm}"
        inner_steps = 15
        [topology]
        replicas = {replicas}
        """))
    recs = [{"kind": "val", "step": 0, "round": 0, "tokens": 0, "bytes_sent": 0, "sim_time_s": 0.0,
             "val_loss": losses[0] + 0.5}]
    sent = 0
    for i, (w, loss) in enumerate(zip(wire, losses), 1):
        sent += int(w)
        rec = {"kind": "train", "round": i, "step": 15 * i, "tokens": 1000 * i, "loss": loss, "wire_bytes": w,
               "bytes_sent": sent, "sim_time_s": step_s * 15 * i, "utilisation": 0.9}
        recs.append(rec)
        recs.append({**{k: rec[k] for k in ("step", "round", "tokens", "bytes_sent", "sim_time_s")}, "kind": "val",
                     "val_loss": loss + 0.1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture
def two_runs(tmp_path):
    a = fake_run(tmp_path, "sl", "sparseloco", [6000.0, 6200.0, 5800.0], [5.0, 4.5, 4.2])
    b = fake_run(tmp_path, "dl", "diloco", [480_000.0] * 3, [4.9, 4.4, 4.1], step_s=1.2)
    return a, b


def test_load_run_reads_algorithm_and_bytes_per_round(two_runs):
    info, train, val = load_run(two_runs[0])
    assert (info.name, info.algorithm, info.replicas, info.inner_steps, info.rounds) == ("sl", "sparseloco", 4, 15, 3)
    assert info.wire_bytes_per_round == pytest.approx(6000.0)
    assert info.final_val_loss == pytest.approx(4.3) and len(train) == 3 and len(val) == 4
    assert info.label() == "sl: sparseloco, 5.9KB/round"


def test_figures_overlay_one_line_per_run_with_labelled_legend(two_runs):
    loaded = [load_run(d) for d in two_runs]
    for x_key, label, _ in COMPARE_AXES:
        fig = figure(loaded, x_key, label)
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["sl: sparseloco, 5.9KB/round", "dl: diloco, 468.8KB/round"]
        val_lines = [ln for ln in ax.get_lines() if ln.get_label() in legend]
        log_x = x_key == "bytes_sent"  # 6 KB vs 1.4 MB: log axis, where x = 0 cannot be drawn
        for (info, _, val), ln in zip(loaded, val_lines):
            shown = [r for r in val if r[x_key] > 0 or not log_x]
            assert list(ln.get_xdata()) == [r[x_key] for r in shown]
            assert list(ln.get_ydata()) == [r["val_loss"] for r in shown]
        assert ax.get_xscale() == ("log" if log_x else "linear")
        assert ax.get_xlabel() == label


def test_compare_writes_the_pngs_and_a_summary(two_runs, tmp_path):
    files, infos = compare_runs(list(two_runs), tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == sorted([f for _, _, f in COMPARE_AXES] + ["compare.json"])
    for p in files:
        assert p.stat().st_size > 1000 or p.suffix == ".json"
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [s["algorithm"] for s in summary] == ["sparseloco", "diloco"]
    assert "sparseloco" in table(infos) and "468.8KB" in table(infos)


def test_cli_compare(two_runs, tmp_path, capsys):
    assert main(["compare", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "sparseloco" in out and "diloco" in out and "compare_loss_vs_bytes.png" in out
    assert (tmp_path / "cmp" / "compare_loss_vs_sim_time.png").is_file()


def test_cli_compare_bad_run_dir_is_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distrain compare: ") and "no metrics.jsonl" in err and "\n" not in err
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_same_run_names_are_told_apart(tmp_path):
    a = fake_run(tmp_path / "x", "run", "sparseloco", [10.0], [5.0])
    b = fake_run(tmp_path / "y", "run", "diloco", [100.0], [5.0])
    _, infos = compare_runs([a, b], tmp_path / "out")
    assert infos[0].name != infos[1].name and "x/run" in infos[0].name


def test_a_truncated_last_metrics_line_is_skipped(two_runs, caplog):
    path = two_runs[0] / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "loss": 3.')
    assert len(read_metrics(two_runs[0])) == 7
    assert "not a JSON object" in caplog.text


def test_run_without_loss_records_is_refused(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"kind": "event"}\n')
    with pytest.raises(CompareError, match="no loss records"):
        load_run(d)


# ----- progress bar vs per-round lines -----------------------------------------------------------
# tqdm reads a fake clock that gains 1 s per round, past the bar's mininterval (0.5 s): every update
# redraws the bar before the round's line, however fast or loaded the machine (no sleeps).
PROGRESS_SCRIPT = textwrap.dedent("""\
    import tqdm.std
    from distrain.metrics import Progress
    now = [0.0]
    tqdm.std.time = lambda: now[0]
    tqdm.std.tqdm.monitor_interval = 0  # no monitor thread: it would read the real clock
    p = Progress(4, True, desc="sparseloco")
    print("active", p.active, flush=True)
    for i in range(4):
        now[0] += 1.0
        p.update(1, loss=1.0 / (i + 1))
        p.write(f"round {i + 1} done")
    p.close()
    """)


def screen(raw: str) -> list[str]:
    """What a terminal shows: '\\r' returns to column 0 and overwrites; '\\n' starts a new line."""
    lines, cur, col = [], [], 0
    for ch in raw:
        if ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    lines.append("".join(cur).rstrip())
    return lines


def run_script(stdout_tty: bool, stderr_tty: bool) -> tuple[str, str]:
    """Run PROGRESS_SCRIPT with stdout/stderr on a pseudo-terminal (100 columns) or a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT], stdin=subprocess.DEVNULL,
                            stdout=slave if stdout_tty else subprocess.PIPE,
                            stderr=slave if stderr_tty else subprocess.PIPE, env=env)
    os.close(slave)
    tty = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        tty += chunk
    out, err = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0, err
    tty_text = tty.decode(errors="replace")
    return (tty_text if stdout_tty else out.decode()), (tty_text if stderr_tty else err.decode())


@pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals")
def test_progress_bar_and_round_lines_never_share_a_terminal_line():
    out, _ = run_script(stdout_tty=True, stderr_tty=True)
    assert "active True" in out and "%|" in out  # the bar really was drawn
    assert all(f"{i}/4 [00:0{i}<" in out for i in range(1, 5))  # and redrawn by each round's update
    shown = screen(out)
    rounds = [ln for ln in shown if "round" in ln]
    assert rounds == [f"round {i} done" for i in range(1, 5)]  # each alone on its line, in order


@pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals")
def test_piped_stdout_gets_flushed_lines_and_no_bar_on_the_terminal():
    """``distrain simulate | tee log``: a bar on stderr would share lines with late piped output."""
    out, err = run_script(stdout_tty=False, stderr_tty=True)
    assert "active False" in out and "%|" not in err
    assert [ln for ln in out.splitlines() if "round" in ln] == [f"round {i} done" for i in range(1, 5)]
