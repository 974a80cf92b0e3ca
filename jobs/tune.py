"""Hyperparameter search over model families with Ray Tune + Optuna (TPE) + ASHA.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-synthetic.yaml \
        --root $PWD/data/synthetic --out $PWD/results/tune
    python jobs/tune.py --config configs/tune-emodb.yaml --num-samples 8 --out results/tune   # local Ray
    python jobs/tune.py --config configs/tune-emodb.yaml --out results/tune --resume          # continue

Reads the tune config (data, families, budget, search space), builds the manifest, the speaker-disjoint
split and the feature caches, runs one TorchTrainer per trial (ASHA stops weak ones on validation UA),
then writes trials.parquet/csv, best.json (best trial per family, its test metrics, its model dir)
and the search plots into <out>/<name>/.
"""

import argparse
import logging

from ser_ray.session import check_job_paths
from ser_ray.tune.commands import add_arguments, config_from_args, init_ray, print_summary
from ser_ray.tune.search import run_search

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_arguments(parser)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = config_from_args(args)
    # before Ray starts: a relative data or output path would go wrong inside the job's uploaded copy
    check_job_paths({"--root / data.root": config.data.root, "--folds": config.data.folds,
                     "data.manifest": config.data.manifest},
                    {"--out / storage_path": config.storage_path})
    # Under `ray job submit` (or with RAY_ADDRESS / --address) join the cluster; otherwise a local Ray.
    init_ray(args.address)

    result = run_search(config, resume=args.resume)
    print_summary(result)


if __name__ == "__main__":
    main()
