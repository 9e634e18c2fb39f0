"""The wheel installs exactly one top-level package, ``distrain``, with every source file at its
mapped path: pyproject lists the packages explicitly (the folders comm/, parallel/, launch/ and
configs/ map into distrain), so a new subpackage left out of the list would silently be missing
from every install but not from a source checkout, where the tests run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# tree folder -> where its files land in the wheel
MAPPED = {"distrain": "distrain", "comm": "distrain/comm", "parallel": "distrain/parallel", "launch": "distrain/launch"}


def tree_files() -> list[str]:
    """The checkout's files, tracked or new, without ignored build outputs."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the tree (~2 s, so not ``slow``): the build writes nothing into
    the checkout, and stale outputs there (build/lib) cannot slip into the wheel and hide a missing
    package. Offline: no build isolation, no index."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    for f in tree_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--disable-pip-version-check", ".", "-w", str(root / "dist")],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (path,) = (root / "dist").glob("distrain-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def dist_info(wheel: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info")}
    return name


def test_the_wheel_installs_one_top_level_package_with_every_source_file(wheel):
    names = wheel.namelist()
    info = dist_info(wheel)
    assert re.fullmatch(r"distrain-[^-/]+\.dist-info", info)
    assert {n.split("/")[0] for n in names} == {"distrain", info}
    assert wheel.read(f"{info}/top_level.txt").decode().split() == ["distrain"]
    expected = {MAPPED[f.split("/")[0]] + f[len(f.split("/")[0]):] for f in tree_files()
                if f.endswith(".py") and f.split("/")[0] in MAPPED}
    packaged = {n for n in names if n.endswith(".py")}
    assert expected - packaged == set(), "source files missing from the wheel (a package not in pyproject's list?)"
    assert packaged - expected == set(), "files in the wheel that the tree does not have"
    presets = {f"distrain/{f}" for f in tree_files() if re.fullmatch(r"configs/[^/]+\.toml", f)}
    assert presets and presets <= set(names)


def test_the_wheel_metadata_names_distrain_and_its_console_script(wheel):
    info = dist_info(wheel)
    meta = wheel.read(f"{info}/METADATA").decode()
    assert re.search(r"^Name: distrain$", meta, flags=re.M)
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    section = re.search(r"^\[console_scripts\]\n((?:[^\[].*\n?)*)", entry_points, flags=re.M)
    scripts = dict(re.findall(r"^(\S+)\s*=\s*(\S+)", section.group(1), flags=re.M)) if section else {}
    assert scripts == {"distrain": "distrain.cli:main"}
