"""bs-serve-ray: the same API, scaled out on Ray Serve (``pip install 'blindsight-ort[ray]'``).

Each replica is a Ray actor that loads its own :class:`~blindsight.serve.engine.Engine`
(one Pipeline, the bounded queue) and serves bs-serve's FastAPI app
(:func:`blindsight.serve.app.create_app`) through ``serve.ingress``; Ray Serve's
HTTP proxy spreads requests over the replicas. ``--replicas N`` fixes their
number; ``--autoscale MIN:MAX`` lets Ray Serve add and remove replicas to keep
about ``--target-ongoing-requests`` requests on each. A replica takes at most
``--concurrency + --max-queue`` requests at once (Ray's ``max_ongoing_requests``);
past that its own queue answers 429, as bs-serve does.

Without ``--address`` a local Ray instance is started for the server and stopped
with it; ``--address auto`` (or ray://...) joins a running cluster, where the
replicas may land on several machines (every node needs OUT_DIR at the same path).
``GET /health`` answers from one replica and names its process (``pid``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from blindsight.errors import BlindSightError


class BlindSightReplica:
    """One replica: an Engine over OUT_DIR and bs-serve's app around it."""

    def __init__(self, out_dir: str, engine_kwargs: dict):
        from blindsight.serve.engine import Engine

        self.engine = Engine.from_directory(out_dir, **engine_kwargs)

    def __serve_build_asgi_app__(self):
        from blindsight.serve.app import create_app

        return create_app(self.engine)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise BlindSightError(f"--autoscale {text!r}: give MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise BlindSightError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def deployment_options(args) -> dict:
    """Ray Serve deployment options from the command line (replicas or autoscaling, resources)."""
    opts = {
        "name": "blindsight",
        "max_ongoing_requests": args.concurrency + args.max_queue,
        "ray_actor_options": {"num_cpus": args.num_cpus_per_replica},
        "health_check_period_s": 10,
    }
    if args.autoscale:
        lo, hi = parse_autoscale(args.autoscale)
        opts["num_replicas"] = "auto"
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "target_ongoing_requests": args.target_ongoing_requests,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        if args.replicas < 1:
            raise BlindSightError(f"--replicas is {args.replicas}; give 1 or more")
        opts["num_replicas"] = args.replicas
    return opts


def build_application(out_dir: str, engine_kwargs: dict, options: dict):
    """The Ray Serve application (``Deployment.bind``) for ``serve.run``."""
    from ray import serve

    ingress = serve.ingress()(BlindSightReplica)
    return serve.deployment(ingress, **options).bind(os.path.abspath(out_dir), engine_kwargs)


def build_parser() -> argparse.ArgumentParser:
    from blindsight.serve.cli import add_pipeline_arguments

    p = argparse.ArgumentParser(prog="bs-serve-ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address Ray Serve's HTTP proxy listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="its port (default 8000)")
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="fixed number of replicas (default 2)")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale between MIN and MAX replicas instead")
    p.add_argument("--target-ongoing-requests", type=float, default=2.0, metavar="N",
                   help="with --autoscale: requests per replica Ray Serve aims at (default 2)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, metavar="N",
                   help="CPUs Ray reserves for each replica (default 1)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster to join ('auto', ray://host:port); default: start a local one")
    p.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray instance (default: the machine's; at least what the replicas reserve)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import ray
    from ray import serve

    from blindsight.serve.cli import engine_kwargs
    from blindsight.runtime.pipeline import load_template, resolve_model

    kwargs = engine_kwargs(args)
    options = deployment_options(args)
    # the export's faults are one line here, before any replica starts
    from pathlib import Path

    resolve_model(Path(args.out_dir), load_template(args.out_dir), args.model)
    kwargs["name"] = kwargs["name"] or Path(args.out_dir).resolve().name
    if args.address is None:
        needed = int(-(-(options.get("num_replicas") if options["num_replicas"] != "auto"
                         else options["autoscaling_config"]["max_replicas"]) * args.num_cpus_per_replica // 1))
        cpus = args.ray_cpus or max(os.cpu_count() or 1, needed)
        local = {"_node_ip_address": "127.0.0.1"} if args.host in ("127.0.0.1", "localhost") else {}
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False, **local)
    else:
        ray.init(address=args.address, log_to_driver=False)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_application(args.out_dir, kwargs, options), name="blindsight", route_prefix="/",
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
        replicas = options["num_replicas"]
        print(f"bs-serve-ray: serving {kwargs['name']!r} from {args.out_dir} at http://{args.host}:{args.port} "
              f"({'autoscaling ' + args.autoscale if args.autoscale else f'{replicas} replicas'})",
              file=sys.stderr, flush=True)
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        _shutdown(serve, ray)
    return 0


def _shutdown(serve, ray, timeout: float = 30.0) -> None:
    """serve.shutdown, bounded (it waits on the cluster, which a signal to the whole process
    group may already have stopped), then ray.shutdown, which stops a local instance."""
    import threading

    t = threading.Thread(target=serve.shutdown, daemon=True)
    t.start()
    t.join(timeout)
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
