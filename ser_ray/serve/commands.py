"""serve a bundle over HTTP with Ray Serve

``ser-ray serve --bundle PATH [--port 8000] [--host 127.0.0.1] [--allow-root DIR ...]
[--allow-bucket NAME ...] [--address ADDR]``: starts (or joins, with ``--address``) Ray, starts Serve
on ``host:port`` and serves ``ser_ray.serve.app.build_app`` until Ctrl-C. On a cluster, replicas of
the ingress and of each member spread over the nodes (``--ingress-replicas``, ``--num-replicas``), and
``--proxy-location HeadOnly`` keeps the HTTP proxy on the head. Clients need the API key
(``ser_ray.auth``; created in ``~/.config/ser-ray/api-key`` on first use when none is set).

The same app deploys from ``serve_config.yaml`` with ``serve run serve_config.yaml`` or
``serve deploy serve_config.yaml`` (import path ``ser_ray.serve.app:app_builder``).
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from ser_ray.ensemble.runtime import BACKENDS

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
    parser.add_argument("--members", choices=["ingress", "deployments"], default="ingress",
                        help="where the ensemble members run: inside each ingress replica (default: no calls "
                             "between actors per request, fastest on CPUs; scale with --ingress-replicas) or in "
                             "one deployment per member (own GPUs, nodes and --num-replicas per member)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: each member as an ONNX Runtime session (CPU) or a TorchScript trace where its "
                             "logits stay the same, else as saved (on CPU the default cnn ~2x, bigru_attn ~4x faster); the "
                             "others force one form (eager where it fails)")
    parser.add_argument("--num-replicas", type=int, default=1, help="replicas per member (--members deployments)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per member replica (--members deployments)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per member replica, or per ingress replica with --members ingress "
                             "(fractions share a GPU, e.g. 0.5)")
    parser.add_argument("--ingress-replicas", type=int, default=1,
                        help="replicas of the HTTP ingress (with --members ingress, each runs the whole ensemble: "
                             "one per CPU core serves the most; 2 or more on a cluster: with one, losing its "
                             "node stops every request until Serve starts it again)")
    parser.add_argument("--ingress-num-cpus", type=float, default=0.5,
                        help="CPUs per ingress replica (torch threads of its members with --members ingress)")
    parser.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                        help="where Serve runs its HTTP proxy on a cluster: every node with a replica (default; "
                             "put a load balancer in front) or the head only (one address for clients)")
    parser.add_argument("--http-proxy", choices=["auto", "haproxy", "python"], default="auto",
                        help="what takes HTTP in a Ray this command starts: HAProxy handing requests straight to "
                             "the ingress replicas (auto: when installed, as ray[serve] does on Linux; ~1.6x the "
                             "requests per second of the Python proxy on 2 CPUs) or Serve's Python proxy. On a "
                             "cluster (--address) its nodes decide: start them with RAY_SERVE_ENABLE_HA_PROXY=1")
    parser.add_argument("--hop-s", type=float, default=1.5, help="hop between windows in seconds")
    parser.add_argument("--vad", choices=["energy", "none"], default="energy")
    parser.add_argument("--route-prefix", default="/")
    access = parser.add_argument_group("access")
    access.add_argument("--api-key-file", default=None,
                        help="file holding the API key clients must send (default: $SER_RAY_API_KEY, else "
                             "~/.config/ser-ray/api-key, created with a random key if missing)")
    access.add_argument("--no-auth", action="store_true",
                        help="serve without an API key (only on a network where every client is trusted)")
    access.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="Host header the endpoint answers (repeatable; default: localhost names when "
                             "--host is loopback, any otherwise); refuses DNS-rebinding pages")
    limits = parser.add_argument_group("overload and time limits")
    limits.add_argument("--request-timeout-s", type=float, default=900.0,
                        help="end-to-end limit of one HTTP request, upload included (408 after it)")
    limits.add_argument("--max-queued-requests", type=int, default=64,
                        help="requests waiting at the ingress beyond its slots; more get 503 with Retry-After")
    limits.add_argument("--max-uris-per-request", type=int, default=256,
                        help="URIs one /annotate request may name (413 beyond it; a repeated URI counts once)")
    limits.add_argument("--max-windows-per-request", type=int, default=100_000,
                        help="windows all files of one /annotate request may make together; a file that does "
                             "not fit gets a retry row (request_full), which the client sends again alone")
    limits.add_argument("--member-timeout-s", type=float, default=120.0,
                        help="limit of one model call (a batch of windows); a member slower than this gives 503")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def config_from_args(args: argparse.Namespace):
    from ser_ray import auth
    from ser_ray.serve.app import ServeConfig

    key = None if args.no_auth else auth.resolve_key(key_file=args.api_key_file, create=True)
    hosts = args.allow_host or (["localhost", "127.0.0.1", "[::1]"] if args.host in _LOOPBACK else ["*"])
    return ServeConfig(
        auth=not args.no_auth,
        api_key_sha256=auth.digest(key) if key else None,
        allowed_hosts=hosts,
        request_timeout_s=args.request_timeout_s,
        max_queued_requests=args.max_queued_requests,
        member_timeout_s=args.member_timeout_s,
        max_uris_per_request=args.max_uris_per_request,
        max_windows_per_request=args.max_windows_per_request,
        bundle=args.bundle,
        # resolved here, in the user's working directory, not in the replica's
        allowed_roots=[str(Path(root).expanduser().resolve()) for root in args.allow_root],
        allowed_buckets=list(args.allow_bucket),
        max_upload_mb=args.max_upload_mb,
        max_duration_s=args.max_duration_s,
        max_upload_duration_s=args.max_upload_duration_s,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        members=args.members,
        backend=args.backend,
        num_replicas=args.num_replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        ingress_replicas=args.ingress_replicas,
        ingress_num_cpus=args.ingress_num_cpus,
        hop_s=args.hop_s,
        vad=args.vad,
        route_prefix=args.route_prefix,
    )


def check_listening(host: str, port: int) -> None:
    """Serve ignores new HTTP options when it already runs on the cluster (``--address``): fail
    clearly instead of claiming to serve on a host/port nobody listens on."""
    import httpx

    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    probe = f"[{probe}]" if ":" in probe else probe
    try:
        httpx.get(f"http://{probe}:{port}/-/healthz", timeout=10)
    except httpx.TransportError:
        raise SystemExit(f"nothing listens on {host}:{port}: Serve already runs on this cluster with other HTTP "
                         "options; stop it (`serve shutdown`) or use its host and port") from None


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
    import os

    from ser_ray.session import connect, ray_in_use, serve_proxy_env

    if ray_in_use(args.address):
        if args.http_proxy != "auto":
            log.warning("--http-proxy %s applies to a Ray this command starts; the cluster's nodes chose theirs "
                        "when they started (RAY_SERVE_ENABLE_HA_PROXY=1 for HAProxy)", args.http_proxy)
    elif args.http_proxy != "auto":  # asked for by name: over what the environment says
        os.environ.update(serve_proxy_env(args.http_proxy))
    connect(args.address, dashboard=False)
    try:
        serve.start(proxy_location=args.proxy_location,
                    http_options={"host": args.host, "port": args.port, "request_timeout_s": config.request_timeout_s})
        serve.run(build_app(config), name="ser-ray", route_prefix=config.route_prefix, blocking=False)
        check_listening(args.host, args.port)
        log.info("serving %s on http://%s:%d%s (Ctrl-C stops); clients send 'Authorization: Bearer <key>' %s",
                 config.bundle, args.host, args.port, config.route_prefix,
                 "(auth is OFF)" if args.no_auth else "with the key from $SER_RAY_API_KEY or the key file")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        log.info("stopping: shutting down Serve and Ray")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        serve.shutdown()
        ray.shutdown()
        log.info("stopped")
    return 0
