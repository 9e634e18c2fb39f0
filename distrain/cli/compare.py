"""``distrain compare RUN_DIR RUN_DIR … [--out DIR]``: overlay runs in the pictures users compare.

One PNG per x axis — tokens, bytes sent per replica, simulated wall-clock — with one colour per
run: validation loss as markers on a line, training loss faint behind it. The legend names each
run with its algorithm and its mean wire bytes per replica per round, so "same loss, 150× fewer
bytes" can be read off one picture. A table of the same facts is printed.

Each run directory is read as written by a run: ``metrics.jsonl`` (records) and ``config.toml``
(read as plain TOML, so runs written by older or newer versions of the config still compare).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distrain.config import ALGORITHMS
from distrain.metrics import human_bytes, read_metrics
from distrain.cli.command import ToolCommand
from distrain.plots import loss_records, pyplot, series

# x axes of the comparison: metrics key, axis label, file name.
COMPARE_AXES = [
    ("tokens", "tokens (all replicas)", "compare_loss_vs_tokens.png"),
    ("bytes_sent", "bytes sent per replica", "compare_loss_vs_bytes.png"),
    ("sim_time_s", "simulated wall-clock (s)", "compare_loss_vs_sim_time.png"),
]


class CompareError(ValueError):
    """A run directory cannot be compared (missing or empty metrics, unreadable config)."""


@dataclass
class RunInfo:
    """What the legend and the table say about one run."""

    run_dir: str
    name: str
    algorithm: str
    replicas: int | None
    inner_steps: int | None
    wire_bytes_per_round: float
    rounds: int
    final_val_loss: float | None
    tokens: int | None
    sim_time_s: float | None

    def label(self) -> str:
        per_round = human_bytes(self.wire_bytes_per_round) + "/round" if self.wire_bytes_per_round else "no wire"
        return f"{self.name}: {self.algorithm}, {per_round}"


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: unreadable config ({e})") from None


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sec = cfg.get(name)
    return sec if isinstance(sec, dict) else {}


def load_run(run_dir: str | Path) -> tuple[RunInfo, list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary, train records, validation records) of one run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: not a run directory")
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError as e:
        raise CompareError(str(e)) from None
    train, val = loss_records(records)
    if not train and not val:
        raise CompareError(f"{run_dir}/metrics.jsonl has no loss records to compare")
    cfg = _read_config(run_dir)
    outer, topo = _section(cfg, "outer"), _section(cfg, "topology")
    wire = [r["wire_bytes"] for r in train if isinstance(r.get("wire_bytes"), (int, float))]
    last = (val or train)[-1]
    tables = topo.get("replica") or []
    replicas = sum(int(t.get("count", 1)) for t in tables if isinstance(t, dict)) if tables else topo.get("replicas")
    info = RunInfo(
        run_dir=str(run_dir),
        name=str(_section(cfg, "run").get("name") or run_dir.name),
        algorithm=str(outer.get("algorithm", "?")),
        replicas=replicas if isinstance(replicas, int) else None,
        inner_steps=outer.get("inner_steps") if ALGORITHMS.get(outer.get("algorithm"), ALGORITHMS["none"]).rounds else None,
        wire_bytes_per_round=float(sum(wire) / len(wire)) if wire else 0.0,
        rounds=max((r.get("round") or 0 for r in train), default=0),
        final_val_loss=val[-1]["val_loss"] if val else None,
        tokens=last.get("tokens"),
        sim_time_s=last.get("sim_time_s"),
    )
    return info, train, val


def _unique_names(infos: list[RunInfo]) -> None:
    """Two runs with the same run.name (e.g. copied directories) get their directory as name."""
    names = [i.name for i in infos]
    for info in infos:
        if names.count(info.name) > 1:
            info.name = f"{info.name} ({Path(info.run_dir).parent.name}/{Path(info.run_dir).name})"


def _points(xy: tuple[list[float], list[float]], log_x: bool) -> tuple[list[float], list[float]]:
    """On a log axis, the points at x = 0 (the evaluation before any byte was sent) cannot be drawn."""
    if not log_x:
        return xy
    pts = [(x, y) for x, y in zip(*xy) if x > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


Loaded = list[tuple[RunInfo, list[dict[str, Any]], list[dict[str, Any]]]]


def figure(loaded: Loaded, x_key: str, label: str) -> Any:
    """One matplotlib figure of every run's loss against ``x_key``; None if no run has that axis."""
    plt = pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    positive = [x for _, train, val in loaded for x in series(train, x_key, "loss")[0] + series(val, x_key, "val_loss")[0]
                if x > 0]
    log_x = x_key == "bytes_sent" and bool(positive) and max(positive) / min(positive) > 100
    xs: list[float] = []
    for i, (info, train, val) in enumerate(loaded):
        colour = colours[i % len(colours)]
        tx, ty = _points(series(train, x_key, "loss"), log_x)
        vx, vy = _points(series(val, x_key, "val_loss"), log_x)
        if tx:
            ax.plot(tx, ty, color=colour, alpha=0.25, linewidth=1)
        if vx:
            ax.plot(vx, vy, "o-", color=colour, markersize=3, label=info.label())
        elif tx:
            ax.plot([], [], "o-", color=colour, label=info.label() + " (train loss)")
        xs += [x for x in tx + vx if x > 0]
    if not xs:
        plt.close(fig)
        return None
    if log_x:
        ax.set_xscale("log")  # ddp vs sparseloco differ by orders of magnitude
    ax.set_xlabel(label)
    ax.set_ylabel("loss (markers: validation, faint: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss vs " + label)
    fig.tight_layout()
    return fig


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> tuple[list[Path], list[RunInfo]]:
    """Write the comparison PNGs and ``compare.json`` into ``out``; return (files, run summaries)."""
    if not run_dirs:
        raise CompareError("compare needs at least one run directory")
    loaded = [load_run(d) for d in run_dirs]
    infos = [info for info, _, _ in loaded]
    _unique_names(infos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written: list[Path] = []
    for x_key, label, fname in COMPARE_AXES:
        fig = figure(loaded, x_key, label)
        if fig is None:
            continue
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    summary = out / "compare.json"
    summary.write_text(json.dumps([asdict(i) for i in infos], indent=1))
    written.append(summary)
    return written, infos


def table(infos: list[RunInfo]) -> str:
    """A plain-text table: run, algorithm, replicas, H, bytes/round, final val loss, sim time."""
    rows = [("run", "algorithm", "R", "H", "wire/replica/round", "final val loss", "sim wall-clock")]
    for i in infos:
        loss = f"{i.final_val_loss:.4f}" if isinstance(i.final_val_loss, float) and math.isfinite(i.final_val_loss) else "-"
        sim = f"{i.sim_time_s:.1f} s" if isinstance(i.sim_time_s, (int, float)) else "-"
        rows.append((i.name, i.algorithm, str(i.replicas or "-"), str(i.inner_steps or "-"),
                     human_bytes(i.wire_bytes_per_round) if i.wire_bytes_per_round else "-", loss, sim))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="compare", help="directory for the PNGs and compare.json (default: ./compare)")


def run(args: argparse.Namespace) -> int:
    try:
        files, infos = compare_runs(args.run_dirs, args.out)
    except CompareError as e:
        print(f"distrain compare: {e}", file=sys.stderr)
        return 2
    print(table(infos))
    for path in files:
        print(path)
    return 0


COMMAND = ToolCommand("overlay runs: loss vs tokens, bytes sent and simulated wall-clock", add_arguments, run)
