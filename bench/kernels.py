"""SparseLoCo encode and decode-aggregate: PyTorch reference vs C++ kernels (and CUDA on a GPU).

    python bench/kernels.py [--params 1e7] [--replicas 8] [--repeats 5] [--device cpu|cuda|all]
                            [--wait-idle 600] [--allow-noisy] [--out FILE] [--markdown FILE]

Times are wall-clock seconds per 1e8 parameters, measured on a model-like set of tensors of about
``--params`` parameters in total and scaled linearly (both passes are linear in the parameter
count). Reference and kernel runs alternate and the median of ``--repeats`` is reported. Every
kernel result is checked bit for bit against the reference.

Knowing the limit: the same process measures the device's copy bandwidth (``copy_`` of a 256 MiB
fp32 tensor, read + write bytes over time) and reports each kernel's effective bandwidth, the
bytes it must touch over its time: encode reads the pseudo-gradient and the error buffer and
writes the error buffer (12 bytes per parameter); decode-aggregate reads every replica's payload
and writes the fp32 aggregate. The load average is recorded before and after; a run where it
exceeds the core count is refused (exit 2), or written with ``"noisy": true`` under
``--allow-noisy``. ``--wait-idle S`` first waits up to S seconds for the load to fall below the
core count. The reference decode-aggregate is timed on validated contributions, as a receiver
runs it (it then reuses the indices its validation decoded), which is the faster reference.
Writes bench/results/kernels.json (GPU figures only where a CUDA device and library exist).
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

from distrain.comm import kernels  # noqa: E402
from distrain.comm.codecs.base import EncodedTensor  # noqa: E402
from distrain.comm.codecs.sparseloco import SparseLoCoCodec, encode_, sparseloco_encode_  # noqa: E402
from distrain.comm.kernels import build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
# distrain's defaults (distrain/config.py OuterConfig); --index-coding / --quantizer override.
CODEC = dict(topk=64, chunk=64, beta=0.95, quantizer="reference", aggregation="mean_selected",
             value_dtype="fp16", index_coding="gaps")
ENCODE_BYTES_PER_PARAM = 12  # read delta, read ef, write ef (fp32)
COPY_BYTES = 256 * 2**20


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


def copy_gbps(device: str, repeats: int = 7) -> float:
    """Read + write bytes per second of ``dst.copy_(src)`` over 256 MiB fp32 tensors (median)."""
    src = torch.randn(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    sync = device != "cpu"
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), sync) for _ in range(repeats)]
    return 2 * COPY_BYTES / statistics.median(times) / 1e9


def same(a: EncodedTensor, b: EncodedTensor) -> bool:
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
    n = sum(int(np.prod(s)) for s in shapes)
    return {"reference_s": statistics.median(ref_t), "kernel_s": statistics.median(ker_t),
            "bytes": ENCODE_BYTES_PER_PARAM * n}


def bench_decode(shapes, replicas: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds to aggregate ``replicas`` validated contributions of every tensor."""
    codec = SparseLoCoCodec(**CODEC)
    gen = torch.Generator().manual_seed(1)
    parts = [[codec.encode("w", torch.randn(s, generator=gen), {}) for _ in range(replicas)]
             for s in shapes]
    for p in parts:  # as decode_frame does on receipt
        for et in p:
            codec.validate(et)
    sync = device != "cpu"
    dev = None if device == "cpu" else device
    ref_t, ker_t = [], []
    for rep in range(repeats + 1):
        out_ref, out_ker = [], []
        with kernels.forced_mode("reference"):
            t_ref = timed(lambda: out_ref.extend(codec.decode_aggregate(p, s, device=dev)
                                                 for p, s in zip(parts, shapes)), sync)
        kernels.backend(device)  # reload the library outside the timed region
        t_ker = timed(lambda: out_ker.extend(codec.decode_aggregate(p, s, device=dev)
                                             for p, s in zip(parts, shapes)), sync)
        if rep == 0:
            assert all(torch.equal(a, b) for a, b in zip(out_ref, out_ker)), "kernel != reference"
            continue
        ref_t.append(t_ref)
        ker_t.append(t_ker)
    payload = sum(et.nbytes() for p in parts for et in p)
    n = sum(int(np.prod(s)) for s in shapes)
    return {"reference_s": statistics.median(ref_t), "kernel_s": statistics.median(ker_t),
            "bytes": payload + 4 * n}


def summary(res: dict[str, float], n: int, key: str, copy: float) -> dict[str, float]:
    scale = 1e8 / n
    gbps = res["bytes"] / res["kernel_s"] / 1e9
    return {"reference_s_per_1e8": round(res["reference_s"] * scale, 4),
            f"{key}_s_per_1e8": round(res["kernel_s"] * scale, 4),
            "speedup": round(res["reference_s"] / res["kernel_s"], 2),
            "bytes_per_param": round(res["bytes"] / n, 3),
            f"{key}_gbps": round(gbps, 2),
            "fraction_of_copy": round(gbps / copy, 3)}


