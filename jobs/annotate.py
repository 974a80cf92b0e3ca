"""Annotate an audio archive with a bundle on a Ray cluster (Ray Data actor pool, resumable).

    ray job submit --working-dir . -- python jobs/annotate.py \
        --input s3://bucket/recordings/ --output s3://bucket/annotations/ --bundle s3://bucket/bundle/

Inside a job, RAY_ADDRESS points at the cluster; rerunning the same command resumes.
"""

import argparse
import logging

from ser_ray.annotate.commands import add_arguments, run

logging.basicConfig(level=logging.INFO)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
