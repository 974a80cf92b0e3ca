"""prepare() over a CREMA-D-sized manifest (7,442 clips, 91 actors): wall time and peak memory.

    python benchmarks/prepare_scale.py                      # generate 7,442 16 kHz WAVs in a temp dir
    python benchmarks/prepare_scale.py --manifest m.parquet # an existing manifest (e.g. `ser-ray synth`)

Memory is sampled every 0.25 s in a thread with psutil over the driver's process tree (Ray's GCS,
raylet and workers are all below the driver for a local Ray). RSS counts the shared object-store
pages a process has touched, so the tree total overstates real use; the point is that it stays flat
(streaming) instead of growing with the number of clips.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path when psutil is not installed)
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from features import generate_wavs, manifest_for  # noqa: E402  (sibling benchmark script)


class MemorySampler(threading.Thread):
    """Peak RSS of the driver, of the largest Ray worker, and of the whole process tree."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.driver = self.worker = self.tree = 0
        self.me = psutil.Process()

    def run(self):
        while not self.stop.is_set():
            driver = self.me.memory_info().rss
            worker = tree = 0
            for child in self.me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    name = " ".join(child.cmdline()[:1])
                except psutil.Error:
                    continue
                tree += rss
                if name.startswith("ray::") or "python" in name:  # Ray workers, local workers
                    worker = max(worker, rss)
            self.driver = max(self.driver, driver)
            self.worker = max(self.worker, worker)
            self.tree = max(self.tree, driver + tree)
            self.stop.wait(self.interval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="manifest file (default: generate --n clips)")
    parser.add_argument("--n", type=int, default=7442)
    parser.add_argument("--actors", type=int, default=91)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--strategy", choices=["local", "tasks", "actors"], default="local",
                        help="local: worker processes, no Ray (what `ser-ray prepare` does on one machine)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--features", default="logmel")
    args = parser.parse_args(argv)

    from ser_ray.features import FeatureConfig
    from ser_ray.features.pipeline import prepare

    work = tempfile.mkdtemp(prefix="ser-ray-scale-")
    try:
        if args.manifest:
            from ser_ray.corpora.manifest import read_manifest

            manifest = read_manifest(args.manifest)
        else:
            t0 = time.perf_counter()
            paths = generate_wavs(os.path.join(work, "wavs"), args.n, rates=(16_000,))
            manifest = manifest_for(paths)
            manifest["speaker"] = [f"synthetic:{1001 + i % args.actors}" for i in range(len(paths))]
            print(f"generated {len(paths)} clips in {time.perf_counter() - t0:.1f} s")
        print(f"{len(manifest)} clips, {manifest['speaker'].nunique()} speakers, "
              f"{manifest['duration_s'].sum() / 3600:.2f} h of audio")

        sampler = MemorySampler()
        sampler.start()
        t0 = time.perf_counter()
        if args.strategy != "local":
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = prepare(manifest, os.path.join(work, "cache"), FeatureConfig(kind=args.features),
                       batch_size=args.batch_size, strategy=args.strategy, progress=False)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        cache_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(info.path) for f in fs) / 2**20
        if ray.is_initialized():
            ray.shutdown()

        mb = 2**20
        print(f"ray.init: {init_s:.1f} s; prepare: {wall:.1f} s wall, {len(manifest) / wall:.1f} clips/s "
              f"({args.num_cpus} CPUs, {args.strategy}, batch {args.batch_size}); "
              f"{info.n_ok} ok, {info.n_error} errors; cache {cache_mb:.0f} MiB")
        print(f"peak RSS: driver {sampler.driver / mb:.0f} MiB, largest worker {sampler.worker / mb:.0f} MiB, "
              f"whole tree {sampler.tree / mb:.0f} MiB (tree includes GCS/raylet and shared object-store pages)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
