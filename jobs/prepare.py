"""Build a manifest and its feature cache with Ray Data (local or s3:// in and out).

    ray job submit --working-dir . -- python jobs/prepare.py --corpus cremad --root s3://bucket/crema-d \
        --out s3://bucket/ser-ray/cache
"""

import argparse
import logging


from ser_ray.corpora import CORPORA, build_manifest
from ser_ray.corpora.manifest import write_manifest
from ser_ray.features.config import FEATURE_KINDS, FeatureConfig
from ser_ray.features.pipeline import prepare
from ser_ray import storage
from ser_ray.session import check_job_paths, connect

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--corpus", required=True, choices=CORPORA)
parser.add_argument("--root", required=True, help="corpus directory or s3:// prefix")
parser.add_argument("--out", required=True, help="cache root (directory or s3:// prefix)")
parser.add_argument("--features", default="logmel", choices=FEATURE_KINDS)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    check_job_paths({"--root": args.root}, {"--out": args.out})
    # Under `ray job submit` (or with RAY_ADDRESS set) join the cluster; otherwise start a local Ray.
    connect()

    manifest, report = build_manifest(args.corpus, args.root)
    write_manifest(manifest, storage.join(args.out, "manifest.parquet"))
    info = prepare(manifest, args.out, FeatureConfig(kind=args.features))
    print(f"{len(manifest)} clips: {info.n_ok} ok, {info.n_error} errors -> {info.path}; skipped files: {report['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
