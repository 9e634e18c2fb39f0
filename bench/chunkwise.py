"""Benchmark chunk-wise optimisation (SeCO / SpaCO) against full back-propagation and per-layer
activation checkpointing: peak memory and time per step over sequence lengths, plus a short
training comparison of exact vs sparse gradients.

Peak memory: every (method, length) runs in a fresh subprocess; the figure is the process's
resident-set high-water mark (getrusage ru_maxrss) minus its resident set just before the step,
with the model and its .grad already allocated — i.e. activations, caches and temporaries.
(tracemalloc does not see torch's CPU allocations.)
Time: the cores of the machine this was written on are shared with other jobs (load average 5-10
on 2 cores), where multi-threaded wall time varied 2-3x between identical steps. So by default each
worker runs torch single-threaded and `step_s` is the process CPU time (user + sys) of one step,
the fastest of --reps: on an idle core that equals wall time. `wall_s` is recorded too.

    python bench/chunkwise.py                      # the recorded run (9 min wall at load ~9 on 2 cores)
    python bench/chunkwise.py --lengths 1024,2048 --reps 1 --train-steps 50 --no-write   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import command, machine
from torch.utils.checkpoint import checkpoint

from distrain.config import ChunkwiseConfig, ModelConfig
from distrain.model import Transformer, cross_entropy
from distrain.parallel.chunkwise import chunkwise_backward

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "checkpoint", "seco", "spaco")


# ---------------------------------------------------------------------------------------------
# one measurement (runs in its own process)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model(spec: dict, seq_len: int) -> Transformer:
    cfg = ModelConfig(vocab_size=spec["vocab"], dim=spec["dim"], n_layers=spec["layers"], n_heads=spec["heads"],
                      n_kv_heads=spec["kv_heads"], max_seq_len=seq_len)
    return Transformer(cfg)


def _step(method: str, model: Transformer, x: torch.Tensor, y: torch.Tensor, chunks: int, rep: int) -> int:
    """One forward+backward; returns how many chunks were back-propagated (1 for whole-sequence)."""
    T = x.shape[1]
    if method == "full":
        cross_entropy(model(x), y).backward()
        return 1
    if method == "checkpoint":
        h = model.embed(x)
        cos, sin = model.rope(0, T)
        for layer in model.layers.values():
            h = checkpoint(layer, h, cos, sin, use_reentrant=False)
        cross_entropy(model.head(h), y).backward()
        return 1
    if method == "seco":
        return len(chunkwise_backward(model, x, y, ChunkwiseConfig(mode="seco", chunk_len=T // chunks)).chunks)
    if method == "spaco":
        cfg = ChunkwiseConfig(mode="spaco", chunk_len=T // chunks, sparse_chunks=max(1, chunks // 4))
        # "uniform" (exactly t chunks) for a steady per-step cost; both samplings back-propagate each
        # chunk with probability t/n, so their expected cost is the same.
        res = chunkwise_backward(model, x, y, cfg, generator=torch.Generator().manual_seed(rep), sampling="uniform")
        return len(res.chunks)
    raise ValueError(f"unknown method {method!r}")


def measure(method: str, seq_len: int, reps: int, chunks: int, spec: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(spec, seq_len)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, spec["vocab"], (1, seq_len), generator=g)
    y = torch.randint(0, spec["vocab"], (1, seq_len), generator=g)
    warm = max(chunks, seq_len // 8)  # a short step first, so one-time library set-up is not timed
    _step(method, model, x[:, :warm], y[:, :warm], chunks, 0)
    base = _rss_mb()
    cpu, wall, n_bp = [], [], 0
    for rep in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        n_bp = _step(method, model, x, y, chunks, rep)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"peak_mem_mb": round(max(_maxrss_mb() - base, 0.0), 1), "step_s": round(min(cpu), 3),
            "wall_s": round(min(wall), 3), "step_s_all": [round(t, 3) for t in cpu], "backprop_chunks": n_bp}


def measure_in_subprocess(method: str, seq_len: int, reps: int, chunks: int, spec: dict, threads: int) -> dict:
    job = json.dumps(dict(method=method, seq_len=seq_len, reps=reps, chunks=chunks, spec=spec, threads=threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True, text=True, cwd=ROOT,
                         timeout=1800, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} at {seq_len} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# training comparison: exact vs sparse gradients on a task that needs cross-chunk attention


def periodic_batch(g: torch.Generator, batch: int, seq_len: int, period: int, vocab: int):
    """A random segment of `period` tokens repeated: after the first period every token is the one
    `period` positions back, so the model must attend across chunk boundaries (period > chunk)."""
    seg = torch.randint(0, vocab, (batch, period), generator=g)
    seq = seg.repeat(1, math.ceil((seq_len + 1) / period))[:, : seq_len + 1]
    return seq[:, :-1], seq[:, 1:]


def _eval(model: Transformer, spec: dict) -> tuple[float, float]:
    """(mean loss, mean loss after the first period) on a fixed held-out batch."""
    x, y = periodic_batch(torch.Generator().manual_seed(10_000), 32, spec["seq_len"], spec["period"], spec["vocab"])
    with torch.no_grad():
        logits = model(x)
        per_tok = F.cross_entropy(logits.reshape(-1, spec["vocab"]), y.reshape(-1), reduction="none").view(y.shape)
    return per_tok.mean().item(), per_tok[:, spec["period"]:].mean().item()


def train(variant: dict, steps: int, spec: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    T, c, period, vocab = spec["seq_len"], spec["chunk_len"], spec["period"], spec["vocab"]
    model = Transformer(ModelConfig(vocab_size=vocab, dim=spec["dim"], n_layers=spec["layers"], n_heads=spec["heads"],
                                    n_kv_heads=spec["kv_heads"], max_seq_len=T))
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    cfg = ChunkwiseConfig(mode=variant["mode"], chunk_len=c, sparse_chunks=variant.get("t", 0), cap=variant.get("cap", 0.0))
    data_g, chunk_g = torch.Generator().manual_seed(1000 * seed + 1), torch.Generator().manual_seed(1000 * seed + 2)
    cpu, curve, evals = 0.0, [], {}
    for step in range(1, steps + 1):
        x, y = periodic_batch(data_g, spec["batch"], T, period, vocab)
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        res = chunkwise_backward(model, x, y, cfg, generator=chunk_g, sampling=variant.get("sampling"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        cpu += time.process_time() - c0
        curve.append(res.loss)
        if step % spec["eval_every"] == 0 or step == steps:
            evals[step] = round(_eval(model, spec)[1], 4)
    loss, after = _eval(model, spec)
    tail = curve[-max(1, steps // 10):]
    return {"eval_loss": round(loss, 4), "eval_loss_after_first_period": round(after, 4),
            "eval_after_first_period_by_step": evals, "train_loss_last10pct": round(sum(tail) / len(tail), 4),
            "train_cpu_s": round(cpu, 1), "tokens": steps * spec["batch"] * T}


def summarise(per_seed: list[dict]) -> dict:
    """Mean over seeds, plus each seed's final loss after the first period."""
    mean = lambda key: round(sum(r[key] for r in per_seed) / len(per_seed), 4)
    steps = per_seed[0]["eval_after_first_period_by_step"]
    return {"eval_loss": mean("eval_loss"), "eval_loss_after_first_period": mean("eval_loss_after_first_period"),
            "eval_after_first_period_by_step": {k: round(sum(r["eval_after_first_period_by_step"][k] for r in per_seed)
                                                        / len(per_seed), 4) for k in steps},
            "per_seed_after_first_period": [r["eval_loss_after_first_period"] for r in per_seed],
            "train_loss_last10pct": mean("train_loss_last10pct"), "train_cpu_s": mean("train_cpu_s"),
            "tokens": per_seed[0]["tokens"]}


