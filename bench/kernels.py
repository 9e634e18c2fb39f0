"""SparseLoCo encode and decode-aggregate: PyTorch reference vs C++ kernels (and CUDA on a GPU).

    python bench/kernels.py [--params 1e7] [--replicas 8] [--repeats 5] [--markdown FILE]

Times are wall-clock seconds per 1e8 parameters, measured on a model-like set of tensors of about
``--params`` parameters in total and scaled linearly (both passes are linear in the parameter
count). Reference and kernel runs alternate and the median of ``--repeats`` is reported, because
the machine may be shared. Every kernel result is checked bit for bit against the reference.
GPU figures appear only when run on a machine with CUDA and the CUDA library; otherwise
``"gpu": null``. Writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from common import command, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comm import kernels  # noqa: E402
from comm.codecs.sparseloco import SparseLoCoCodec, encode_, sparseloco_encode_  # noqa: E402
from comm.kernels import build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
# distrain's defaults (distrain/config.py OuterConfig); --index-coding / --quantizer override.
CODEC = dict(topk=64, chunk=64, beta=0.95, quantizer="reference", aggregation="mean_selected",
             value_dtype="fp16", index_coding="gaps")


def model_shapes(params: float) -> list[tuple[int, ...]]:
    """LLaMA-like block tensors (attention, MLP, norms) of width d, repeated to ~``params``."""
    d = 1024
    block = [(d, d)] * 4 + [(4 * d // 3 // 64 * 64 + 64, d)] * 2 + [(d, 4 * d // 3 // 64 * 64 + 64)] + [(d,)] * 2
    per_block = sum(int(np.prod(s)) for s in block)
    return block * max(1, round(params / per_block))


def timed(fn: Callable[[], object], sync: bool = False) -> float:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def same(a, b) -> bool:
    return a.meta == b.meta and all(np.array_equal(a.buffers[k].view(np.uint8), b.buffers[k].view(np.uint8))
                                    for k in a.buffers)


def bench_encode(shapes, repeats: int, device: str, kernel_name: str) -> dict[str, float]:
    """Median seconds for one encode of every tensor: reference vs kernel, alternating."""
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(s, generator=gen).to(device) for s in shapes]
    efs = [(0.1 * torch.randn(s, generator=gen)).to(device) for s in shapes]
    enc = {k: v for k, v in CODEC.items() if k != "aggregation"}
    sync = device != "cpu"
    ref_t, ker_t = [], []
    for rep in range(repeats + 1):  # first round: warm-up (library load, allocator), not timed
        ef_ref = [e.clone() for e in efs]
        ef_ker = [e.clone() for e in efs]
        out_ref, out_ker = [], []
        t_ref = timed(lambda: out_ref.extend(sparseloco_encode_(e, d, **enc)
                                             for e, d in zip(ef_ref, deltas)), sync)
        t_ker = timed(lambda: out_ker.extend(encode_(e, d, **enc)
                                             for e, d in zip(ef_ker, deltas)), sync)
        if rep == 0:
            assert kernels.backend(device) == kernel_name, kernels.status()
            assert all(same(a, b) for a, b in zip(out_ref, out_ker)), "kernel != reference"
            assert all(torch.equal(a, b) for a, b in zip(ef_ref, ef_ker)), "EF differs"
            continue
        ref_t.append(t_ref)
        ker_t.append(t_ker)
    return {"reference_s": statistics.median(ref_t), "kernel_s": statistics.median(ker_t)}


def bench_decode(shapes, replicas: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds to aggregate ``replicas`` contributions of every tensor."""
    codec = SparseLoCoCodec(**CODEC)
    gen = torch.Generator().manual_seed(1)
    parts = [[codec.encode("w", torch.randn(s, generator=gen), {}) for _ in range(replicas)]
             for s in shapes]
    sync = device != "cpu"
    dev = None if device == "cpu" else device
    ref_t, ker_t = [], []
    for rep in range(repeats + 1):
        out_ref, out_ker = [], []
        with kernels.forced_mode("reference"):  # in case the codec itself dispatches to kernels
            t_ref = timed(lambda: out_ref.extend(codec.decode_aggregate(p, s).to(device)
                                                 for p, s in zip(parts, shapes)), sync)
        kernels.backend(device)  # reload the library outside the timed region
        t_ker = timed(lambda: out_ker.extend(codec.decode_aggregate(p, s, device=dev)
                                             for p, s in zip(parts, shapes)), sync)
        if rep == 0:
            assert all(torch.equal(a, b) for a, b in zip(out_ref, out_ker)), "kernel != reference"
            continue
        ref_t.append(t_ref)
        ker_t.append(t_ker)
    return {"reference_s": statistics.median(ref_t), "kernel_s": statistics.median(ker_t)}


