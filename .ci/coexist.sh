#!/usr/bin/env bash
# distrain installs one top-level package, `distrain`, so it coexists with Jupyter's top-level
# `comm` (a dependency of ipykernel): a fresh venv gets both, imports both from outside the tree,
# and uninstalling either one leaves the other working. One line per check; exits non-zero on
# the first failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/distrain-coexist.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH PYTHONHOME  # nothing may point back into the tree
export PIP_DISABLE_PIP_VERSION_CHECK=1

# A copy of the tree (tracked and new files, no ignored build outputs): the install writes nothing
# into the checkout and picks up nothing stale from it.
mkdir "$TMP/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$TMP/src")

# --system-site-packages: torch & co. come from the system, not reinstalled.
"$PY" -m venv --system-site-packages "$TMP/venv"
VPY="$TMP/venv/bin/python"
# A venv of Python < 3.12 bundles an old setuptools that would shadow the system's (the build needs
# >= 68 and --no-build-isolation uses what is installed): drop it.
if compgen -G "$TMP/venv/lib/python*/site-packages/setuptools" > /dev/null; then
    "$VPY" -m pip uninstall --quiet -y setuptools
fi
cd "$TMP"  # outside the tree: the checkout cannot shadow an installed package
"$VPY" -m pip install --quiet --ignore-installed comm  # into the venv even where the system has comm
"$VPY" -m pip install --quiet --no-deps --no-build-isolation "$TMP/src"  # a regular, non-editable install

check() {  # check <what> <python code>: run it in the venv; print one line; stop on failure
    if out="$("$VPY" -c "$2" 2>&1)"; then
        echo "ok   $1"
    else
        echo "FAIL $1"
        echo "$out" | tail -n 20 | sed 's/^/     /'
        exit 1
    fi
}
VENV="$TMP/venv"
COMM_OK="from comm import create_comm; import comm; assert comm.__file__.startswith('$VENV/'), comm.__file__"
DISTRAIN_OK="import distrain, distrain.comm.wire, distrain.launch.torchrun
assert distrain.__file__.startswith('$VENV/'), distrain.__file__
assert distrain.comm.wire.__file__.startswith('$VENV/'), distrain.comm.wire.__file__"

check "Jupyter's comm imports from the venv (from comm import create_comm)" "$COMM_OK"
check "distrain, distrain.comm.wire, distrain.launch.torchrun import from the venv" "$DISTRAIN_OK"
"$VPY" -m pip uninstall --quiet -y comm
check "after pip uninstall comm: distrain still imports from the venv" "$DISTRAIN_OK"
"$VPY" -m pip install --quiet --ignore-installed comm
"$VPY" -m pip uninstall --quiet -y distrain
check "after pip uninstall distrain: from comm import create_comm still works" "$COMM_OK"
check "after pip uninstall distrain: no distrain left in the venv" \
    "import importlib.util as u; s = u.find_spec('distrain'); assert s is None or not s.origin.startswith('$VENV/'), s.origin"
echo "coexist: all checks passed"