# ---------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "### Chunk-wise optimisation (SeCO / SpaCO)",
        "",
        f"Model: dim {s['model']['dim']}, {s['model']['layers']} layers, {s['model']['heads']} heads "
        f"({s['model']['kv_heads']} K/V heads), vocab {s['model']['vocab']}; batch 1; {s['chunks']} chunks per "
        f"sequence (chunk length = tokens/{s['chunks']}); SpaCO t = {max(1, s['chunks'] // 4)} (n/4). "
        f"Peak memory = RSS high-water mark minus RSS before the step (fresh process per cell; model and "
        f"grads excluded). Time = CPU seconds of one step with {s['threads']} torch thread(s), fastest of "
        f"{s['reps']}, on {result['machine']}; the cores were shared with other jobs, so read ratios "
        "within a row (wall times are in the JSON).",
        "",
        "| tokens | full MB | ckpt MB | SeCO MB | SpaCO MB | full s | ckpt s | SeCO s | SpaCO s | SeCO/full mem | SeCO/full time | SeCO/SpaCO time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for T, row in result["lengths"].items():
        f, k, se, sp = (row.get(m) for m in METHODS)
        mem = lambda m: f"{m['peak_mem_mb']:.0f}" if m else "–"
        sec = lambda m: f"{m['step_s']:.2f}" if m else "–"
        ratio = lambda a, b, key: f"{a[key] / b[key]:.2f}" if a and b and b[key] > 0 else "–"
        lines.append(f"| {T} | {mem(f)} | {mem(k)} | {mem(se)} | {mem(sp)} | {sec(f)} | {sec(k)} | {sec(se)} | "
                     f"{sec(sp)} | {ratio(se, f, 'peak_mem_mb')} | {ratio(se, f, 'step_s')} | {ratio(se, sp, 'step_s')} |")
    if result.get("targets"):
        lines += ["", "Targets at the longest length: " + "; ".join(
            f"{k}: {'met' if v['met'] else 'NOT met'} ({v['value']:.2f} vs {v['target']})" for k, v in result["targets"].items())]
    if result.get("training"):
        tr = result["training"]
        ts = tr["settings"]
        lines += ["", f"Training comparison (mean of {ts['seeds']} seeds; same tokens: {ts['steps']} steps × {ts['batch']} × {ts['seq_len']}; "
                  f"periodic task, period {ts['period']} > chunk {ts['chunk_len']}, {ts['seq_len'] // ts['chunk_len']} chunks; "
                  f"model dim {ts['dim']}, {ts['layers']} layers; AdamW lr {ts['lr']}). "
                  "Loss after the first period is the learnable part (0 is perfect, ln V = "
                  f"{math.log(ts['vocab']):.2f} is chance).", "",
                  "| variant | eval loss | eval loss after 1st period (per seed) | same, at steps " + ", ".join(
                      str(k) for k in next(iter(tr["runs"].values()))["eval_after_first_period_by_step"]) +
                  " | train loss (last 10%) | train CPU s |",
                  "|---|---:|---:|---|---:|---:|"]
        for name, r in tr["runs"].items():
            by_step = " / ".join(f"{v:.3f}" for v in r["eval_after_first_period_by_step"].values())
            seeds = ", ".join(f"{v:.3f}" for v in r["per_seed_after_first_period"])
            lines.append(f"| {name} | {r['eval_loss']:.3f} | {r['eval_loss_after_first_period']:.3f} ({seeds}) | "
                         f"{by_step} | {r['train_loss_last10pct']:.3f} | {r['train_cpu_s']:.0f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def targets(lengths: dict) -> dict:
    T = max(lengths, key=int)
    row = lengths[T]
    if not all(m in row for m in ("full", "seco", "spaco")):
        return {}
    mem = row["seco"]["peak_mem_mb"] / row["full"]["peak_mem_mb"]
    slow = row["seco"]["step_s"] / row["full"]["step_s"]
    speed = row["seco"]["step_s"] / row["spaco"]["step_s"]
    return {
        f"SeCO peak memory / full at {T}": {"value": mem, "target": "<= 0.25", "met": mem <= 0.25},
        f"SeCO time / full at {T}": {"value": slow, "target": "<= 1.5", "met": slow <= 1.5},
        f"SeCO time / SpaCO time at {T}": {"value": speed, "target": ">= 2", "met": speed >= 2},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=1, help="timed steps per cell (fastest is reported)")
    ap.add_argument("--chunks", type=int, default=16, help="chunks per sequence for SeCO/SpaCO")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement (see module doc)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=300, help="0 skips the training comparison")
    ap.add_argument("--train-seeds", type=int, default=2, help="training runs per variant (means are reported)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/chunkwise.json"))
    ap.add_argument("--md", default="/tmp/chunkwise_benchmarks.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["method"], job["seq_len"], job["reps"], job["chunks"], job["spec"], job["threads"])))
        return

    torch.set_num_threads(args.threads)  # the training comparison runs in this process
    spec = dict(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    lengths: dict[str, dict] = {}
    for T in (int(v) for v in args.lengths.split(",")):
        if T % args.chunks:
            ap.error(f"length {T} is not a multiple of --chunks {args.chunks}")
        lengths[str(T)] = {}
        for m in methods:
            r = measure_in_subprocess(m, T, args.reps, args.chunks, spec, args.threads)
            lengths[str(T)][m] = r
            print(f"{T:>6} {m:<10} peak {r['peak_mem_mb']:8.1f} MB  step {r['step_s']:7.2f} s cpu "
                  f"({r['wall_s']:.2f} s wall)  {r['step_s_all']}", flush=True)

    training = {}
    if args.train_steps > 0:
        tspec = dict(seq_len=256, chunk_len=32, period=40, vocab=64, dim=64, layers=2, heads=4, kv_heads=2,
                     batch=8, lr=3e-3, steps=args.train_steps, eval_every=max(1, args.train_steps // 4))
        n = tspec["seq_len"] // tspec["chunk_len"]
        variants = {
            "full backprop (mode off)": dict(mode="off"),
            "SeCO (exact)": dict(mode="seco"),
            f"SpaCO t={n // 4}/{n} bernoulli": dict(mode="spaco", t=n // 4),
            f"SpaCO t={n // 4}/{n} uniform": dict(mode="spaco", t=n // 4, sampling="uniform"),
            f"SpaCO t={n // 4}/{n} bernoulli cap 2": dict(mode="spaco", t=n // 4, cap=2.0),
        }
        runs = {}
        for name, v in variants.items():
            per_seed = [train(v, args.train_steps, tspec, seed) for seed in range(args.train_seeds)]
            runs[name] = summarise(per_seed)
            print(f"train {name:<32} {runs[name]}", flush=True)
        training = {"settings": dict(tspec, seeds=args.train_seeds), "runs": runs}

    cmd = command("bench/chunkwise.py", argv)
    result = {
        "lengths": lengths,
        "training": training,
        "machine": f"{machine()}, load average {os.getloadavg()[0]:.1f} at the end",
        "command": cmd,
        "settings": {"model": spec, "chunks": args.chunks, "reps": args.reps, "threads": args.threads,
                     "step_s": "process CPU time (user+sys) of one step, fastest of reps; wall_s: wall time",
                     "memory": "ru_maxrss high-water mark minus RSS before the step, fresh process per cell",
                     "spaco_sampling_for_timing": "uniform (exactly t chunks)"},
        "targets": targets(lengths),
    }
    md = markdown(result)
    print(md)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
