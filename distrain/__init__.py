"""distrain: pre-training language models across machines joined by slow links.

One installed package. The repository keeps ``comm/``, ``parallel/`` and ``launch/`` beside
``distrain/``; installed (wheel or editable) they are ``distrain.comm``, ``distrain.parallel`` and
``distrain.launch`` (pyproject's ``package-dir``), so nothing generic lands in site-packages.
Imported straight from a source tree (a Ray job's working-directory copy, ``PYTHONPATH=.``) the
same names resolve to the sibling folders of *this* tree, never to another copy's.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SIBLINGS = ("comm", "parallel", "launch")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``distrain.comm`` & co. in the folders beside this source tree's ``distrain/``."""

    def __init__(self, root: Path):
        self.roots = {f"{__name__}.{name}": root / name for name in _SIBLINGS}

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's signature
        folder = self.roots.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _in_source_tree() -> bool:
    """This ``distrain/`` sits in a checkout (its siblings are ours), not in site-packages."""
    root = _HERE.parent
    return not (_HERE / "comm").is_dir() and (root / "pyproject.toml").is_file() and \
        all((root / name / "__init__.py").is_file() for name in _SIBLINGS) and (root / "comm" / "wire.py").is_file()


if _in_source_tree():
    sys.meta_path.insert(0, _SourceTreeFinder(_HERE.parent))
