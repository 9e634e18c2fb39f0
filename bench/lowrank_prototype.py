"""Would a constraint-free low-rank boundary reach issue 18's target? A prototype, measured before it is built.

    python bench/lowrank_prototype.py            # 3 seeds: two_full, selective bf16, low-rank r = 26 and 16
    python bench/lowrank_prototype.py --quick    # 60 steps, 1 seed (a smoke run)
    python bench/lowrank_prototype.py --errors RUN_DIR   # reconstruction errors on a trained run's boundary

Issue 18 asks two compressed pipeline replicas to bring >= 70 % of the gain two uncompressed ones
bring over two full replicas alone, at >= 16x fewer boundary bytes than bf16. Per-token int4 brings
95 % at 3.9x; the subspace method 30 % at 31x, because it confines the stage's weights to span(U).
This prototype leaves the weights free and compresses only what crosses the boundary: the first
stage's output h, less the token embedding e (which the receiver could rebuild from the token ids),
projected onto the r leading principal directions of that difference (recomputed from the stage's
own activations once a round: 60 micro-batches), the r coordinates quantised per token to int4 with
one fp16 scale. The exact gradient of that forward lies in span(U) too, so the backward would send r
int4 coordinates as well: r/2 + 2 bytes per token and direction, plus the basis once a round
(128 x r bf16), about 3 % more. r = 26 is 15 B/token (17x below bf16's 256 before the basis, 16.6x
with it); r = 16 is 10 B/token (25.6x; 24.8x).

It is a measurement, not the product: the stage's ``forward`` is patched in the simulation (the
boundary itself still carries bf16, so the loss is what the format would give, and the bytes are
computed, not sent), and the receiver's embedding is the sender's own (in the product it would be
the round's global embedding: |e| is 1.7 % of |h| on the trained default model, ``--errors``). Setting:
``bench/hetero.py``'s, at equal steps (``straggler_policy = "wait"``), on this commit, with its
references (two full replicas alone; two full + two bf16 pipeline replicas) run again beside it.
Writes bench/results/lowrank_prototype.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from common import command, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import hetero
from distrain.comm import boundary as bd

RESULTS = REPO / "bench" / "results" / "lowrank_prototype.json"
REFRESH = 60  # forward calls between basis rebuilds: one round (15 steps x 4 micro-batches)
BF16 = 256.0


def per_token(t: torch.Tensor, levels: int = 7) -> torch.Tensor:
    """Symmetric per-token quantisation to +-levels (int4: 7) as comm/boundary.py's int4 does, values
    only (the codec packs bytes, and rounds the scales to fp16; kept fp32 here)."""
    scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    return (t / scale).round().clamp(-levels, levels) * scale


class LowRankBoundary(torch.autograd.Function):
    """Forward: U q(Uᵀδ); backward: U q(Uᵀg) — what the r int4 coordinates each way would carry."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return per_token(delta @ u) @ u.T

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (u,) = ctx.saved_tensors
        return per_token(g @ u) @ u.T, None


# -- transform coding: Fisher-weighted principal coordinates, bits allocated per message ----------------
STEP = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335, 5: 0.188, 6: 0.104, 7: 0.057, 8: 0.031}  # in sigma, Gaussian MSE
CANDIDATES = 64  # coordinates that may get bits: the basis sent once a round has this many columns
MICRO_TOKENS = 2 * 128  # tokens in one micro-batch message (batch 8 x 128, 4 micro-batches)


def allocate(sigma: torch.Tensor, bits: int, max_bits: int = 8) -> torch.Tensor:
    """Greedy reverse water-filling: each bit goes where it removes the most expected squared error
    (a bit quarters a coordinate's error). Both sides run it on the message's fp16 sigmas."""
    b = torch.zeros(sigma.shape, dtype=torch.long)
    dist = sigma.double() ** 2
    for _ in range(bits):
        i = int(torch.argmax(torch.where(b < max_bits, dist, -1.0)))
        b[i] += 1
        dist[i] /= 4
    return b


