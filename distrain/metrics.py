"""Run metrics: ``metrics.jsonl`` always, TensorBoard events when enabled, a progress bar."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON object per record; mirrors numeric fields to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, append: bool = False):
        """``append``: a resumed run continues its file; a fresh run starts a new one."""
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but never fail a run over it
                self._tb = None

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        if self._tb is not None and step is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "round"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a line that is not a JSON object (e.g. the last
    line of a run killed mid-write) is skipped with a warning instead of failing a plot."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl in this run directory")
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            log.warning("%s:%d: not a JSON object, skipped", path, n)
    return records


class Progress:
    """tqdm bar when enabled and both stdout and stderr are terminals; silent otherwise.

    Per-round lines go to stdout. With a bar on screen they are written through
    ``tqdm.external_write_mode`` (bar cleared, line written and *flushed*, bar redrawn), so a line
    never lands on the bar's terminal line. When stdout is not a terminal (``| tee log``, ``> log``)
    there is no bar: a bar on stderr and block-buffered lines arriving later through a pipe
    would share terminal lines, which no ordering on our side can prevent.
    """

    def __init__(self, total: int, enabled: bool, desc: str = "train", initial: int = 0):
        self._bar = None
        if enabled and _isatty(sys.stderr) and _isatty(sys.stdout):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                             mininterval=0.5)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def write(self, line: str) -> None:
        if self._bar is None:
            print(line, flush=True)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stdout):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return str(n)
