"""Reading a run's newest checkpoint in tests: its parts, global weights and each worker's own part."""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.checkpoint import Part, list_checkpoints, read_all


def newest(run_dir: Path) -> Path:
    return list_checkpoints(Path(run_dir) / "checkpoints")[0]


def parts(run_dir: Path) -> dict[str, Part]:
    return read_all(newest(run_dir))


def global_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global weights, by name, from the segments' parts (each written once)."""
    out = {}
    for rel, p in parts(run_dir).items():
        if rel.startswith("global/"):
            out.update({k[len("weight/"):]: v for k, v in p.tensors.items() if k.startswith("weight/")})
    return out


def own(run_dir: Path, replica: int, stage: int = 0, device: int = 0) -> Part:
    return parts(run_dir)[f"replica-{replica}/stage-{stage}-device-{device}.safetensors"]


def content(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every part but the process RNG (which differs between processes and modes)."""
    return {f"{rel}:{k}": v for rel, p in parts(run_dir).items() for k, v in p.tensors.items() if k != "rng/torch"}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_global(held: dict[str, torch.Tensor], run_dir: Path) -> None:
    """A worker's global weights (of the layers it holds) equal the checkpoint's."""
    saved = global_weights(run_dir)
    assert_same(held, {n: saved[n] for n in held})
