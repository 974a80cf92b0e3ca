"""serve a bundle over HTTP with Ray Serve

``ser-ray serve --bundle PATH [--port 8000] [--host 127.0.0.1] [--allow-root DIR ...]
[--allow-bucket NAME ...] [--address ADDR]``: starts (or joins, with ``--address``) Ray, starts Serve
on ``host:port`` and serves ``ser_ray.serve.app.build_app`` until Ctrl-C.

The same app deploys from ``serve_config.yaml`` with ``serve run serve_config.yaml`` or
``serve deploy serve_config.yaml`` (import path ``ser_ray.serve.app:app_builder``).
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "serve") -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory or s3:// prefix")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                        help="local directory /annotate may read (repeatable); none by default")
    parser.add_argument("--allow-bucket", action="append", default=[], metavar="NAME",
                        help="S3 bucket (or bucket/prefix) /annotate may read (repeatable)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (e.g. auto or ray://host:10001); default: start a local Ray")
    parser.add_argument("--max-upload-mb", type=float, default=50.0)
    parser.add_argument("--max-duration-s", type=float, default=4 * 3600.0,
                        help="longest file /annotate reads (from its header, before any work)")
    parser.add_argument("--max-upload-duration-s", type=float, default=600.0,
                        help="longest audio a /predict upload may hold")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--num-replicas", type=int, default=1, help="replicas per ensemble member")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per member replica")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per member replica (fractions share a GPU, e.g. 0.5)")
    parser.add_argument("--hop-s", type=float, default=1.5, help="hop between windows in seconds")
    parser.add_argument("--vad", choices=["energy", "none"], default="energy")
    parser.add_argument("--route-prefix", default="/")


def config_from_args(args: argparse.Namespace):
    from ser_ray.serve.app import ServeConfig

    return ServeConfig(
        bundle=args.bundle,
        # resolved here, in the user's working directory, not in the replica's
        allowed_roots=[str(Path(root).expanduser().resolve()) for root in args.allow_root],
        allowed_buckets=list(args.allow_bucket),
        max_upload_mb=args.max_upload_mb,
        max_duration_s=args.max_duration_s,
        max_upload_duration_s=args.max_upload_duration_s,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        num_replicas=args.num_replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        hop_s=args.hop_s,
        vad=args.vad,
        route_prefix=args.route_prefix,
    )


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (service managers, ``kill``) both raise KeyboardInterrupt -> clean shutdown.

    SIGINT is set explicitly: a process started in the background by a shell inherits it ignored.
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from ser_ray.serve.app import build_app

    config = config_from_args(args)
    _stop_on_signals()
    if not config.allowed_roots and not config.allowed_buckets:
        log.warning("no --allow-root or --allow-bucket: /annotate will refuse every URI (/predict works)")
    # "local" starts a fresh Ray even when a stale cluster address file exists (RAY-NOTES)
    ray.init(address=args.address or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        log.info("serving %s on http://%s:%d%s (Ctrl-C stops)", config.bundle, args.host, args.port,
                 config.route_prefix)
        serve.run(build_app(config), name="ser-ray", route_prefix=config.route_prefix, blocking=True)
    except KeyboardInterrupt:
        log.info("stopping: shutting down Serve and Ray")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        serve.shutdown()
        ray.shutdown()
        log.info("stopped")
    return 0
