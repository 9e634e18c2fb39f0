"""PNG plots of a run directory's ``metrics.jsonl`` (loss vs steps/tokens/bytes/wall-clock)."""

from __future__ import annotations

from pathlib import Path

from typing import Any

from distrain.metrics import read_metrics

# x axes of the loss plots: metrics key, axis label, file name.
LOSS_AXES = [
    ("step", "inner step", "loss_vs_step.png"),
    ("tokens", "tokens (all replicas)", "loss_vs_tokens.png"),
    ("bytes_sent", "bytes sent per replica", "loss_vs_bytes.png"),
    ("sim_time_s", "simulated wall-clock (s)", "loss_vs_sim_time.png"),
]


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records with a loss, validation records with a loss)."""
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [r for r in records if r.get("kind") == "val" and r.get("val_loss") is not None]
    return train, val


def series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of ``rows`` that have both keys."""
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every plot the metrics support into ``run_dir/plots``; return the files written."""
    plt = pyplot()
    run_dir = Path(run_dir)
    train, val = loss_records(read_metrics(run_dir))
    if not train and not val:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss records to plot")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written: list[Path] = []

    for x_key, label, fname in LOSS_AXES:
        tx, ty = series(train, x_key, "loss")
        vx, vy = series(val, x_key, "val_loss")
        if not tx and not vx:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        if tx:
            ax.plot(tx, ty, label="train", alpha=0.6)
        if vx:
            ax.plot(vx, vy, "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(run_dir.name)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    util = [r for r in train if r.get("utilisation") is not None and r.get("round") is not None]
    if util:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["round"] for r in util], [r["utilisation"] for r in util], label="compute (all workers)")
        waits = [r for r in util if r.get("pipeline_wait_share") is not None]
        if waits:  # the pipeline's share of simulated time: bubble and boundary transfers
            ax.plot([r["round"] for r in waits], [r["pipeline_wait_share"] for r in waits],
                    label="pipeline stages waiting (bubble + boundaries)")
            ax.legend()
        ax.set_xlabel("outer round")
        ax.set_ylabel("share of simulated time")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "utilisation.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    split = time_split_totals(train)
    if split:
        written.append(plot_time_split(plt, split, out / "time_per_replica.png", run_dir.name))
    return written


TIME_PARTS = (("compute", "compute"), ("pipeline", "pipeline bubble + boundaries"),
              ("exchange", "exchange"), ("idle", "idle (waiting for the others)"))


def time_split_totals(train: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds per replica and part over the run, from the round records' ``time``."""
    splits = [r["time"] for r in train if isinstance(r.get("time"), dict)]
    if not splits:
        return {}
    n = len(splits[0]["compute"])
    return {k: [sum(sp[k][i] for sp in splits if len(sp[k]) == n) for i in range(n)] for k, _ in TIME_PARTS}


def plot_time_split(plt: Any, split: dict[str, list[float]], path: Path, title: str) -> Path:
    """Where each replica's time went: a stacked bar per replica (compute / pipeline / exchange / idle)."""
    n = len(split["compute"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n + 2), 4))
    bottom = [0.0] * n
    for key, label in TIME_PARTS:
        ax.bar(range(n), split[key], bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, split[key])]
    ax.set_xticks(range(n), [f"replica {i}" for i in range(n)])
    ax.set_ylabel("seconds (simulated, or real under torchrun/Ray)")
    ax.set_title(f"{title}: where each replica's time went")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
