"""Cross-validation wall time: `ser-ray cv` (Ray Train) vs a bare PyTorch loop over the same folds.

    python benchmarks/cv_overhead.py                          # EmoDB LOSO at ../shared/data/emodb, cnn
    python benchmarks/cv_overhead.py --epochs 5 --max-folds 4

Both train the same model family on the same cached features, fold by fold (LOSO, the same
speaker-disjoint train / validation / test split per fold), for the same epochs with early stopping
off, validate every epoch and predict each fold's test speakers. The bare loop runs the folds one
after another in this process with ``--cpus`` torch threads (a DataLoader, no Ray); ``run_cv`` runs
them as it does for users (folds in groups, one Ray Train run per group training its folds one after
another, as many groups at once as the CPUs hold, 1 CPU each,
``--concurrent-folds`` to force a number), writing every result file. The feature cache is built
first and is not timed. Prints both wall times and their ratio (target <= 1.3).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import bare_epochs  # noqa: E402  the same bare epoch loop


def bare_cv(splits, rows, labels, feature_config, cfg) -> float:
    """Every fold: the bare epochs on its train rows (validating on its val rows), then its test predictions."""
    from ser_ray.features.pipeline import features_array
    from ser_ray.models import build_model

    start = time.perf_counter()
    for split in splits:
        tr, va, te = split.with_features(rows)
        bare_epochs(tr, va, labels, feature_config, cfg)
        model = build_model(cfg.family, len(labels), feature_config, **cfg.hparams).eval()
        with torch.no_grad():  # the test pass (its weights do not matter for the time)
            x = torch.from_numpy(features_array(te))
            np.concatenate([model(x[i:i + 64]).numpy() for i in range(0, len(x), 64)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="emodb")
    parser.add_argument("--root", default="../shared/data/emodb")
    parser.add_argument("--family", default="cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-folds", type=int, default=None)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for both; the bare loop's torch threads")
    parser.add_argument("--concurrent-folds", type=int, default=0, help="run_cv's folds at once (0: as the CPUs hold)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import family_feature_config
    from ser_ray.train.config import load_config
    from ser_ray.train.cv import fold_concurrency, run_cv
    from ser_ray.train.data import assign_folds, feature_rows, fold_frames, label_mapped, load_manifest

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="ser-ray-cv-bench-"))
    cfg = load_config(None, [f"family={args.family}", f"epochs={args.epochs}", "patience=0",
                             f"data.corpus={args.corpus}", f"data.root={Path(args.root).resolve()}",
                             "data.protocol=loso", f"data.cache_root={work / 'cache'}",
                             f"concurrent_folds={args.concurrent_folds}"])
    manifest, labels = label_mapped(load_manifest(cfg), cfg.label_map)
    manifest, n_folds = assign_folds(manifest, "loso", cfg.data.k, cfg.seed, None)
    folds = list(range(n_folds))[: args.max_folds]
    feature_config = family_feature_config(cfg.family, FeatureConfig(**cfg.data.features))  # as run_cv does
    rows, _ = feature_rows(manifest, feature_config, str(work / "cache"))  # built once, not timed
    splits = [fold_frames(manifest, "loso", f, cfg.data.val_fraction, cfg.seed) for f in folds]
    at_once = fold_concurrency(cfg, len(folds))
    print(f"{args.corpus} LOSO, {len(folds)} folds, {args.family}, {args.epochs} epochs per fold, {args.cpus} CPUs; "
          f"run_cv trains {at_once} fold(s) at once")

    bare_cfg = cfg.__class__.from_dict({**cfg.to_dict(), "cpus_per_worker": args.cpus})
    bare = bare_cv(splits, rows, labels, feature_config, bare_cfg)
    print(f"bare PyTorch, folds one after another in this process ({args.cpus} threads): {bare:.1f} s")
    start = time.perf_counter()
    summary = run_cv(cfg, work / "cv", max_folds=args.max_folds)
    served = time.perf_counter() - start
    print(f"ser-ray cv (Ray Train, a run per group of folds, result files written): {served:.1f} s, UA {summary['ua']['mean']:.3f}")
    print(f"ratio {served / bare:.2f} (target <= 1.3)")
    ray.shutdown()


if __name__ == "__main__":
    main()
