"""``ser-ray prepare``: decode audio and extract features with Ray Data into a feature cache."""

from __future__ import annotations

import argparse
import logging

from ser_ray.features.config import FEATURE_KINDS, LEVEL_NORMALISATIONS
from ser_ray.features.pipeline import STRATEGIES

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "prepare") -> None:
    parser.add_argument("--manifest", required=True, help="manifest file (.parquet or .csv, local or s3://)")
    parser.add_argument("--out", required=True, help="cache root (local dir or s3://); the cache goes in OUT/<key>/")
    parser.add_argument("--features", default="logmel", choices=list(FEATURE_KINDS))
    parser.add_argument("--normalize", default="none", choices=LEVEL_NORMALISATIONS,
                        help="waveform level normalisation before features")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per feature batch")
    parser.add_argument("--strategy", default="auto", choices=list(STRATEGIES),
                        help="local: worker processes on this machine, no Ray; tasks / actors: Ray Data "
                             "tasks or an actor pool, over the cluster; auto (default): Ray Data when a Ray "
                             "is running or given (--address, RAY_ADDRESS, ray job submit), else local")
    parser.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: local Ray")
    parser.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")


def run(args: argparse.Namespace) -> int:
    from ser_ray.corpora.manifest import read_manifest
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.pipeline import prepare

    manifest = read_manifest(args.manifest)
    config = FeatureConfig(kind=args.features, normalize=args.normalize)
    from ser_ray.session import connect, ray_in_use

    strategy = args.strategy
    if strategy == "auto":  # this command's main module is guarded, so local workers can also be spawned
        strategy = "tasks" if ray_in_use(args.address) else "local"
    if strategy != "local":
        connect(args.address, dashboard=False)
    info = prepare(manifest, args.out, config, batch_size=args.batch_size, strategy=strategy,
                   progress=not args.no_progress)
    state = "reused" if info.reused else f"written in {info.seconds:.1f} s"
    print(f"{info.path}: {info.n_ok} clips ok, {info.n_error} errors ({state})")
    for path, message in info.errors:
        print(f"  error: {message}")
    # Errors are reported, not fatal: a cache with some unreadable clips is still usable.
    return 0 if info.n_ok > 0 else 1
