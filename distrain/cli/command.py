"""What a tool command is (plot, compare, estimate, plan-sp, profile-sp): its own arguments, no training config.

Its own module, below ``distrain.cli``, so command modules can define one without importing the CLI
that lists them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ToolCommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