def per_1e8(res: dict[str, float], n: int, key: str) -> dict[str, float]:
    scale = 1e8 / n
    return {"reference_s_per_1e8": round(res["reference_s"] * scale, 4),
            f"{key}_s_per_1e8": round(res["kernel_s"] * scale, 4)}


def markdown(result: dict) -> str:
    lines = [
        "## Compression kernels (SparseLoCo encode / decode-aggregate)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; 1-minute load average {result['load_average'][0]} before, "
        f"{result['load_average'][1]} after (other jobs share the cores: absolute times are "
        "inflated, the interleaved ratios less so)  ",
        f"Workload: {result['params']:,} parameters in {result['tensors']} LLaMA-like tensors "
        f"(topk 64 per 4096, 64×64 blocks, {CODEC['quantizer']} 2-bit quantizer, "
        f"{CODEC['index_coding']} index coding); "
        f"decode-aggregate over {result['replicas']} replicas, mean over selecting replicas. "
        f"Median of {result['repeats']} interleaved runs, scaled to seconds per 10^8 parameters; "
        "every kernel output checked bit for bit against the PyTorch reference.",
        "",
        "| device | operation | PyTorch reference (s / 1e8) | kernel (s / 1e8) | speed-up |",
        "|---|---|---|---|---|",
    ]
    for dev_key, kern in (("cpu", "cpp"), ("gpu", "cuda")):
        block = result.get(dev_key)
        if not block:
            continue
        for op in ("encode", "decode_aggregate"):
            r = block[op]
            ref, k = r["reference_s_per_1e8"], r[f"{kern}_s_per_1e8"]
            lines.append(f"| {dev_key} ({kern}) | {op} | {ref:.3f} | {k:.3f} | {ref / k:.1f}× |")
    if result.get("gpu") is None:
        lines += ["", "GPU: not measured (no CUDA device on the benchmark machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=1e7, help="parameters measured (scaled to 1e8)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown section here")
    p.add_argument("--index-coding", choices=("gaps", "packed"), default=CODEC["index_coding"])
    p.add_argument("--quantizer", choices=("reference", "symmetric", "none"), default=CODEC["quantizer"])
    args = p.parse_args(argv)
    CODEC.update(index_coding=args.index_coding, quantizer=args.quantizer)

    build.build_cpu()  # no-op when current
    kernels.set_mode("auto")
    shapes = model_shapes(args.params)
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"{n:,} parameters in {len(shapes)} tensors, {args.replicas} replicas, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads", flush=True)

    result: dict = {"cpu": None, "gpu": None}
    load_before = os.getloadavg()[0]
    enc = bench_encode(shapes, args.repeats, "cpu", "cpp")
    dec = bench_decode(shapes, args.replicas, args.repeats, "cpu")
    result["cpu"] = {"encode": per_1e8(enc, n, "cpp"), "decode_aggregate": per_1e8(dec, n, "cpp")}
    if torch.cuda.is_available() and build.nvcc_compiler() is not None:
        build.build_cuda()
        kernels.set_mode("auto")
        if kernels.backend("cuda") == "cuda":
            enc = bench_encode(shapes, args.repeats, "cuda", "cuda")
            dec = bench_decode(shapes, args.replicas, args.repeats, "cuda")
            result["gpu"] = {"encode": per_1e8(enc, n, "cuda"),
                             "decode_aggregate": per_1e8(dec, n, "cuda")}
    result.update(machine=machine(), command=command("bench/kernels.py", argv),
                  params=n, tensors=len(shapes), replicas=args.replicas, repeats=args.repeats,
                  load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                  codec=dict(CODEC))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    print(md)
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
