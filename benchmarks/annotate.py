"""Offline annotation throughput: Ray Data actor pool vs the seed-style loop, same archive, same bundle.

The seed loop loads the models once, then for each file cuts 3 s segments and sends each one through
librosa features and the models one at a time. The offline path is ``annotate_archive`` (streamed
windows, batched features and models, one actor per CPU). Both get the same CPUs (``--cpus``).
Prints audio-seconds per wall-second for each and their ratio (target: offline >= 5x), and the
members' own compute rate on the same windows in process (features + models, ``--backend`` as the
actors run them, one thread, times ``--cpus``: what the CPUs allow with no decoding, I/O or Ray;
target: offline >= 85 % of it).

    python benchmarks/annotate.py [--files 16 --seconds 60 --cpus 2] [--endpoint]

``--endpoint`` also runs the same archive through a local Serve app (``run_endpoint``:
``annotate_via_endpoint`` posting URIs to ``/annotate`` on loopback) with the same CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ser_ray.annotate.core import AnnotateConfig
from ser_ray.ensemble import Bundle, Member, load_bundle, save_bundle
from ser_ray.features.config import FeatureConfig
from ser_ray.models import build_model

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]


def make_archive(root: Path, files: int, seconds: float, sr: int = 16_000) -> float:
    """``files`` recordings of noise bursts and tones (content does not matter for throughput)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(files):
        x = 0.1 * np.sin(2 * np.pi * (120 + 10 * i) * t) * (1 + np.sin(2 * np.pi * 0.3 * t))
        x += 0.03 * rng.standard_normal(len(t))
        sf.write(root / f"rec{i:03d}.wav", x.astype(np.float32), sr, subtype="PCM_16")
    return files * seconds


def make_bundle(path: Path, families=("cnn", "bigru_attn")) -> str:
    """A bundle of default-size models (random weights: speed does not depend on them)."""
    torch.manual_seed(0)
    fc = FeatureConfig()
    members = [Member(f, build_model(f, len(LABELS), fc).eval(), fc) for f in families]
    return save_bundle(Bundle(LABELS, members), str(path))


def run_offline(archive: str, bundle_dir: str, output: str, config: AnnotateConfig, num_actors: int) -> dict:
    """Time ``annotate_archive`` end to end (listing, actor start, bundle load, annotation, writes)."""
    from ser_ray.annotate.offline import annotate_archive

    from ser_ray.annotate import offline

    shutil.rmtree(output, ignore_errors=True)
    commits = []  # (seconds since start, audio-s committed so far), one per committed batch of files
    commit = offline.ResultWriter.commit

    def timed_commit(writer, files, segments):
        result = commit(writer, files, segments)
        done = (commits[-1][1] if commits else 0.0) + sum(f["duration_s"] for f in files if f["status"] == "ok")
        commits.append((time.perf_counter() - start, done))
        return result

    offline.ResultWriter.commit = timed_commit
    try:
        start = time.perf_counter()
        summary = annotate_archive(archive, output, bundle_dir, config, num_actors=num_actors, batch_files=4,
                                   progress=False)
        wall = time.perf_counter() - start
    finally:
        offline.ResultWriter.commit = commit
    # steady state: from the first committed batch to the last (start-up, the first batch's own work
    # and the tail where fewer files than actors are left are outside it)
    (t0, a0), (t1, a1) = commits[0], commits[-1]
    return {"audio_s": summary["audio_s"], "wall_s": wall, "rate": summary["audio_s"] / wall,
            "n_files": summary["n_files"], "first_commit_s": t0,
            "steady_rate": (a1 - a0) / (t1 - t0) if t1 > t0 else float("nan")}


def members_compute_rate(bundle_dir: str, backend: str, cpus: int, hop_s: float = 3.0, seconds: float = 5.0) -> dict:
    """Audio-s per s the members alone allow: ``Bundle.predict_proba`` on batches of 32 windows already in
    memory, one torch thread in this process, times ``cpus`` (separate processes scale ~linearly here)."""
    bundle = load_bundle(bundle_dir)
    waves = (0.1 * np.random.default_rng(0).standard_normal((32, bundle.num_samples))).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the conversion: ONNX Runtime sessions take the thread count then
    try:
        bundle.optimise_for_inference(backend)
        bundle.predict_proba(waves)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            bundle.predict_proba(waves)
            n += len(waves)
        per_core = n * hop_s / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"rate": per_core * cpus, "per_core": per_core, "backends": {m.name: m.backend for m in bundle.members}}


def run_seed_loop(archive: str, bundle_dir: str, segment_s: float = 3.0, max_files: int | None = None) -> dict:
    """The seed's way: librosa features and the models, one 3 s segment at a time (models loaded once),
    over the first ``max_files`` files (its rate per audio-second does not change with the archive)."""
    import librosa

    bundle = load_bundle(bundle_dir)
    weights = bundle.weights()
    fc = bundle.members[0].feature_config
    files = sorted(Path(archive).glob("*.wav"))[:max_files]
    audio_s, labels = 0.0, []
    start = time.perf_counter()
    for path in files:
        y, sr = librosa.load(path, sr=fc.sample_rate)
        audio_s += len(y) / sr
        n = int(segment_s * sr)
        for s in range(0, len(y), n):
            seg = librosa.util.fix_length(y[s : s + n], size=n)
            mel = librosa.feature.melspectrogram(y=seg, sr=sr, n_fft=fc.n_fft, hop_length=fc.hop_length, n_mels=fc.n_mels)
            x = torch.from_numpy(librosa.power_to_db(mel, ref=np.max, top_db=fc.top_db)[None].astype(np.float32))
            with torch.inference_mode():
                probs = sum(w * torch.softmax(m.model(x), -1) for w, m in zip(weights, bundle.members))
            labels.append(int(probs.argmax()))
    wall = time.perf_counter() - start
    return {"audio_s": audio_s, "wall_s": wall, "rate": audio_s / wall, "n_segments": len(labels)}


