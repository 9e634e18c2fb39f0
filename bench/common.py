"""What every benchmark records beside its figures: the machine and the command that ran."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces this run."""
    return "python " + shlex.join([script, *(sys.argv[1:] if argv is None else argv)])
