"""``python -m distrain.launch.simulate`` — the same as ``distrain simulate`` (every mode has a launch module)."""

from __future__ import annotations

import sys

from distrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