def quantise(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (..., m) -> (their reconstruction, the allocation): a uniform quantiser per
    coordinate with 2**b levels and the Gaussian-optimal step for its sigma (sent as fp16)."""
    flat = c.reshape(-1, c.shape[-1]).double()
    sigma = flat.std(0).to(torch.float16).double().clamp_min(1e-30)
    b = allocate(sigma, bits)
    step = torch.tensor([STEP.get(int(x), 1.0) for x in b], dtype=torch.float64) * sigma
    half = (2.0 ** b.double()) / 2
    q = (torch.floor(flat / step).clamp(-half, half - 1) + 0.5) * step
    return torch.where(b > 0, q, 0.0).reshape(c.shape).to(c.dtype), b


def quantise_per_token(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``quantise``, after dividing each token's coordinates by their RMS (an fp16 scale per token,
    16 of the ``bits``): a token whose values are far larger than the message's typical one (a
    high-loss token's gradient) keeps its shape instead of being clipped."""
    rms = c.double().pow(2).mean(-1, keepdim=True).sqrt().to(torch.float16).double().clamp_min(1e-30)
    q, b = quantise(c.double() / rms, bits - 16)
    return (q.double() * rms).to(c.dtype), b


class CoderState:
    """One first stage's coder: second moments gathered over a round, the basis rebuilt from them.

    M = F^(1/2), F the second moment of the boundary gradients (what the receiver would send once a
    round), weighs an error by what it does to the loss to first order; V are the principal
    directions of the centred activations in that metric (what the sender sends once a round)."""

    def __init__(self, d: int, variant: CodedVariant) -> None:
        self.d, self.calls, self.variant = d, 0, variant
        self.act = torch.zeros(d, d, dtype=torch.float64)
        self.act_sum = torch.zeros(d, dtype=torch.float64)
        self.grad = torch.zeros(d, d, dtype=torch.float64)
        self.n_act = self.n_grad = 0
        self.mu = torch.zeros(d, dtype=torch.float64)
        self.m = self.m_inv = torch.eye(d, dtype=torch.float64)
        self.v: torch.Tensor | None = None

    def observe(self, delta: torch.Tensor) -> None:
        flat = delta.detach().reshape(-1, self.d).double()
        if self.v is None or self.calls % REFRESH == 0:
            self._rebuild(flat)
        self.calls += 1
        self.act += flat.T @ flat
        self.act_sum += flat.sum(0)
        self.n_act += len(flat)

    def _rebuild(self, flat: torch.Tensor) -> None:
        if self.n_grad and self.variant.fisher:
            f = self.grad / self.n_grad
            ev, vec = torch.linalg.eigh(f / f.trace() * self.d)
            ev = ev.clamp_min(float(ev.max()) * 1e-4)
            self.m, self.m_inv = (vec * ev.sqrt()) @ vec.T, (vec / ev.sqrt()) @ vec.T
        if self.n_act:
            self.mu = self.act_sum / self.n_act
            cov = self.act / self.n_act - torch.outer(self.mu, self.mu)
        else:  # the first call: this micro-batch alone
            self.mu = flat.mean(0)
            cov = (flat - self.mu).T @ (flat - self.mu) / len(flat)
        ev, vec = torch.linalg.eigh(self.m @ cov @ self.m)
        self.v = vec[:, torch.argsort(ev, descending=True)[:CANDIDATES]].contiguous()
        self.act.zero_(); self.act_sum.zero_(); self.grad.zero_()
        self.n_act = self.n_grad = 0


class TransformCodedBoundary(torch.autograd.Function):
    """Forward: c = Vᵀ M (δ − μ) quantised with ``bits`` per token, δ^ = M⁻¹ V c^ + μ; backward: the
    gradient of the active coordinates, Vᵀ M⁻¹ g, quantised the same way, mapped back straight through."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, state: CoderState, bits: int) -> torch.Tensor:
        ctx.state, ctx.bits = state, bits
        ctx.v, ctx.m, ctx.m_inv = state.v, state.m, state.m_inv
        c = (delta.double() - state.mu) @ state.m @ state.v
        c_hat, b = state.variant.quantiser(c, bits)
        ctx.active = b > 0
        return (c_hat @ state.v.T @ state.m_inv + state.mu).to(delta.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        flat = g.detach().reshape(-1, g.shape[-1]).double()
        ctx.state.grad += flat.T @ flat
        ctx.state.n_grad += len(flat)
        gc = (g.double() @ ctx.m_inv @ ctx.v)[..., ctx.active]
        gc_hat = ctx.state.variant.quantiser(gc, ctx.bits)[0] if ctx.state.variant.backward else gc
        full = torch.zeros(*g.shape[:-1], ctx.v.shape[1], dtype=torch.float64)
        full[..., ctx.active] = gc_hat.double()
        return (full @ ctx.v.T @ ctx.m).to(g.dtype), None, None


@dataclass(frozen=True)
class CodedVariant:
    """``b112``: 112 payload bits per token and direction, Fisher-weighted, both directions coded;
    suffixes ``_nofisher`` (plain principal directions), ``_fwdonly`` (the backward left exact: a
    bound, not a format), ``_tok`` (an fp16 RMS scale per token, 16 of the bits)."""

    name: str
    bits: int
    fisher: bool = True
    backward: bool = True
    per_token: bool = False

    @staticmethod
    def parse(name: str) -> CodedVariant:
        head, *flags = name.split("_")
        unknown = set(flags) - {"nofisher", "fwdonly", "tok"}
        if not re.fullmatch(r"b\d+", head) or unknown:
            raise SystemExit(f"coded variant {name!r}: want b<bits>[_nofisher][_fwdonly][_tok]")
        return CodedVariant(name, int(head[1:]), "nofisher" not in flags, "fwdonly" not in flags, "tok" in flags)

    def quantiser(self, c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (quantise_per_token if self.per_token else quantise)(c, bits)


def patch_first_stages_coded(variant: CodedVariant) -> None:
    """Every first pipeline stage sends its output (less the token embedding) through the transform coder."""
    states: dict[int, CoderState] = {}

    def code(stage, delta: torch.Tensor) -> torch.Tensor:
        state = states.setdefault(id(stage), CoderState(delta.shape[-1], variant))
        state.observe(delta)
        return TransformCodedBoundary.apply(delta, state, variant.bits)

    patch_boundary(code)


def coded_bytes_per_token(variant: CodedVariant, tokens_per_round: int) -> float:
    """Per token, the mean of both directions: each carries the payload, the message's fp16 sigmas and
    its 40-byte frame, and once a round a matrix (forward: V's 64 columns and mu in bf16; backward: the
    symmetric M). An exact (``_fwdonly``) backward is counted as bf16."""
    d = hetero.D_MODEL
    per_message = (2 * CANDIDATES + bd.FRAME_BYTES) / MICRO_TOKENS
    forward = variant.bits / 8 + per_message + (d * CANDIDATES + d) * 2 / tokens_per_round
    backward = (variant.bits / 8 + per_message + d * (d + 1) // 2 * 2 / tokens_per_round if variant.backward
                else bd.bytes_per_token(d, "bf16") + bd.FRAME_BYTES / MICRO_TOKENS)
    return (forward + backward) / 2


def patch_boundary(send) -> None:
    """Every first pipeline stage (one that is not the whole model) sends ``e + send(stage, h − e)``
    instead of its output h, e the token embedding (which the receiver could rebuild from the ids)."""
    from distrain.model import Transformer

    original = Transformer.forward

    def forward(self, x, start_pos=0, prefixes=None):
        out = original(self, x, start_pos, prefixes)
        if not self.is_first or self.is_last:
            return out
        e = self.embed(x).detach()
        return e + send(self, out - e)

    Transformer.forward = forward


def patch_first_stages(rank: int) -> None:
    """The low-rank format: the r leading principal directions of the stage's own output, rebuilt once a round."""
    bases: dict[int, list] = {}

    def low_rank(stage, delta: torch.Tensor) -> torch.Tensor:
        state = bases.setdefault(id(stage), [None, 0])
        if state[0] is None or state[1] % REFRESH == 0:
            flat = delta.detach().reshape(-1, delta.shape[-1]).float()
            state[0] = torch.linalg.svd(flat, full_matrices=False)[2][:rank].T.contiguous()
        state[1] += 1
        return LowRankBoundary.apply(delta, state[0].to(delta.dtype))

    patch_boundary(low_rank)


@torch.no_grad()
def reconstruction_errors(run_dir: str, windows: int = 64) -> dict[str, dict[str, float]]:
    """Relative error ||x^ - h|| / ||h|| of each format on the boundary activations (after layer 2 of 4)
    of a trained run's global weights, over ``windows`` x 128 tokens of the stdlib's last 40 modules."""
    import glob
    import os
    import sysconfig

    from distrain.inference import load_model, text_ids

    loaded = load_model(run_dir, None, "cpu")
    model = loaded.model
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[-40:]
    ids: list[int] = []
    for f in files:
        ids += text_ids(loaded.tokenizer, Path(f).read_text(encoding="utf-8", errors="ignore"))
    x = torch.tensor(ids[: windows * 128]).view(windows, 128)
    e = model.embed(x)
    h = e
    cos, sin = model.rope(0, 128)
    for layer in list(model.layers.values())[: model.cfg.n_layers // 2]:
        h = layer(h, cos, sin, None)
    h, e = h.reshape(-1, h.shape[-1]), e.reshape(-1, e.shape[-1])
    delta = h - e
    basis = torch.linalg.svd(delta, full_matrices=False)[2]  # the activations' own best basis (an oracle)

    def rel(approx: torch.Tensor) -> float:
        return float((approx - h).norm() / h.norm())

    out = {"int8 per token": {"bytes_per_token": 130.0, "error": rel(per_token(h, 127))},
           "int4 per token": {"bytes_per_token": 66.0, "error": rel(per_token(h))}}
    for r in (16, 26, 28, 32, 64):
        u = basis[:r].T
        out[f"rank {r}, fp32"] = {"bytes_per_token": 4.0 * r, "error": rel(e + delta @ u @ u.T)}
        out[f"rank {r}, int4"] = {"bytes_per_token": r / 2 + 2, "error": rel(e + per_token(delta @ u) @ u.T)}
    return {"run": run_dir, "embedding_share": float(e.norm() / h.norm()), "formats": out}


def bytes_per_token(rank: int, tokens_per_round: int) -> float:
    """The codec's int4 bytes for r coordinates, plus the bf16 basis (d x r) sent once a round."""
    return bd.bytes_per_token(rank, "int4") + hetero.D_MODEL * rank * 2 / tokens_per_round


def run(name: str, seed: int, steps: int, out: str) -> dict:
    """One simulation in this process (a fresh worker process per job)."""
    run_ = "two_full" if name == "two_full" else "selective_uncompressed"
    if name.startswith("lowrank"):
        patch_first_stages(int(name.split("r")[-1]))
    elif name.startswith("coded_"):
        patch_first_stages_coded(CodedVariant.parse(name.removeprefix("coded_")))
    row = hetero.simulate(Path(out), run_, 0, seed, steps, ["--topology.straggler_policy=wait", f"--run.name={name}_s{seed}"])
    return {"name": name, "seed": seed, **row}


def run_all(names: list[str], seeds: list[int], steps: int, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every (name, seed) in a fresh worker process (a patch must not leak into the next run)."""
    jobs = [(n, s, steps, args.out) for n in names for s in seeds]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        rows = list(pool.map(run, *zip(*jobs)))
    return {n: [r for r in rows if r["name"] == n] for n in names}


def coded(args: argparse.Namespace, steps: int, seeds: list[int]) -> int:
    """The transform-coded boundary beside both references, run again in this command."""
    variants = [CodedVariant.parse(v) for v in args.coded]
    names = ["two_full", "bf16"] + [f"coded_{v.name}" for v in variants]
    by = run_all(names, seeds, steps, args)
    loss = {n: [r["final_val_loss"] for r in by[n]] for n in names}
    tokens_per_round = 15 * 8 * 128
    out = {"runs": {n: {"final_val_loss": loss[n], "sim_wallclock_s": [r["sim_wallclock_s"] for r in by[n]]}
                    for n in names}, "contribution": {}}
    for n, v in zip(names[2:], variants):
        per_seed = [hetero.contribution(t, x, u) for t, x, u in zip(loss["two_full"], loss[n], loss["bf16"])]
        b = coded_bytes_per_token(v, tokens_per_round)
        out["contribution"][n] = {"per_seed": per_seed, "mean": statistics.mean(per_seed),
                                  "std": statistics.pstdev(per_seed), "bytes_per_token": b, "below_bf16": BF16 / b}
    out["machine"], out["command"] = machine(), command("bench/lowrank_prototype.py")
    print(json.dumps(out, indent=1))
    if not args.quick:
        res = json.loads(RESULTS.read_text())
        res[args.key] = out
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="/tmp/distrain_lowrank_prototype")
    p.add_argument("--errors", metavar="RUN_DIR", help="only the reconstruction errors on RUN_DIR's global weights "
                   "(e.g. a finished `distrain simulate`), added to the results file")
    p.add_argument("--coded", nargs="+", metavar="VARIANT",
                   help="the transform-coded boundary, e.g. b112 (payload bits per token and direction) or "
                   "b112_fwdonly, with both references run again (CodedVariant)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--key", default="transform_coded", help="where --coded's rows go in the results file")
    args = p.parse_args()
    if args.errors:
        res = json.loads(RESULTS.read_text())
        res["reconstruction"] = reconstruction_errors(args.errors)
        res["reconstruction"]["command"] = command("bench/lowrank_prototype.py")
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["reconstruction"], indent=1))
        return 0
    steps, seeds = (60, [0]) if args.quick else (300, args.seeds)
    if args.coded:
        return coded(args, steps, seeds)
    names = ["two_full", "bf16", "lowrank_r26", "lowrank_r16"]
    by = run_all(names, seeds, steps, args)
    loss = {n: [r["final_val_loss"] for r in by[n]] for n in names}
    tokens_per_round = 15 * 8 * 128
    kept = {k: v for k, v in json.loads(RESULTS.read_text()).items() if k in ("reconstruction", "transform_coded",
                                                                              "transform_coded_ablation")}
    res = {**kept, "setting": "bench/hetero.py's, 300 steps, straggler_policy wait, this commit", "seeds": seeds,
           "steps": steps, "runs": {n: {"final_val_loss": loss[n], "sim_wallclock_s": [r["sim_wallclock_s"] for r in by[n]]}
                                    for n in names}, "contribution": {}}
    for n in names[2:]:
        rank = int(n.split("r")[-1])
        per_seed = [hetero.contribution(t, x, u) for t, x, u in zip(loss["two_full"], loss[n], loss["bf16"])]
        b = bytes_per_token(rank, tokens_per_round)
        res["contribution"][n] = {"per_seed": per_seed, "mean": statistics.mean(per_seed),
                                  "std": statistics.pstdev(per_seed), "bytes_per_token": b, "below_bf16": BF16 / b}
    res["machine"], res["command"] = machine(), command("bench/lowrank_prototype.py")
    print(json.dumps(res["contribution"], indent=1))
    if not args.quick:
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
