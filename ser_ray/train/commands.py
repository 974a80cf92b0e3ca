"""``ser-ray train`` (one model, one split) and ``ser-ray cv`` (every fold) with Ray Train."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ser_ray.models import MODELS
from ser_ray.train.config import PROTOCOLS, load_config

log = logging.getLogger(__name__)

CORPORA = ("cremad", "ravdess", "emodb", "synthetic")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "train":
        parser.add_argument("--config", required=True, help="YAML train config (see configs/)")
        parser.add_argument("--fold", type=int, default=None, help="test fold (default: data.test_fold)")
    else:
        parser.add_argument("--config", default=None, help="YAML train config; flags below override it")
        parser.add_argument("--corpus", choices=CORPORA, help="corpus adapter")
        parser.add_argument("--root", help="corpus directory or s3:// prefix")
        parser.add_argument("--manifest", help="a manifest file instead of --corpus/--root")
        parser.add_argument("--family", choices=sorted(MODELS), help="model family (see ser_ray/models)")
        parser.add_argument("--protocol", choices=PROTOCOLS, help="speaker-disjoint split protocol")
        parser.add_argument("--k", type=int, help="folds for --protocol kfold")
        parser.add_argument("--epochs", type=int, help="maximum epochs per fold")
        parser.add_argument("--max-folds", type=int, default=None, help="run only the first N folds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set lr=3e-4 --set hparams.dropout=0.5")
    parser.add_argument("--out", required=True, help="result directory")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS if set, else a local Ray)")


def _init_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # "local": never join a stale cluster left in Ray's temp dir. The dashboard's State API is
        # what Ray Train's placement-group cleaner polls; without it, it logs a warning every second.
        ray.init(address="local", include_dashboard=True)
    # Per-epoch dataset splits would each draw a progress bar; the loop logs epochs instead.
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _cv_config(args):
    flags = {
        "data.corpus": args.corpus, "data.root": args.root, "data.manifest": args.manifest,
        "family": args.family, "data.protocol": args.protocol, "data.k": args.k, "epochs": args.epochs,
    }
    overrides = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items() if v is not None]
    config = load_config(args.config, overrides + list(args.overrides))
    if not (config.data.manifest or (config.data.corpus and config.data.root)):
        raise SystemExit("ser-ray cv: give --corpus and --root, --manifest, or a --config naming them")
    return config


def run(args) -> int:
    from ser_ray.train.cv import run_cv

    if args.command == "train":
        config = load_config(args.config, list(args.overrides))
        fold = config.data.test_fold if args.fold is None else args.fold
        _init_ray(args.address)
        summary = run_cv(config, args.out, folds=[fold])
    else:
        config = _cv_config(args)
        _init_ray(args.address)
        summary = run_cv(config, args.out, max_folds=args.max_folds)
    print(f"{config.family} {config.data.protocol} ({len(summary['folds_run'])} fold(s)): "
          f"UA {summary['ua']['mean']:.3f} ± {summary['ua']['std']:.3f}  "
          f"WA {summary['wa']['mean']:.3f} ± {summary['wa']['std']:.3f}  "
          f"macro-F1 {summary['macro_f1']['mean']:.3f} ± {summary['macro_f1']['std']:.3f}  -> {args.out}")
    return 0
