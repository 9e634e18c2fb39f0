"""Build the kernel shared libraries from ``csrc/``: ``python -m distrain.comm.kernels.build``.

Kept out of ``pip install`` on purpose: installing never needs a compiler, and a missing library
only means the PyTorch reference runs instead. The CPU library needs g++ with OpenMP; the CUDA
library needs nvcc and is built only when asked for (``--cuda``) or when nvcc is on PATH and
``--cuda=auto`` (the default) finds it.

Every library gets a stamp file holding a hash of its sources and flags; the loader refuses a
library whose stamp no longer matches the sources next to it, so a stale build never silently
disagrees with the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIR = Path(os.environ.get("DISTRAIN_KERNELS_SRC", REPO_ROOT / "csrc"))
CPU_LIB = "libdistrain_kernels_cpu.so"
CUDA_LIB = "libdistrain_kernels_cuda.so"
CUDA_ARCHS = ("80", "90")

CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off",
             "-fvisibility=hidden", "-Wall", "-Wextra"]
# -fmad=false: the reference rounds after every multiply and add; a fused multiply-add would
# change the last bit of the error-feedback buffer.
# Static cudart: the library then loads next to any torch CUDA build without a libcudart search.
NVCC_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
              "-fmad=false", "--cudart=static"]


class BuildError(RuntimeError):
    """A compiler is missing or a compilation failed."""


@dataclass(frozen=True)
class Target:
    name: str  # library file name
    sources: tuple[Path, ...]
    command: tuple[str, ...]  # full compiler command line without the output path

    def stamp(self) -> str:
        """Source hash, then a hash of the command: changes whenever the library must be rebuilt."""
        cmd = hashlib.sha256("\0".join(self.command).encode()).hexdigest()
        return f"{sources_hash(self.sources)}\n{cmd}"


def sources_hash(sources: tuple[Path, ...]) -> str:
    """Hash of the given sources and every header in ``csrc/`` (no compiler needed)."""
    h = hashlib.sha256()
    for path in sorted(sources) + sorted(SRC_DIR.glob("*.h")):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def kind_sources(kind: str) -> tuple[Path, ...]:
    """Sources of the ``cpu`` (``*.cpp``) or ``cuda`` (``*.cu``) library."""
    return tuple(sorted(SRC_DIR.glob("*.cpp" if kind == "cpu" else "*.cu")))


def built_from_current_sources(kind: str, out_dir: Path | None = None) -> bool:
    """True when the library's stamp records the sources now in ``csrc/`` (flags may differ)."""
    name = CPU_LIB if kind == "cpu" else CUDA_LIB
    stamp = (out_dir or lib_dir()) / (name + ".stamp")
    if not stamp.exists():
        return False
    return stamp.read_text().split("\n", 1)[0].strip() == sources_hash(kind_sources(kind))


def lib_dir() -> Path:
    """Where libraries are written and looked for (``DISTRAIN_KERNELS_DIR`` overrides)."""
    return Path(os.environ.get("DISTRAIN_KERNELS_DIR", REPO_ROOT / "build" / "kernels"))


def cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def nvcc_compiler() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cpu_target() -> Target:
    cxx = cxx_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    sources = kind_sources("cpu")
    if not sources:
        raise BuildError(f"no .cpp sources under {SRC_DIR}")
    extra = os.environ.get("DISTRAIN_KERNELS_CXXFLAGS", "").split()
    return Target(CPU_LIB, sources, (cxx, *CXX_FLAGS, *extra, f"-I{SRC_DIR}", *map(str, sources)))


def cuda_target(archs: tuple[str, ...] = CUDA_ARCHS) -> Target:
    nvcc = nvcc_compiler()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    sources = kind_sources("cuda")
    if not sources:
        raise BuildError(f"no .cu sources under {SRC_DIR}")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX for the newest arch so later GPUs can JIT it.
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return Target(CUDA_LIB, sources,
                  (nvcc, *NVCC_FLAGS, *gencode, f"-I{SRC_DIR}", *map(str, sources)))


def is_current(target: Target, out_dir: Path | None = None) -> bool:
    """True when the library exists and was built from exactly these sources and flags."""
    out_dir = out_dir or lib_dir()
    stamp = out_dir / (target.name + ".stamp")
    return (out_dir / target.name).exists() and stamp.exists() and \
        stamp.read_text().strip() == target.stamp().strip()


def build(target: Target, out_dir: Path | None = None, force: bool = False,
          verbose: bool = False) -> Path:
    """Compile ``target`` into ``out_dir`` unless an up-to-date build is there already."""
    out_dir = out_dir or lib_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / target.name
    if not force and is_current(target, out_dir):
        return out
    # Write to a private name then rename: a concurrent loader never sees a half-written file.
    tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
    cmd = [*target.command, "-o", str(tmp)]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"building {target.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, out)
    (out_dir / (target.name + ".stamp")).write_text(target.stamp() + "\n")
    return out


def build_cpu(out_dir: Path | None = None, force: bool = False, verbose: bool = False) -> Path:
    return build(cpu_target(), out_dir, force, verbose)


def build_cuda(out_dir: Path | None = None, force: bool = False, verbose: bool = False,
               archs: tuple[str, ...] = CUDA_ARCHS) -> Path:
    return build(cuda_target(archs), out_dir, force, verbose)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distrain.comm.kernels.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: %(default)s → "
                   "$DISTRAIN_KERNELS_DIR or build/kernels)")
    p.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                   help="build the CUDA library: auto = when nvcc is found")
    p.add_argument("--cpu", choices=("yes", "no"), default="yes")
    p.add_argument("--arch", default=",".join(CUDA_ARCHS), help="CUDA SM versions, e.g. 80,90")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="print compiler commands")
    args = p.parse_args(argv)
    try:
        if args.cpu == "yes":
            print(f"cpu:  {build_cpu(args.out, args.force, args.verbose)}")
        if args.cuda == "yes" or (args.cuda == "auto" and nvcc_compiler() is not None):
            archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
            print(f"cuda: {build_cuda(args.out, args.force, args.verbose, archs)}")
        elif args.cuda == "auto":
            print("cuda: skipped (nvcc not found)")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
