"""Ray entry point: the driver of a Ray job (see ``distrain.runtime.ray.pool``).

    export RAY_AUTH_MODE=token
    ray start --head --node-ip-address=127.0.0.1 --num-cpus=4 --object-store-memory=200000000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m distrain.launch.ray --config configs/ray_local.toml --run.out_dir=$PWD/runs

Without ``ray job submit`` it also runs as a plain driver against a running cluster
(``--address auto``, the default) or a private local one (``--address local``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from distrain.config import ConfigError, load_config
from distrain.runtime.faults import Fault


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m distrain.launch.ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ray_local", help="TOML file or preset name in configs/")
    p.add_argument("--address", default="auto", help="Ray cluster address: auto (the running cluster / job), "
                   "local (start a private one), or host:port")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a private local cluster (--address local)")
    p.add_argument("--fault", action="append", default=[], help="fault injection (repeatable): "
                   "kill:rank=R,round=N[,delay=S], stale:rank=R,round=N, slow:rank=R,factor=F[,round=N] or "
                   "late:rank=R,round=N,delay=S (tests and demos)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        faults = [Fault.parse(f) for f in args.fault]
    except (ConfigError, ValueError) as e:
        print(f"distrain.launch.ray: config error: {e}", file=sys.stderr)
        return 2
    import ray

    from distrain.runtime.ray.pool import run_ray_job

    if args.address == "local":
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=args.address, log_to_driver=True)
    try:
        summary = run_ray_job(cfg, faults)
        print(json.dumps(summary.to_dict()), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
