"""How much of the trained weights a k-dim boundary subspace keeps: would a basis that follows the model help?

    python bench/subspace_energy.py            # train the embedded default's model (one full replica, 600 steps)
    python bench/subspace_energy.py --steps 60 # a smoke run

A compressed pipeline replica starts every round from the global weights projected onto span(U):
attention-out and MLP-down of every layer before its last boundary become U·UᵀW. The share of those
matrices' energy (squared Frobenius norm) that survives the projection is what the compressed
replica keeps of what the full replicas trained. This benchmark trains the embedded default's model
(d = 128, 4 layers; the pipeline's constrained layers are 0 and 1) and measures that share, at the
start and at the end of training, for three bases at every k of the k sweep:

- ``seeded``: the fixed random orthonormal basis distrain uses (``make_basis``);
- ``embedding``: the top-k right singular vectors of the (centred) global embedding, which every
  stage of a pipeline holds;
- ``optimal``: the top-k eigenvectors of Σ W·Wᵀ over the constrained matrices, the best any
  basis can do (it needs every constrained stage's weights).

Writes bench/results/subspace_energy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.config import load_config  # noqa: E402
from distrain.parallel.pipeline.subspace import make_basis  # noqa: E402
from distrain.runtime.simulation import Simulation  # noqa: E402

RESULTS = REPO / "bench" / "results" / "subspace_energy.json"
CONSTRAINED = tuple(f"layers.{i}.{m}" for i in (0, 1) for m in ("attention.wo.weight", "feed_forward.w2.weight"))


def kept_share(weights: dict[str, torch.Tensor], u: torch.Tensor) -> float:
    """Σ‖UᵀW‖² / Σ‖W‖² over the constrained matrices."""
    total = sum(float(weights[n].norm() ** 2) for n in CONSTRAINED)
    return sum(float((u.T @ weights[n]).norm() ** 2) for n in CONSTRAINED) / total


def bases(weights: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor]:
    gram = sum(weights[n] @ weights[n].T for n in CONSTRAINED)
    _, vecs = torch.linalg.eigh(gram)
    emb = weights["tok_embeddings.weight"]
    _, _, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    dim = emb.shape[1]
    return {"seeded": make_basis(dim, k, seed, dtype=torch.float64), "embedding": vh[:k].T,
            "optimal": vecs[:, -k:]}


def shares(weights: dict[str, torch.Tensor], ks: list[int], seed: int) -> dict[str, dict[str, float]]:
    weights = {n: t.detach().double() for n, t in weights.items()}
    return {str(k): {name: kept_share(weights, u) for name, u in bases(weights, k, seed).items()} for k in ks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("default", [
            "--run.name=energy", f"--run.out_dir={out}", f"--run.seed={args.seed}", f"--train.steps={args.steps}",
            "--topology.replica=[{count=1}]", "--outer.algorithm=none", f"--train.eval_every={args.steps}",
            "--checkpoint.every=0", "--logging.progress=false", "--logging.tensorboard=false",
            "--logging.plots=false", "--runtime.torch_threads=1"])
        sim = Simulation(cfg)
        start = sim.workers[0].global_state()  # the seeded initial weights (vocab from the tokenizer)
        sim.run()
        end = sim.workers[0].global_state()
    d = cfg.model.dim
    ks = [d // 8, d // 16, d // 32, d // 64]
    seed = cfg.topology.replica[-1].compress.seed if cfg.topology.replica else 1337
    result = {"at_init": shares(start, ks, seed), "trained": shares(end, ks, seed), "steps": args.steps,
              "constrained": list(CONSTRAINED), "d_model": d, "machine": machine(),
              "command": command("bench/subspace_energy.py")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("| k | when | seeded | embedding | optimal |\n|---|---|---|---|---|")
    for when in ("at_init", "trained"):
        for k in map(str, ks):
            r = result[when][k]
            print(f"| {k} (d/{d // int(k)}) | {when.replace('_', ' ')} | {r['seeded']:.1%} | {r['embedding']:.1%} | "
                  f"{r['optimal']:.1%} |")


if __name__ == "__main__":
    main()
