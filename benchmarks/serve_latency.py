"""/predict throughput and latency: a local Ray + Serve, real HTTP on loopback, against the same work in process.

The bundle is cnn + bigru_attn at default sizes with RANDOM weights (speed does not depend on the
weights); every request uploads the same 3 s WAV. In one run:

1. **In-process bound**: ``annotate_file`` + ``Bundle.predict_proba`` one request at a time in this
   process with ``--cpus`` torch threads, no HTTP; bound = 1000 / p50 requests per second. Measured
   for eager members and for the backend the endpoint runs (``--backend``, default auto: TorchScript
   where faster), so the endpoint is compared with the same model code.
2. **Maximum throughput**: ``--clients`` closed-loop clients (each sends its next request when the
   last returns) for ``--duration`` s.
3. **Open loop**: Poisson arrivals at a fixed rate (a request is sent at its arrival time whether or
   not earlier ones have returned, as independent users would) at 25 %, 50 % and 75 % of that maximum,
   and at 50 % of the in-process bound; p50/p99 latency from the arrival time, achieved rate, errors.

    python benchmarks/serve_latency.py [--cpus 2 --duration 20 --members ingress --replicas 2 --http-proxy auto]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(path: Path, families: list[str]) -> str:
    from ser_ray.ensemble import Bundle, Member, save_bundle
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import build_model

    torch.manual_seed(0)
    fc = FeatureConfig()
    members = [Member(f, build_model(f, len(LABELS), fc).eval(), fc) for f in families]
    return save_bundle(Bundle(LABELS, members), str(path))


def clip_wav(seconds: float, sr: int = 16_000) -> bytes:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t)) + 0.02 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def load_test(url: str, data: bytes, clients: int, duration_s: float) -> dict:
    """``clients`` threads posting ``data`` to ``url`` until ``duration_s`` has passed."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s

    def client():
        with httpx.Client(timeout=30) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = http.post(url, files={"file": ("clip.wav", data, "audio/wav")})
                    ok = r.status_code == 200
                    problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_sample": errors[:3],
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p90_ms": float(np.percentile(ms, 90)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "max_ms": float(ms.max()) if len(ms) else None,
    }


def open_loop(url: str, data: bytes, rate: float, duration_s: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; latency counts from each arrival."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=int(rate * duration_s * 2) + 10))
    arrivals = arrivals[arrivals < duration_s]

    async def run() -> tuple[list[float], list[str], float]:
        latencies, errors = [], []
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            start = time.perf_counter()

            async def one(at: float) -> None:
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                sent = start + at
                try:
                    r = await http.post(url, files={"file": ("clip.wav", data, "audio/wav")})
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)

            await asyncio.gather(*(one(at) for at in arrivals))
            return latencies, errors, time.perf_counter() - start

    latencies, errors, wall = asyncio.run(run())
    ms = np.asarray(latencies) * 1000
    return {"offered_rps": rate, "requests": len(arrivals), "achieved_rps": len(latencies) / wall,
            "errors": len(errors), "error_sample": errors[:3],
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "max_ms": float(ms.max()) if len(ms) else None}


