"""torchrun entry point: one process per worker (see ``distrain.runtime.torchrun``).

    torchrun --standalone --nproc-per-node 3 -m distrain.launch.torchrun --config configs/torchrun_cpu.toml
    torchrun --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --nproc-per-node 4 --max-restarts 3 -m distrain.launch.torchrun --config my.toml

The world size must equal the layout's: one process per worker of the topology (a full replica's
devices, a pipeline's stages).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys

import torch

from distrain.comm.errors import FrameError
from distrain.config import ConfigError, load_config
from distrain.layout import Layout
from distrain.runtime.common import apply_torch_threads
from distrain.runtime.faults import Fault


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m distrain.launch.torchrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="torchrun_cpu", help="TOML file or preset name in configs/")
    p.add_argument("--fault", default="", help="fault injection, e.g. exit:rank=1,round=2 or slow:rank=1,factor=3 "
                   "(tests and demos)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        layout = Layout.from_config(cfg)
        fault = Fault.parse(args.fault) if args.fault else None
    except (ConfigError, ValueError) as e:
        print(f"distrain.launch.torchrun: config error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != layout.world_size:
        print(f"distrain.launch.torchrun: WORLD_SIZE={world or 'unset'} but the topology has {layout.world_size} workers "
              f"({layout.n_replicas} replicas); run under torchrun with --nproc-per-node {layout.world_size}",
              file=sys.stderr)
        return 2
    apply_torch_threads(cfg)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    from distrain.comm.errors import CommError
    from distrain.comm.torch_transport import init_process_group
    from distrain.runtime.torchrun import run_torchrun

    try:
        init_process_group(cfg.runtime.byte_backend, cfg.runtime.device_backend, cfg.topology.round_timeout_s)
    except CommError as e:
        print(f"distrain.launch.torchrun: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_torchrun(cfg, fault)
        if summary is not None:
            print(json.dumps(summary.to_dict()), flush=True)
    except (FrameError, FloatingPointError) as e:
        # torch collectives cannot leave this replica behind: this attempt ends now, in one line (the
        # elastic agent stops the other ranks and, with --max-restarts, resumes from the checkpoints)
        print(f"distrain.launch.torchrun: rank {os.environ.get('RANK', '?')}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return 3
    finally:
        # the run's objects that sit in reference cycles (engines, optimisers, pending collectives'
        # tensors) are freed now, while the process groups and the interpreter are alive: freed at
        # interpreter shutdown instead, gloo's worker threads can abort the process after a good run
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