def markdown(result: dict) -> str:
    la = result["load_average"]
    state = ("**noisy**: the load exceeded the core count, so these times include contention"
             if result["noisy"] else "idle (load below the core count)")
    lines = [
        "## Compression kernels (SparseLoCo encode / decode-aggregate)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; 1-minute load average {la[0]} before, {la[1]} after: "
        f"{state}  ",
        f"Workload: {result['params']:,} parameters in {result['tensors']} LLaMA-like tensors "
        f"(topk 64 per 4096, 64×64 blocks, {result['codec']['quantizer']} 2-bit quantizer, "
        f"{result['codec']['index_coding']} index coding); "
        f"decode-aggregate over {result['replicas']} validated replicas, mean over selecting "
        f"replicas. Median of {result['repeats']} interleaved runs, scaled to seconds per 10^8 "
        "parameters; every kernel output checked bit for bit against the PyTorch reference. "
        "GB/s = bytes the operation must touch (encode: 12 per parameter; decode: payloads + "
        "fp32 output) over its time; copy = `copy_` of 256 MiB in the same process.",
        "",
        "| device | operation | PyTorch reference (s / 1e8) | kernel (s / 1e8) | speed-up | "
        "kernel GB/s | % of copy |",
        "|---|---|---|---|---|---|---|",
    ]
    for dev_key, kern in (("cpu", "cpp"), ("gpu", "cuda")):
        block = result.get(dev_key)
        if not block:
            continue
        for op in ("encode", "decode_aggregate"):
            r = block[op]
            lines.append(f"| {dev_key} ({kern}, copy {block['copy_gbps']:.1f} GB/s) | {op} | "
                         f"{r['reference_s_per_1e8']:.3f} | {r[f'{kern}_s_per_1e8']:.3f} | "
                         f"{r['speedup']:.1f}× | {r[f'{kern}_gbps']:.1f} | "
                         f"{100 * r['fraction_of_copy']:.0f} % |")
    if result.get("gpu") is None:
        lines += ["", "GPU: not measured (no CUDA device on the benchmark machine)."]
    return "\n".join(lines) + "\n"


def wait_idle(limit_s: float) -> None:
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] > cores and time.monotonic() < deadline:
        print(f"load {os.getloadavg()[0]:.2f} > {cores} cores: waiting", flush=True)
        time.sleep(30)


def run_device(shapes, args, device: str, kern: str) -> dict:
    n = sum(int(np.prod(s)) for s in shapes)
    copy = copy_gbps(device)
    enc = bench_encode(shapes, args.repeats, device, kern)
    dec = bench_decode(shapes, args.replicas, args.repeats, device)
    return {"copy_gbps": round(copy, 2), "encode": summary(enc, n, kern, copy),
            "decode_aggregate": summary(dec, n, kern, copy)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=1e7, help="parameters measured (scaled to 1e8)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="all: the CPU, and the GPU when one is available")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown section here")
    p.add_argument("--index-coding", choices=("gaps", "packed"), default=CODEC["index_coding"])
    p.add_argument("--quantizer", choices=("reference", "symmetric", "none"), default=CODEC["quantizer"])
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for the load average to fall below the core count")
    p.add_argument("--allow-noisy", action="store_true",
                   help="write results taken above the core count, marked \"noisy\": true")
    args = p.parse_args(argv)
    CODEC.update(index_coding=args.index_coding, quantizer=args.quantizer)

    cores = os.cpu_count() or 1
    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
    shapes = model_shapes(args.params)
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"{n:,} parameters in {len(shapes)} tensors, {args.replicas} replicas, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads", flush=True)

    result: dict = {"cpu": None, "gpu": None}
    load_before = os.getloadavg()[0]
    if args.device in ("cpu", "all"):
        build.build_cpu()  # no-op when current
        kernels.set_mode("auto")
        result["cpu"] = run_device(shapes, args, "cpu", "cpp")
    if args.device in ("cuda", "all") and torch.cuda.is_available() and build.nvcc_compiler():
        build.build_cuda()
        kernels.set_mode("auto")
        if kernels.backend("cuda") == "cuda":
            result["gpu"] = run_device(shapes, args, "cuda", "cuda")
    elif args.device == "cuda":
        print("no CUDA device (or no nvcc): nothing measured", file=sys.stderr)
        return 1
    load_after = os.getloadavg()[0]
    noisy = max(load_before, load_after) > cores
    result.update(machine=machine(), command=command("bench/kernels.py", argv),
                  params=n, tensors=len(shapes), replicas=args.replicas, repeats=args.repeats,
                  load_average=[round(load_before, 2), round(load_after, 2)], cores=cores,
                  noisy=noisy, codec=dict(CODEC))
    # Top-level copy bandwidth of the CPU run (the GPU block carries its own).
    result["copy_gbps"] = (result["cpu"] or result["gpu"] or {}).get("copy_gbps")
    md = markdown(result)
    print(md)
    if noisy and not args.allow_noisy:
        print(f"refusing to write {args.out}: load average {load_before:.2f}/{load_after:.2f} "
              f"exceeds the {cores} cores (rerun when idle, or pass --allow-noisy)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
