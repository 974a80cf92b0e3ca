"""/predict latency under concurrent clients: a local Ray + Serve, real HTTP on loopback.

The bundle is cnn + bigru_attn at default sizes with RANDOM weights (latency does not depend on the
weights). Each of ``--clients`` threads uploads the same 3 s WAV in a loop for ``--duration`` seconds
(closed loop: a client sends its next request when the last one returns). Prints p50/p90/p99/max
latency, requests per second and the number of errors (target on CPU: p99 <= 150 ms, 0 errors). It also times the
same work in-process, one request at a time (``annotate_file`` + ``Bundle.predict_proba``), as the floor
on this machine, and prints the load average, since other processes on the machine skew both.

    python benchmarks/serve_latency.py [--clients 8 --duration 30 --cpus 2 --max-batch-size 8]
"""

from __future__ import annotations

import argparse
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


def in_process_latency(bundle_dir: str, data: bytes, seconds: float = 5.0) -> dict:
    """The same work without Serve: ``annotate_file`` on the clip with ``Bundle.predict_proba``, one
    request at a time, in this process. A floor for the served latency on this machine right now."""
    from ser_ray.annotate import AnnotateConfig, annotate_file
    from ser_ray.ensemble import load_bundle

    bundle = load_bundle(bundle_dir)
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
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clip-s", type=float, default=3.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--families", default="cnn,bigru_attn")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--member-cpus", type=float, default=None, help="CPUs per member replica (default cpus/members)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ser_ray.serve.app import ServeConfig, build_app

    load_before = f"{os.getloadavg()[0]:.1f}"
    families = [f for f in args.families.split(",") if f]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ser-ray-serve-bench-"))
    bundle = make_bundle(work / "bundle", families)
    member_cpus = args.member_cpus or max(0.25, (args.cpus - 0.5) / len(families))
    config = ServeConfig(bundle=bundle, max_batch_size=args.max_batch_size,
                         batch_wait_timeout_s=args.batch_wait_timeout_s, num_cpus=member_cpus,
                         ingress_num_cpus=0.5, ingress_threads=max(8, args.clients),
                         auth=False)  # loopback benchmark: no API key
    data = clip_wav(args.clip_s)
    torch.set_num_threads(args.cpus)
    floor = in_process_latency(bundle, data)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/predict"
    warm = load_test(url, data, args.clients, 5.0)  # first batches, thread pools, allocators
    result = load_test(url, data, args.clients, args.duration)
    serve.shutdown()
    ray.shutdown()

    print(f"bundle: {' + '.join(families)} (default sizes, random weights); {args.cpus} CPUs; "
          f"{args.clip_s:g} s clip; {args.clients} clients for {args.duration:g} s; "
          f"max_batch_size={args.max_batch_size}, batch_wait_timeout_s={args.batch_wait_timeout_s}, "
          f"member num_cpus={member_cpus:g}")
    print(f"in-process floor (annotate_file + Bundle.predict_proba, 1 request at a time, no HTTP): "
          f"p50 {floor['p50_ms']:.1f} ms  p99 {floor['p99_ms']:.1f} ms")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    print(f"warm-up: {warm['requests']} requests, {warm['errors']} errors")
    print(f"p50 {result['p50_ms']:.1f} ms  p90 {result['p90_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
          f"max {result['max_ms']:.1f} ms  {result['rps']:.1f} req/s  errors {result['errors']}  "
          f"(target p99 <= 150 ms, 0 errors)")
    print(json.dumps({"config": vars(args), "in_process": floor, "result": result}, indent=2))


if __name__ == "__main__":
    main()
