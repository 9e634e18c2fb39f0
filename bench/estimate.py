"""Projection of a 72B run over the internet with ``distrain.cli.estimate`` (no training).

    python bench/estimate.py [--replicas 20] [--up-mbps 110] [--down-mbps 500] [--inner-steps 30]

The setting of the published Covenant-72B run (SparseLoCo, ~20 peers, 500 Mbit/s down / 110 Mbit/s
up, H = 30, 94.5 % compute utilisation with ~70 s of communication per round). Per-step compute
time is not published; by default it is derived from those two figures: a round computes
70 s × 0.945 / 0.055 ≈ 1203 s, i.e. 40.1 s per inner step, so the projection's utilisation differs
from 94.5 % only through its own communication time. Writes bench/results/estimate.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import command, machine

from distrain.comm.network import Link
from distrain.cli.estimate import algorithm_frames, model_config, model_shapes, project

RESULTS = Path(__file__).resolve().parent / "results" / "estimate.json"
PUBLISHED = {"utilisation": 0.945, "comm_s_per_round": 70.0, "replicas": 20, "down_mbps": 500.0, "up_mbps": 110.0,
             "inner_steps": 30, "source": "Covenant-72B (arXiv 2603.08163, 2026) and its authors' announcement"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=20)
    p.add_argument("--up-mbps", type=float, default=110.0)
    p.add_argument("--down-mbps", type=float, default=500.0)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--inner-steps", type=int, default=30)
    p.add_argument("--step-time-s", type=float, default=None,
                   help="compute seconds per inner step (default: derived from the published 94.5 %% and 70 s)")
    p.add_argument("--sweep", default="2,5,10,20,40,80")
    args = p.parse_args()
    u, c = PUBLISHED["utilisation"], PUBLISHED["comm_s_per_round"]
    step_s = args.step_time_s or c * u / (1 - u) / PUBLISHED["inner_steps"]
    shapes = model_shapes(model_config("72b"))
    n_params = sum(math.prod(s) for s in shapes.values())
    link = Link(args.up_mbps, args.down_mbps, args.latency_ms)
    frames = algorithm_frames(shapes)
    rows = project(None, args.replicas, link, args.inner_steps, step_s, frames=frames)
    by = {(r.algorithm, r.overlap): r for r in rows}
    out: dict = {}
    for alg in ("sparseloco", "diloco", "ddp"):
        r = by[(alg, False)]
        entry = {"utilisation": r.utilisation, "round_s": r.round_s, "bytes_per_replica": r.bytes_per_replica,
                 "compute_s": r.compute_s, "comm_s": r.comm_s, "frame_bytes": r.frame_bytes,
                 "bytes_received_per_replica": r.bytes_received_per_replica, "frame_method": r.frame_method}
        if (alg, True) in by:
            o = by[(alg, True)]
            entry["with_overlap"] = {"utilisation": o.utilisation, "round_s": o.round_s}
        out[alg] = entry
    sl = by[("sparseloco", False)]
    # Download bandwidth at which the relay all-gather of R − 1 frames takes the published 70 s.
    needed = (args.replicas - 1) * sl.frame_bytes * 8 / ((c - args.latency_ms / 1e3) * 1e6)
    out["growth"] = {str(R): {r.algorithm + ("+overlap" if r.overlap else ""): r.utilisation
                              for r in project(None, R, link, args.inner_steps, step_s, frames=frames)}
                     for R in (int(x) for x in args.sweep.split(",") if x)}
    out["assumptions"] = {"model": "72b preset (LLaMA-style, dim 8192, 80 layers, 64 heads, 8 KV heads, ffn 28672, "
                                   "vocab 262144, untied)", "parameters": n_params, "replicas": args.replicas,
                          "up_mbps": args.up_mbps, "down_mbps": args.down_mbps, "latency_ms": args.latency_ms,
                          "inner_steps": args.inner_steps, "step_time_s": step_s,
                          "step_time_source": "given" if args.step_time_s else "derived from the published 94.5 % / 70 s",
                          "sparseloco_codec": "top-64 of 4096, 2-bit reference quantizer, gap-coded indices + zstd",
                          "diloco_codec": "dense fp32 + zstd", "ddp": "dense fp32 gradients every inner step",
                          "network": "relay all-gather: upload own frame, download R - 1 frames, full duplex"}
    out["published"] = PUBLISHED
    out["down_mbps_for_published_70s"] = needed
    out["machine"] = machine()
    out["command"] = command("bench/estimate.py")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("sparseloco", "diloco", "ddp", "down_mbps_for_published_70s")}, indent=1))


if __name__ == "__main__":
    main()
