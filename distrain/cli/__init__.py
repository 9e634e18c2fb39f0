"""Where a command happens: ``distrain <command>`` (``main``) and the tool commands beside it."""

from distrain.cli.main import main

__all__ = ["main"]