def in_process_latency(bundle_dir: str, data: bytes, seconds: float = 5.0, backend: str = "eager") -> dict:
    """The same work without Serve: ``annotate_file`` on the clip with ``Bundle.predict_proba``, one
    request at a time, in this process (members eager, or ``backend`` auto: traced where faster)."""
    from ser_ray.annotate import AnnotateConfig, annotate_file
    from ser_ray.ensemble import load_bundle

    bundle = load_bundle(bundle_dir)
    if backend == "auto":
        bundle.optimise_for_inference()
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(data)
        f.flush()
        annotate_file(f.name, bundle.predict_proba, AnnotateConfig())  # warm-up
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            annotate_file(f.name, bundle.predict_proba, AnnotateConfig())
            times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000
    p50 = float(np.percentile(ms, 50))
    return {"requests": len(ms), "p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)), "bound_rps": 1000.0 / p50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients for the maximum throughput")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--clip-s", type=float, default=3.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--families", default="cnn,bigru_attn")
    parser.add_argument("--members", choices=["ingress", "deployments"], default="ingress")
    parser.add_argument("--backend", choices=["auto", "eager"], default="auto")
    parser.add_argument("--replicas", type=int, default=None,
                        help="ingress replicas (default: --cpus with members in the ingress, else 1)")
    parser.add_argument("--ingress-threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--member-cpus", type=float, default=None,
                        help="CPUs per member replica with --members deployments (default (cpus - 0.5) / members)")
    parser.add_argument("--http-proxy", choices=["auto", "haproxy", "python"], default="auto",
                        help="what takes HTTP: HAProxy handing requests to the ingress replicas (auto: when "
                             "installed, as `ser-ray serve` does) or Serve's Python proxy")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    # before Ray (and Serve's constants) are imported: the Ray started below inherits it
    from ser_ray.session import serve_proxy_env

    os.environ.update(serve_proxy_env(args.http_proxy))
    proxy = "HAProxy" if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" else "Serve's Python proxy"
    import ray
    from ray import serve

    from ser_ray.serve.app import ServeConfig, build_app

    load_before = f"{os.getloadavg()[0]:.1f}"
    families = [f for f in args.families.split(",") if f]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ser-ray-serve-bench-"))
    bundle = make_bundle(work / "bundle", families)
    local = args.members == "ingress"
    replicas = args.replicas or (args.cpus if local else 1)
    member_cpus = args.member_cpus or max(0.25, (args.cpus - 0.5) / len(families))
    config = ServeConfig(bundle=bundle, members=args.members, backend=args.backend,
                         max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                         num_cpus=member_cpus, ingress_replicas=replicas,
                         ingress_num_cpus=args.cpus / replicas if local else 0.5,
                         ingress_threads=args.ingress_threads,
                         auth=False)  # loopback benchmark: no API key
    data = clip_wav(args.clip_s)
    torch.set_num_threads(args.cpus)
    floors = {b: in_process_latency(bundle, data, backend=b) for b in dict.fromkeys(["eager", args.backend])}
    bound = floors[args.backend]["bound_rps"]
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/predict"
    load_test(url, data, args.clients, 5.0)  # warm-up: first batches, thread pools, allocators
    closed = load_test(url, data, args.clients, args.duration)
    top = closed["rps"]
    rates = {"25% of max": 0.25 * top, "50% of max": 0.5 * top, "75% of max": 0.75 * top,
             "50% of in-process bound": 0.5 * bound}
    opened = {name: open_loop(url, data, rate, args.duration, seed=i) for i, (name, rate) in enumerate(rates.items())}
    serve.shutdown()
    ray.shutdown()

    print(f"bundle: {' + '.join(families)} (default sizes, random weights); {args.cpus} CPUs; {args.clip_s:g} s clip; "
          f"members in {'the ingress' if local else 'deployments'} ({replicas} ingress replica(s)), backend "
          f"{args.backend}; max_batch_size={args.max_batch_size}, batch_wait_timeout_s={args.batch_wait_timeout_s}; "
          f"HTTP through {proxy}")
    for name, floor in floors.items():
        print(f"in-process ({name} members, 1 request at a time, {args.cpus} torch threads, no HTTP): "
              f"p50 {floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms -> bound {floor['bound_rps']:.1f} req/s")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    print(f"maximum throughput ({args.clients} closed-loop clients, {args.duration:g} s): {top:.1f} req/s = "
          f"{top / bound:.0%} of the in-process bound ({args.backend}), {top / floors['eager']['bound_rps']:.0%} of "
          f"the eager one; p50 {closed['p50_ms']:.1f} ms, p99 {closed['p99_ms']:.1f} ms, errors {closed['errors']}")
    print("open loop (Poisson arrivals):")
    for name, r in opened.items():
        print(f"  {name:>24}: offered {r['offered_rps']:5.1f} req/s, achieved {r['achieved_rps']:5.1f}, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms, errors {r['errors']}")
    print(json.dumps({"config": vars(args), "http_proxy": proxy, "in_process": floors, "closed_loop": closed, "open_loop": opened}, indent=2))


if __name__ == "__main__":
    main()
