"""Train one model on one speaker-disjoint split with Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --config configs/emodb.yaml --out $PWD/results/emodb-cnn
    python jobs/train.py --config configs/synthetic.yaml --set epochs=5 --out /tmp/synth-cnn   # local Ray

Reads the YAML config (corpus, protocol, family, hyperparameters), builds the manifest and the feature
cache, trains with a TorchTrainer (checkpoint per epoch, resumable), evaluates the held-out speakers and
writes model/, metrics.json, predictions.parquet, folds.json and PNGs under --out.
"""

import argparse
import logging


from ser_ray.session import check_job_paths, connect
from ser_ray.train.config import load_config
from ser_ray.train.cv import run_cv

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", required=True)
parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
parser.add_argument("--fold", type=int, default=None, help="test fold (default: data.test_fold)")
parser.add_argument("--out", default="results/train")


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_config(args.config, args.overrides)
    check_job_paths({"data.root": config.data.root, "data.manifest": config.data.manifest}, {"--out": args.out})
    # Under `ray job submit` (or with RAY_ADDRESS set) join the cluster; otherwise start a local Ray.
    connect()

    fold = config.data.test_fold if args.fold is None else args.fold
    summary = run_cv(config, args.out, folds=[fold])
    print(f"{config.family} fold {fold}: test UA {summary['ua']['mean']:.3f}  WA {summary['wa']['mean']:.3f}  "
          f"macro-F1 {summary['macro_f1']['mean']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