def run_endpoint(archive: str, bundle_dir: str, output: str, config: AnnotateConfig, *, cpus: int,
                 batch_files: int = 4, concurrency: int = 4) -> dict:
    """Time ``annotate_via_endpoint`` against a local Serve app of the same bundle (loopback HTTP).

    Needs a running Ray. Serve start-up and deployment are timed apart from the annotation itself.
    """
    import socket

    from ray import serve

    from ser_ray.serve.app import ServeConfig, build_app
    from ser_ray.annotate.endpoint import annotate_via_endpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # members in the ingress (the default), one replica per CPU
    serve_config = ServeConfig(bundle=bundle_dir, allowed_roots=[archive], hop_s=config.hop_s, vad=config.vad,
                               window_s=config.window_s, ingress_replicas=cpus, ingress_num_cpus=1,
                               ingress_threads=4, backend=config.backend,
                               auth=False)  # loopback benchmark: no API key
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_config), name="bench-annotate", route_prefix="/")
    startup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        summary = annotate_via_endpoint(archive, output, f"http://127.0.0.1:{port}", batch_files=batch_files,
                                        concurrency=concurrency, progress=False)
        wall = time.perf_counter() - start
    finally:
        serve.shutdown()
    return {"audio_s": summary["audio_s"], "wall_s": wall, "rate": summary["audio_s"] / wall,
            "n_files": summary["n_files"], "startup_s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--seed-files", type=int, default=None,
                        help="files the seed loop labels (default all; its rate is per audio-second, so a few "
                             "files of a large archive measure it in less time)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--endpoint", action="store_true", help="also annotate through a local Serve endpoint")
    parser.add_argument("--backend", choices=["auto", "eager", "torchscript", "onnx"], default="auto",
                        help="members' form in the actors and the endpoint (the seed loop stays eager)")
    args = parser.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ser-ray-bench-"))
    archive = work / "archive"
    total = make_archive(archive, args.files, args.seconds)
    bundle_dir = make_bundle(work / "bundle")
    torch.set_num_threads(args.cpus)  # the seed loop gets the same cores as the actor pool
    for attempt in range(3):  # a loaded machine can miss Ray's 30 s node start-up deadline
        try:
            from ser_ray.session import use_serve_proxy

            use_serve_proxy()  # Serve's HTTP proxy as `ser-ray serve` picks it
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            if attempt == 2:
                raise
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    print(f"archive: {args.files} files, {total / 60:.1f} min of audio; bundle: cnn + bigru_attn; {args.cpus} CPUs")
    seed = run_seed_loop(str(archive), bundle_dir, max_files=args.seed_files)
    print(f"seed loop (3 s segments, one at a time):       {seed['rate']:7.1f} audio-s/s  ({seed['wall_s']:.1f} s)")
    bound = members_compute_rate(bundle_dir, args.backend, args.cpus)
    print(f"members alone, in process (hop 3 s windows, {bound['backends']}, 1 thread x {args.cpus}): "
          f"{bound['rate']:7.1f} audio-s/s")
    results = {"seed_loop": seed, "members_compute": bound}
    for name, hop in [("offline_hop3.0", 3.0), ("offline_hop1.5", 1.5)]:
        cfg = AnnotateConfig(hop_s=hop, backend=args.backend)
        r = run_offline(str(archive), bundle_dir, str(work / f"out_{name}"), cfg, num_actors=args.cpus)
        results[name] = r
        print(f"{name:<14} (Ray Data, {args.cpus} actors):           {r['rate']:7.1f} audio-s/s  ({r['wall_s']:.1f} s)"
              f"  ratio vs seed: {r['rate'] / seed['rate']:.1f}x, vs members alone: "
              f"{r['rate'] * 3.0 / hop / bound['rate']:.0%} (windows per s); steady state (first to last "
              f"committed batch, first at {r['first_commit_s']:.1f} s): {r['steady_rate']:.1f} audio-s/s = "
              f"{r['steady_rate'] * 3.0 / hop / bound['rate']:.0%}")
    if args.endpoint:
        r = run_endpoint(str(archive), bundle_dir, str(work / "out_endpoint"),
                         AnnotateConfig(hop_s=1.5, backend=args.backend), cpus=args.cpus)
        results["endpoint_hop1.5"] = r
        print(f"endpoint_hop1.5 (Serve /annotate, loopback):   {r['rate']:7.1f} audio-s/s  ({r['wall_s']:.1f} s, "
              f"+{r['startup_s']:.1f} s start-up)  ratio vs seed: {r['rate'] / seed['rate']:.1f}x")
    print("hop 3.0 s does the seed's work (same windows); hop 1.5 s classifies twice as many windows.")
    print(json.dumps(results, indent=2))
    ray.shutdown()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main()
