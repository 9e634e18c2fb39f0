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
    return written
