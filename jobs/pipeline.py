"""The whole flow on your corpus as one Ray job: search, ensemble bundle, then (optionally) label an archive.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tune-synthetic.yaml \
        --root $PWD/data/synthetic --out $PWD/results/pipeline
    python jobs/pipeline.py --config configs/tune-emodb.yaml --out results/pipeline   # local Ray

Stages hand over through the experiment directory (best.json, split.parquet, bundle/); a rerun skips
finished stages and says so (see ser_ray/pipeline.py).
"""

import argparse
import logging

from ser_ray.pipeline import add_arguments, config_from_args, run_pipeline
from ser_ray.session import check_job_paths, connect

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_arguments(parser)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = config_from_args(args)
    annotate = config.annotate or {}
    check_job_paths({"--root / data.root": config.search.data.root, "annotate.input": annotate.get("input")},
                    {"--out / storage_path": config.search.storage_path, "annotate.output": annotate.get("output")})
    connect(args.address)
    result = run_pipeline(config)
    print(f"bundle {result['bundle']} (serve it: ser-ray serve --bundle {result['bundle']})")


if __name__ == "__main__":
    main()
